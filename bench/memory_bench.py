"""Memory and memory-bound serving: TCA (freed KV) vs dense SGLang (flashinfer), same machine, same run.

    python bench/memory_bench.py run --parts memory random gsp [--backends tca flashinfer] [--deadline-s S] [--out DIR]
                                     [--num-prompts N]     (random parts: N prompts instead of 128)
    python bench/memory_bench.py report --runs DIR [DIR ...]      (here: writes bench/results/memory.{md,json,png})

Llama-3.1-8B shape with dummy weights (bench/llama31_8b), SmolLM2's tokenizer (carried as .tok), synthetic budgets:
every (layer l, KV head h) keeps exactly KS[(l + h) % 8] of the 64 tokens of a compressed block (KS in
bench/synthetic_budgets.py), so the
mean kept share of compressed blocks is 0.3125 and the kept amount is exact (dummy weights have no attention worth
calibrating). Each backend gets one server (`launch.py`, the same flags, the same --mem-fraction-static; the
prefill CUDA graph off for both: its capture takes minutes) and, per part:
  memory  one 128K request (130,816 prompt tokens, 256 output tokens): the bytes the pools hold for it while it
          decodes (`/get_server_info` -> tca: dense slots it holds x bytes per dense token + store pages x page
          bytes + its logical pages' tables), per token, against dense's bytes per token (its KV pool over its
          tokens); also with the cached, evictable dense windows at its prefill chunks' ends counted; then
          N 128K requests at once (64 output tokens each): the most the server runs at once (/v1/loads);
          dense's number is its pool's capacity in whole 128K requests (exact: dense holds every token);
  random  SGLang's bench_serving, random-ids, 128 distinct 16K prompts, 1024 output tokens, all sent at once;
          both servers with --max-running-requests 128 (TCA sizes its dense pool for that many windows);
  random_long  the same with 4096 output tokens: a load whose time is mostly decode, where what each server can
          hold decides the batch (with 1024 output tokens both servers spend about half of it prefilling 128 x 16K);
  gsp     SGLang's bench_serving, generated-shared-prefix multi-turn (--gsp-num-turns 3; 4 system prompts of 32K
          tokens, 16 conversations, 1K-token questions, 256-token answers; through /v1/chat/completions, as its
          multi-turn mode requires, each turn resending the conversation so far), both servers with the KV budget capped
          by --max-total-tokens 98304 (below the 131,072 tokens of the four system prompts, so that dense must evict
          and recompute them; the 2026-12-02 run used 163840, which dense's cache still held) and
          --max-running-requests 16; prefix cache
          hit rate from the server's counters (sglang:cached_tokens_total / sglang:prompt_tokens_total).
Results: one JSON line per (part, backend) in DIR/memory_runs.jsonl, server logs in DIR.
"""
from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
from http_check import stop  # noqa: E402
from paired_runs import cli, positive, run_parts  # noqa: E402
from synthetic_budgets import MODEL, synthetic_budgets  # noqa: E402

TOK = ROOT / ".tok"
PROMPT_128K = 128 * 1024 - 256
MEM_FRACTION = "0.85"
SERVER_FLAGS = {                                  # per part, the same for both backends
    "memory": ["--cuda-graph-max-bs", "32"],
    "random": ["--max-running-requests", "128", "--cuda-graph-max-bs", "128"],
    "random_long": ["--max-running-requests", "128", "--cuda-graph-max-bs", "128"],
    "gsp": ["--max-total-tokens", "98304", "--max-running-requests", "16", "--cuda-graph-max-bs", "16"],
}
ESTIMATE_S = {                                    # seconds one (part, backend) takes on an H200, server start included
    "memory": {"tca": 300, "flashinfer": 170},
    "random": {"tca": 250, "flashinfer": 330},
    "random_long": {"tca": 450, "flashinfer": 700},
    "gsp": {"tca": 220, "flashinfer": 260},
}
BENCH_FLAGS = {
    "random": ["--dataset-name", "random-ids", "--random-input-len", "16384", "--random-output-len", "1024",
               "--random-range-ratio", "1.0", "--num-prompts", "128", "--request-rate", "inf"],
    "random_long": ["--dataset-name", "random-ids", "--random-input-len", "16384", "--random-output-len", "4096",
                    "--random-range-ratio", "1.0", "--num-prompts", "128", "--request-rate", "inf"],
    "gsp": ["--dataset-name", "generated-shared-prefix", "--gsp-num-groups", "4", "--gsp-prompts-per-group", "4",
            "--gsp-system-prompt-len", "32768", "--gsp-question-len", "1024", "--gsp-output-len", "256",
            "--gsp-num-turns", "3", "--request-rate", "inf"],
}


