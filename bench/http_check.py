"""GPU check of `python launch.py` as users run it: HTTP server with TCA on the embedded SmolLM2.

    python bench/http_check.py --model DIR --budgets FILE [--out DIR]

Server A: TCA, radix cache on, chunked prefill 1024 (long prompts span several chunks).
Server B: TCA, radix cache off, chunked prefill 8192 (each prompt in one chunk).
Checks: OpenAI chat completions and native /generate answer; an SGLang frontend program (sgl.function) runs against
the endpoint; a 3-turn conversation over a ~5K-token document gives the same tokens on A and B (chunking and radix
reuse change nothing) and A reports cached prefix tokens from turn 2 on; a bad request gets an HTTP error and the
server stays healthy. Prints a markdown table last and writes it under --out.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from sglang_tca.config import EMBEDDED_BUDGETS  # noqa: E402


def start(model, budgets, port, extra, log):
    cmd = [sys.executable, str(ROOT / "launch.py"), "--model", model, "--tca-budgets", budgets, "--port", str(port),
           "--disable-prefill-cuda-graph", "--cuda-graph-max-bs-decode", "8", "--mem-fraction-static", "0.4", *extra]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}; see the log")
        try:
            if requests.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except requests.RequestException:
            pass
        time.sleep(1)
    raise RuntimeError("server did not become healthy in 300 s")


def stop(proc) -> None:
    """SIGTERM to the server's process group (`start` gives it its own), then SIGKILL to whatever of it is left."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def generate(url, text, n=24):
    r = requests.post(url + "/generate", json={"text": text, "sampling_params": {"temperature": 0, "max_new_tokens": n}},
                      timeout=300)
    r.raise_for_status()
    j = r.json()
    return j["text"], j["meta_info"].get("cached_tokens", 0)


def conversation(url, doc, questions):
    text, turns = f"<|im_start|>user\n{doc}\n\n", []
    for q in questions:
        text += f"{q}<|im_end|>\n<|im_start|>assistant\n"
        ans, cached = generate(url, text)
        turns.append((ans, cached))
        text += ans + "<|im_end|>\n<|im_start|>user\n"
    return turns


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--budgets", default=str(EMBEDDED_BUDGETS))
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/http_check"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from transformers import AutoTokenizer

    from sglang_tca.essays import essay_split

    tok = AutoTokenizer.from_pretrained(args.model)
    doc = tok.decode(tok(essay_split("heldout"), add_special_tokens=False).input_ids[30000:35000])
    questions = ["What is the main topic of the text above?", "Who is the author talking to?",
                 "Give one example the text uses."]
    rows = []
    log = open(out / "server_a.log", "w")
    proc, url = start(args.model, args.budgets, 30111, ["--chunked-prefill-size", "1024"], log)
    try:
        r = requests.post(url + "/v1/chat/completions", json={
            "model": "default", "messages": [{"role": "user", "content": "Say hello in one word."}],
            "max_tokens": 8, "temperature": 0}, timeout=60)
        rows.append(("OpenAI /v1/chat/completions", f"HTTP {r.status_code}: {r.json()['choices'][0]['message']['content']!r}"))
        rows.append(("native /generate", repr(generate(url, "The capital of France is", 8)[0])))

        import sglang as sgl

        @sgl.function
        def qa(s, question):
            s += sgl.user(question)
            s += sgl.assistant(sgl.gen("answer", max_tokens=12, temperature=0))

        sgl.set_default_backend(sgl.RuntimeEndpoint(url))
        rows.append(("SGLang frontend program (sgl.function)", repr(qa.run(question="What is 2 + 2?")["answer"])))
        conv_a = conversation(url, doc, questions)
        bad = requests.post(url + "/generate", json={"text": "hi", "sampling_params": {"max_new_tokens": -3}}, timeout=60)
        too_long = requests.post(url + "/generate", json={"input_ids": [1000] * 9000,
                                                          "sampling_params": {"max_new_tokens": 4}}, timeout=60)
        healthy = requests.get(url + "/health", timeout=10).status_code
        rows.append(("bad request (max_new_tokens -3) / prompt over context", f"HTTP {bad.status_code} / HTTP "
                     f"{too_long.status_code}; /health after: {healthy}"))
    finally:
        os.killpg(proc.pid, 9)
    log = open(out / "server_b.log", "w")
    proc, url = start(args.model, args.budgets, 30112, ["--chunked-prefill-size", "8192", "--disable-radix-cache"], log)
    try:
        conv_b = conversation(url, doc, questions)
    finally:
        os.killpg(proc.pid, 9)
    same = [a[0] == b[0] for a, b in zip(conv_a, conv_b)]
    rows.append(("3-turn conversation, A (radix, chunks of 1024) == B (no radix, one chunk)", str(same)))
    rows.append(("cached prompt tokens per turn on A / B", f"{[c for _, c in conv_a]} / {[c for _, c in conv_b]}"))
    rows.append(("turn answers on A", repr([a for a, _ in conv_a])))
    import torch

    table = (f"# http_check ({datetime.date.today()}, {torch.cuda.get_device_name()}, sglang 0.5.17)\n\n"
             f"command: `python bench/http_check.py --model DIR --budgets {args.budgets}` (server: `python launch.py`)\n\n"
             "| check | result |\n|---|---|\n" + "".join(f"| {a} | {b} |\n" for a, b in rows))
    (out / "http_check.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
