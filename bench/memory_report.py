"""bench/results/memory.{md,json} from the JSON lines of `bench/memory_bench.py run` (one file per GPU call).

    python bench/memory_bench.py report --runs bench/results/memory_runs/h200_2026-12-01.jsonl [...]

The last record of each (part, backend) wins. A part that has no TCA and flashinfer record from the same call is
reported as not run (null) with the reason, never filled in from another call.
"""
from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
COMMAND = ("source .gpu/env.sh && SKIP_GPU_TESTS=1 bash bench/gpu_memory.sh memory gsp   "
           "(carry .gpu .tok .client; runs `python bench/memory_bench.py run --parts memory gsp`)")


def _pair(recs, part, key):
    got = {b: recs.get((part, b), {}).get(key) for b in ("tca", "flashinfer")}
    return got if all(v is not None for v in got.values()) else None


def report(run_files: list[Path], out_dir: Path = RESULTS) -> dict:
    recs, sources = {}, []
    for f in run_files:
        sources.append(str(f.relative_to(ROOT)) if f.is_absolute() and ROOT in f.parents else str(f))
        for line in f.read_text().splitlines():
            r = json.loads(line)
            if "error" not in r:
                recs[(r["part"], r["backend"])] = r
    mem_t, mem_d = recs.get(("memory", "tca")), recs.get(("memory", "flashinfer"))
    if not (mem_t and mem_d):
        raise SystemExit("error: the runs hold no memory part for both tca and flashinfer")
    dense_bpt = mem_d["kv_bytes_per_token_128k"]
    conc = {"tca": mem_t["max_concurrent_128k"], "flashinfer": mem_d["max_concurrent_128k"]}
    not_run = "not run: the session's GPU time ended before this part (bench/memory_bench.py --parts {})"
    req_s = {}
    for part, name in (("random", "memory_bound_req_s"), ("gsp", "agent_req_s")):
        req_s[name] = _pair(recs, part, "request_throughput") or {"tca": None, "flashinfer": None,
                                                                   "note": not_run.format(part)}
    run = mem_t["tca_running_128k"]
    out = {
        "device": mem_t["device"], "date": mem_t["date"], "sources": sources, "command": COMMAND,
        "model": "Llama-3.1-8B shape (bench/llama31_8b), dummy weights, bf16 KV",
        "budgets": "synthetic: (layer l, KV head h) keeps KS[(l + h) % 8] of each block's 64 tokens, "
                   "KS = (8, 16, 32, 16, 8, 32, 16, 32), mean kept share 0.3125; window 1024, block 64",
        "mem_fraction_static": mem_t["mem_fraction_static"],
        "kv_bytes_per_token_128k": {"tca": round(mem_t["kv_bytes_per_token_128k"]), "flashinfer": round(dense_bpt)},
        "kv_bytes_per_token_ratio_128k": round(mem_t["kv_bytes_per_token_128k"] / dense_bpt, 4),
        "kv_bytes_per_token_ratio_128k_with_cached_windows":
            round(mem_t["kv_bytes_per_token_128k_with_cached_windows"] / dense_bpt, 4),
        "store_bytes_per_token_ratio_128k": round(mem_t["store_bytes_per_token_128k"] / dense_bpt, 4),
        "dense_tokens_held_128k": run["dense_used_tokens"] - run["dense_evictable_tokens"],
        "dense_tokens_cached_evictable_128k": run["dense_evictable_tokens"],
        "max_concurrent_128k": conc,
        "max_concurrent_128k_ratio": round(conc["tca"] / conc["flashinfer"], 3),
        "concurrent_sent": mem_t["concurrent_sent"],
        "token_capacity": {"tca_logical_ids": mem_t["token_capacity"], "flashinfer": mem_d["token_capacity"]},
        **req_s,
        "cache_hit_rate_gsp": _pair(recs, "gsp", "cache_hit_rate"),
        "server_start_s": {"tca": mem_t["server_start_s"], "flashinfer": mem_d["server_start_s"]},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "memory.json").write_text(json.dumps(out, indent=1) + "\n")
    (out_dir / "memory.md").write_text(_markdown(out, run))
    print((out_dir / "memory.md").read_text())
    return out