def http(port, path, body=None, timeout=3600):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=None if body is None else
                                 json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        data = r.read().decode()
    return json.loads(data) if data and data[0] in "[{" else data


class Server:
    def __init__(self, backend, out: Path, port: int, extra=(), part: str = "server"):
        self.backend, self.port = backend, port
        args = [sys.executable, str(ROOT / "launch.py"), "--model", str(MODEL), "--load-format", "dummy",
                "--tokenizer-path", str(TOK), "--context-length", "131072", "--mem-fraction-static", MEM_FRACTION,
                "--disable-prefill-cuda-graph", "--port", str(port), "--enable-metrics", "--log-level", "info", *extra]
        if backend == "tca":
            synthetic_budgets(out / "budgets.json")
            args += ["--tca-budgets", str(out / "budgets.json")]
        else:
            args += ["--attention-backend", backend]
        self.log_path = out / f"server_{backend}_{part}.log"
        self.log = open(self.log_path, "w")
        t0 = time.time()
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{backend} server exited: {self.log_path.read_text()[-3000:]}")
            try:
                http(port, "/health_generate", timeout=30)
                break
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(2)
            if time.time() - t0 > 600:
                raise RuntimeError(f"{backend} server did not start in 600 s")
        self.start_s = round(time.time() - t0, 1)
        print(f"[memory] {backend} server up in {self.start_s}s", flush=True)

    def info(self):
        return http(self.port, "/get_server_info")["internal_states"][0]

    def generate(self, ids, new, timeout=3600):
        return http(self.port, "/generate", {"input_ids": ids, "sampling_params": {
            "max_new_tokens": new, "temperature": 0, "ignore_eos": True}}, timeout=timeout)

    def running(self):
        loads = http(self.port, "/v1/loads")
        found = []

        def walk(x):
            if isinstance(x, dict):
                for k, v in x.items():
                    if k == "num_running_reqs":
                        found.append(v)
                    walk(v)
            elif isinstance(x, list):
                for v in x:
                    walk(v)
        walk(loads)
        return sum(found)

    def metrics(self):
        text = http(self.port, "/metrics")
        out = {}
        for name in ("sglang:prompt_tokens_total", "sglang:cached_tokens_total"):
            out[name] = sum(float(m) for m in re.findall(rf"^{re.escape(name)}{{[^}}]*}} ([0-9.e+]+)$", text, re.M))
        return out

    def stop(self):
        stop(self.proc)
        self.log.close()


def ids(rnd, n):
    return [rnd.randrange(1000, 48000) for _ in range(n)]


