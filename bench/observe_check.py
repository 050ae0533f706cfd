"""GPU check of `--tca-observe N` on freed KV memory (docs/OBSERVE_DESIGN.md, step 5), on the embedded SmolLM2 with its
calibrated budgets, through SGLang's offline Engine (the server's API):

    python bench/observe_check.py --model DIR [--budgets FILE] [--observe 32] [--out DIR]
    (on the GPU machine: source .gpu/env.sh && bash bench/gpu_smollm2.sh bench/observe_check.py, carry .gpu .data)

Prompts: passkey retrieval at 4K and 8K tokens (3 each) and one 6K-token document with two questions. Runs, one
Engine each, with SGLang's strict memory checks on while busy for TCA (a leak or an accounting error stops the run):
dense triton at prefill chunks of 512 and 8192 tokens; TCA with observe at chunks 512, 1024 and 8192, and at 1024
with the radix cache off; the same with a dense observing prefill (--tca-observe-prefill dense) at 1024 and 8192;
TCA without observe at 1024. What it shows: whether observe's greedy tokens are the same
whatever the chunk size and with the radix cache on or off (issue 15: independent of chunk size and cache history,
beyond what dense SGLang itself shows, whose row is printed beside), the passkeys found, that an observing prompt
reuses no cached prefix, and the memory after. Every prompt here is long enough to observe, so radix on vs off shows
that observing prompts neither reuse nor leave a prefix, not a reuse of compressed KV (bench/conversation_check.py
does that without observe). The runs go most telling first, and the table (markdown, under --out) and the raw
tokens are rewritten after each run, so a failure or a timeout keeps the runs before it.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
from serve_check import engine, generate  # noqa: E402

from sglang_tca.config import EMBEDDED_BUDGETS  # noqa: E402

KEYS = (52817, 39402, 71163)
DENSE = " dense prefill"       # the tag of the --tca-observe-prefill dense runs, after the observe runs' own


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--budgets", default=str(EMBEDDED_BUDGETS))
    ap.add_argument("--observe", type=int, default=32)
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/observe_check"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import sglang
    import torch
    from transformers import AutoTokenizer

    from sglang_tca.essays import essay_split, passkey_prompt

    tok = AutoTokenizer.from_pretrained(args.model)
    hay = tok(essay_split("heldout"), add_special_tokens=False).input_ids
    passkeys = [tok(passkey_prompt(tok, n, d, k, seed=i), add_special_tokens=False).input_ids
                for n in (4000, 7900) for i, (d, k) in enumerate(zip((0.2, 0.5, 0.8), KEYS))]
    doc = hay[20000:26000]
    questions = ["\n\nQuestion: What is the main topic of the text above? Answer:",
                 "\n\nQuestion: Summarize the last paragraph in one sentence. Answer:"]
    prompts = passkeys + [doc + tok(q, add_special_tokens=False).input_ids for q in questions]
    obs = f"TCA observe {args.observe}"
    obs_d = obs + DENSE
    # most telling first: every run's results and the table are written after each run, so a run that fails (an
    # Engine failure ends this process) or a call that runs out of time leaves what came before it
    runs = [(f"{obs}, chunk 1024", "tca", args.budgets, args.observe, 1024, {}),
            (f"{obs}, chunk 8192", "tca", args.budgets, args.observe, 8192, {}),
            (f"{obs}, chunk 1024, radix off", "tca", args.budgets, args.observe, 1024, {"disable_radix_cache": True}),
            (f"{obs_d}, chunk 1024", "tca", args.budgets, args.observe, 1024, {"observe_prefill": "dense"}),
            (f"{obs_d}, chunk 8192", "tca", args.budgets, args.observe, 8192, {"observe_prefill": "dense"}),
            ("TCA, chunk 1024", "tca", args.budgets, 0, 1024, {}),
            ("dense triton, chunk 512", "triton", None, 0, 512, {}),
            ("dense triton, chunk 8192", "triton", None, 0, 8192, {}),
            (f"{obs}, chunk 512", "tca", args.budgets, args.observe, 512, {})]
    head = (f"# observe_check ({datetime.date.today()}, {torch.cuda.get_device_name()}, sglang {sglang.__version__}, "
            f"torch {torch.__version__})\n\ncommand: `python bench/observe_check.py --model DIR --budgets "
            f"{args.budgets} --observe {args.observe}`\n\n")
    res = {}
    for tag, backend, budgets, observe, chunk, kw in runs:
        t0 = time.time()
        if backend == "tca":
            os.environ["SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_BUSY"] = "1"
        eng = engine(args.model, backend, budgets, observe=observe, chunked_prefill_size=chunk, **kw)
        os.environ.pop("SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_BUSY", None)
        try:
            ids = [generate(eng, [p], 24) for p in prompts]            # one after the other: cache history
            res[tag] = {"tokens": [i[0][0] for i in ids], "cached": [i[1][0] for i in ids],
                        "memory": eng.get_server_info()["internal_states"][0].get("tca") if backend == "tca" else None,
                        "seconds": round(time.time() - t0, 1)}
        finally:
            eng.shutdown()
        print(f"[observe_check] {tag}: {time.time() - t0:.1f}s", flush=True)
        md = head + table(res, tok, obs, [r[0] for r in runs])
        (out / "observe_check_raw.json").write_text(json.dumps(res, default=str)[:2_000_000])
        (out / "observe_check.md").write_text(md)
    print(md)


def table(res: dict, tok, obs: str, planned: list[str]) -> str:
    """The checks the runs so far allow (the others say which run they wait for)."""
    obs_d = obs + DENSE

    def same(a, b):
        if a not in res or b not in res:
            return "not run: " + ", ".join(t for t in (a, b) if t not in res)
        s = [x == y for x, y in zip(res[a]["tokens"], res[b]["tokens"])]
        return f"{sum(s)}/{len(s)} prompts identical"

    rows = [("dense triton: chunk 512 vs 8192 (what dense itself shows)",
             same("dense triton, chunk 512", "dense triton, chunk 8192")),
            (f"{obs}: chunk 512 vs 8192", same(f"{obs}, chunk 512", f"{obs}, chunk 8192")),
            (f"{obs}: chunk 1024 vs 8192", same(f"{obs}, chunk 1024", f"{obs}, chunk 8192")),
            (f"{obs}: radix on vs off (chunk 1024; every prompt here observes, so neither run reuses a prefix)",
             same(f"{obs}, chunk 1024", f"{obs}, chunk 1024, radix off")),
            (f"{obs} vs TCA without observe (chunk 1024: observe should change some answers)",
             same(f"{obs}, chunk 1024", "TCA, chunk 1024")),
            (f"{obs_d}: chunk 1024 vs 8192", same(f"{obs_d}, chunk 1024", f"{obs_d}, chunk 8192")),
            (f"{obs_d} vs {obs} (chunk 1024)", same(f"{obs_d}, chunk 1024", f"{obs}, chunk 1024"))]
    for tag in ("dense triton, chunk 512", "TCA, chunk 1024", f"{obs}, chunk 1024", f"{obs_d}, chunk 1024"):
        if tag in res:
            hits = [str(k) in tok.decode(t) for k, t in zip(KEYS * 2, res[tag]["tokens"][:6])]
            rows.append((f"passkeys found, {tag} (4K, 8K)", f"{sum(hits[:3])}/3, {sum(hits[3:])}/3"))
    if f"{obs}, chunk 1024" in res:
        r = res[f"{obs}, chunk 1024"]
        m = r["memory"]
        rows.append((f"{obs}, chunk 1024: cached tokens per prompt (observing prompts reuse nothing)",
                     str(r["cached"])))
        rows.append((f"TCA memory after the {obs} run (chunk 1024; observing prompts leave no cached records)",
                     f"dense pool {m['dense_tokens']} tokens, store {m['store_pages']} pages ({m['store_used_pages']}"
                     f" in use by {m['records']} cached blocks)"))
    missing = [t for t in planned if t not in res]
    rows.append(("runs", f"{len(res)} of {len(planned)} ran" + (f"; not run: {', '.join(missing)}" if missing else "")))
    return "| check | result |\n|---|---|\n" + "".join(f"| {a} | {b} |\n" for a, b in rows)


if __name__ == "__main__":
    main()