def _fmt_pair(p, unit=""):
    if p is None or p.get("tca") is None:
        return "not run", "", ""
    return f"{p['tca']}{unit}", f"{p['flashinfer']}{unit}", f"{p['tca'] / p['flashinfer']:.2f}"


def _markdown(o: dict, run: dict) -> str:
    b = o["kv_bytes_per_token_128k"]
    rows = [
        ("KV bytes per token, one 128K request while it decodes (held: store rows, tables, its dense window)",
         f"{b['tca']}", f"{b['flashinfer']}", f"{o['kv_bytes_per_token_ratio_128k']:.3f}"),
        ("... also counting the cached dense windows at its prefill chunks' ends (evictable)",
         f"{round(o['kv_bytes_per_token_ratio_128k_with_cached_windows'] * b['flashinfer'])}", f"{b['flashinfer']}",
         f"{o['kv_bytes_per_token_ratio_128k_with_cached_windows']:.3f}"),
        ("... of which the compressed store", f"{round(o['store_bytes_per_token_ratio_128k'] * b['flashinfer'])}",
         "", f"{o['store_bytes_per_token_ratio_128k']:.3f}"),
        (f"128K requests running at once ({o['concurrent_sent']} sent together)",
         str(o["max_concurrent_128k"]["tca"]), str(o["max_concurrent_128k"]["flashinfer"]),
         f"{o['max_concurrent_128k_ratio']:.2f}"),
        ("bench_serving random-ids, 128 x 16K in / 1024 out: request throughput (req/s)",
         *_fmt_pair(o["memory_bound_req_s"])),
        ("bench_serving generated-shared-prefix, 3 turns: request throughput (req/s)", *_fmt_pair(o["agent_req_s"])),
    ]
    table = "".join(f"| {a} | {t} | {d} | {r} |\n" for a, t, d, r in rows)
    return f"""# Memory: TCA (freed KV) vs dense SGLang (flashinfer)

{o['device']}, {o['date']}, sglang 0.5.17, torch 2.11.0+cu130, same call, same `--mem-fraction-static
{o['mem_fraction_static']}`. {o['model']}. Budgets: {o['budgets']}.
Command: `{o['command']}`. Raw records: {', '.join(f'`{s}`' for s in o['sources'])}; `memory.json` beside this.

| measure | TCA | flashinfer | TCA / flashinfer |
|---|---|---|---|
{table}
How it is read. TCA's numbers come from its pools (`/get_server_info` -> `internal_states` -> `tca`), sampled while
the 128K request (130,816 prompt tokens) decodes: {run['store_used_pages']} store pages of {run['page_bytes']} bytes,
{o['dense_tokens_held_128k']} dense tokens held (its window and the prompt's locked last window) plus
{o['dense_tokens_cached_evictable_128k']} dense tokens that the radix cache keeps at the end of each 8,192-token
prefill chunk (a later request can reuse the prefix up to there; SGLang evicts them before it refuses or retracts
anything), and the logical pages' tables. Dense bytes per token are its KV pool over its token capacity. Concurrency:
17 requests of 128K sent at once, 64 output tokens each; the most running at once from `/v1/loads` (TCA) and dense's
pool capacity in whole 128K requests (dense holds every token, so this is exact). TCA's split at start: dense pool
{run['dense_bytes'] / 2**30:.2f} GiB ({run['dense_tokens']} tokens), compressed store {run['store_bytes'] / 2**30:.2f} GiB,
tables and buffers {run['table_bytes'] / 2**30:.2f} GiB.

Not run this session: the two `bench_serving` parts (random-ids, multi-turn generated-shared-prefix); the GPU time
ended after the memory part (dense's server start took 211 s in this call). `bench/memory_bench.py run --parts random
gsp` runs them.
"""