def part_memory(srv: Server, n_concurrent: int):
    rnd = random.Random(1)
    srv.generate(ids(rnd, 2000), 8)                                       # warm-up
    http(srv.port, "/flush_cache", {})
    info = srv.info()
    res = {"token_capacity": info["memory_usage"]["token_capacity"],
           "kv_cache_gb": info["memory_usage"]["kvcache"]}
    if srv.backend != "tca":
        per_token = info["memory_usage"]["kvcache"] * 2 ** 30 / info["memory_usage"]["token_capacity"]
        res.update(kv_bytes_per_token_128k=per_token,
                   max_concurrent_128k=info["memory_usage"]["token_capacity"] // (PROMPT_128K + 64))
        return res
    # one 128K request decoding 256 tokens: the pools sampled while it runs, then once it is cached
    samples, done = [], threading.Event()
    t0 = time.time()
    th = threading.Thread(target=lambda: (srv.generate(ids(rnd, PROMPT_128K), 256), done.set()), daemon=True)
    th.start()
    while not done.is_set():
        t = srv.info()["tca"]
        if t["logical_used_tokens"] > PROMPT_128K:                        # prefill done, decoding
            samples.append(t)
        time.sleep(0.2)
    th.join()
    res["wall_128k_s"] = round(time.time() - t0, 2)
    if not samples:
        raise RuntimeError("no sample of the pools while the 128K request decoded")
    run = samples[len(samples) // 2]                                   # mid-decode
    tokens = run["logical_used_tokens"]
    held = (run["dense_used_tokens"] - run["dense_evictable_tokens"]) * run["dense_token_bytes"] \
        + run["store_used_pages"] * run["page_bytes"] + run["used_table_bytes"]
    res.update(tca_running_128k=run, tca_cached_128k=srv.info()["tca"], kv_bytes_per_token_128k=held / tokens,
               kv_bytes_per_token_128k_with_cached_windows=(run["used_bytes"] + run["used_table_bytes"]) / tokens,
               store_bytes_per_token_128k=run["store_used_pages"] * run["page_bytes"] / tokens,
               dense_token_bytes=run["dense_token_bytes"])
    http(srv.port, "/flush_cache", {})
    peak, stop = [0], threading.Event()

    def poll():
        while not stop.is_set():
            try:
                peak[0] = max(peak[0], srv.running())
            except Exception:  # noqa: BLE001
                pass
            time.sleep(1.0)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    prompts = [ids(rnd, PROMPT_128K) for _ in range(n_concurrent)]
    t0 = time.time()
    workers = [threading.Thread(target=srv.generate, args=(p, 64)) for p in prompts]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    stop.set()
    th.join()
    res.update(max_concurrent_128k=peak[0], concurrent_sent=n_concurrent, concurrent_wall_s=round(time.time() - t0, 1),
               tca_after_concurrent=srv.info()["tca"])
    return res


def bench_serving(srv: Server, flags: list[str], out: Path, tag: str, client: str = "sglang") -> dict:
    """SGLang's own client (`python -m sglang.bench_serving`) against the server: its summary record (the fields
    below), the prefix cache hit rate from the server's counters over the run, and the command."""
    before = srv.metrics()
    jsonl = out / f"bench_{tag}_{srv.backend}.jsonl"
    cmd = [sys.executable, "-m", "sglang.bench_serving", "--backend", client, "--host", "127.0.0.1", "--port",
           str(srv.port), "--tokenizer", str(TOK), "--model", str(MODEL), "--output-file", str(jsonl),
           "--disable-tqdm", "--flush-cache", *flags]
    env = dict(os.environ, PYTHONPATH=f"{ROOT / '.client'}:{os.environ.get('PYTHONPATH', '')}")
    t0 = time.time()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3000)
    (out / f"bench_{tag}_{srv.backend}.log").write_text(p.stdout + p.stderr)
    if p.returncode != 0:
        raise RuntimeError(f"bench_serving failed: {(p.stdout + p.stderr)[-3000:]}")
    after = srv.metrics()
    rec = json.loads(jsonl.read_text().strip().splitlines()[-1])
    prompt = after["sglang:prompt_tokens_total"] - before["sglang:prompt_tokens_total"]
    cached = after["sglang:cached_tokens_total"] - before["sglang:cached_tokens_total"]
    keep = ("request_throughput", "output_throughput", "input_throughput", "completed", "duration",
            "mean_ttft_ms", "median_ttft_ms", "mean_tpot_ms", "median_tpot_ms", "max_concurrency", "total_input_tokens",
            "total_output_tokens", "concurrency")
    res = {k: rec[k] for k in keep if k in rec}
    res.update(cache_hit_rate=round(cached / prompt, 4) if prompt else None, bench_wall_s=round(time.time() - t0, 1),
               command=" ".join(["python -m sglang.bench_serving", *cmd[3:]]))
    return res


def bench_flags(part: str, num_prompts: int) -> list[str]:
    """The part's bench_serving flags; the random parts send num_prompts prompts (128 fills an H200's dense pool about
    three times over; an H100 holds about half the tokens, so half the prompts make as memory-bound a load)."""
    flags = list(BENCH_FLAGS[part])
    if part.startswith("random"):
        flags[flags.index("--num-prompts") + 1] = str(num_prompts)
    return flags


def part_bench(srv: Server, part: str, out: Path, num_prompts: int):
    client = "sglang-oai-chat" if part == "gsp" else "sglang"     # bench_serving's multi-turn needs a chat backend
    res = bench_serving(srv, bench_flags(part, num_prompts), out, part, client)
    if srv.backend == "tca":
        res["tca_after"] = srv.info()["tca"]
    return res


def scaled_estimates(num_prompts: int, start_s: int = 200) -> dict:
    """ESTIMATE_S with the random parts' benchmark time (beyond a server start) scaled to num_prompts of 128."""
    return {part: {b: round(start_s + (t - start_s) * num_prompts / 128) if part.startswith("random") else t
                   for b, t in est.items()} for part, est in ESTIMATE_S.items()}


def run(args):
    def one(part, backend, i):
        srv = Server(backend, Path(args.out), 30000 + i, SERVER_FLAGS[part], part)
        try:
            res = (part_memory(srv, args.concurrent) if part == "memory"
                   else part_bench(srv, part, Path(args.out), args.num_prompts))
            return {"server_start_s": srv.start_s, **res}
        finally:
            srv.stop()

    run_parts("memory", args, scaled_estimates(args.num_prompts), one,
              lambda part, backend: {"mem_fraction_static": MEM_FRACTION, "server_flags": SERVER_FLAGS[part],
                                     **({"num_prompts": args.num_prompts} if part.startswith("random") else {})})


def main():
    from memory_report import report

    cli(__doc__, "memory", list(SERVER_FLAGS), run, report, required_parts=True,
        extra=lambda r: (r.add_argument("--concurrent", type=int, default=17),
                         r.add_argument("--num-prompts", type=positive(), default=128)))


if __name__ == "__main__":
    main()
