"""Where a short prefill's time goes: TCA vs dense SGLang (flashinfer), one Engine each, SGLang's torch profiler.

    python bench/profile_prefill.py [--contexts 1024 4096] [--out DIR]      (GPU; Llama-3.1-8B shape, dummy weights)

Per backend (TCA first), one `sglang_tca.engine.Engine` with bench/speed_bench.py's settings (synthetic budgets,
context 131072, --mem-fraction-static 0.85, prefill CUDA graph off), and per context length: a warm-up, TTFT of
REPEATS fresh random prompts (max_new_tokens 1, unprofiled, median), then PROFILED more prompts under
`Engine.start_profile` (CPU + GPU activities) / `stop_profile`. Every prompt is streamed with NEW_TOKENS new tokens
and TTFT is the time to its first token. From each trace, per prompt (prefill and one decode step): GPU kernel time
(sum of kernel durations), the time the GPU was busy (union), kernels launched, the CUDA runtime calls the host spent
most time in, and the kernels by name; with --with-stack also which sglang / sglang_tca Python frames made the
synchronising calls (cudaDeviceSynchronize, stream and event synchronisations, copies) and how long they waited.
TTFT minus what the prefill's kernels take is what the host side (scheduling, Python, synchronisations, launches
not hidden behind GPU work) adds.
Writes DIR/profile_prefill.json and prints a table per context length, TCA's top kernels next to flashinfer's.
"""
from __future__ import annotations

import argparse
import bisect
import gzip
import json
import random
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
from speed_bench import MEM_FRACTION  # noqa: E402
from synthetic_budgets import MODEL, synthetic_budgets  # noqa: E402

REPEATS = 3
PROFILED = 3
NEW_TOKENS = 2            # the first token, then one decode step (a request that ends at once frees at once)
TOP = 12


def kernel_summary(trace_dir: Path, prompts: int) -> dict:
    """Per prompt, from the torch-profiler traces under trace_dir: GPU kernel time and count, the time the GPU ran
    any kernel (union of their intervals), the CUDA runtime calls the host spent most time in (synchronisations and
    blocking copies show here), and the kernels by name."""
    files = sorted(p for p in trace_dir.rglob("*") if p.name.endswith((".json", ".json.gz")))
    if not files:
        raise RuntimeError(f"no profiler trace under {trace_dir}")
    by_name, runtime, spans, total, waits = Counter(), Counter(), [], 0.0, Counter()
    for f in files:
        data = json.loads((gzip.open if f.name.endswith(".gz") else open)(f, "rt").read())
        frames, syncs = {}, []
        for e in data.get("traceEvents", []):
            if e.get("ph") != "X":
                continue
            if e.get("cat") == "kernel":
                by_name[e["name"][:90]] += e.get("dur", 0.0)
                total += e.get("dur", 0.0)
                spans.append((e["ts"], e["ts"] + e.get("dur", 0.0)))
            elif e.get("cat") == "cuda_runtime":
                runtime[e["name"]] += e.get("dur", 0.0)
                if e["name"] in WAITS:
                    syncs.append(e)
            elif e.get("cat") == "python_function":
                frames.setdefault((e.get("pid"), e.get("tid")), []).append(
                    (e["ts"], e["ts"] + e.get("dur", 0.0), e["name"]))
        threads = {k: _Frames(v) for k, v in frames.items()}
        for e in syncs:                                   # with --with-stack: who waited
            waits[threads.get((e.get("pid"), e.get("tid")), _Frames([])).caller(e)] += e.get("dur", 0.0)
    busy, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        busy += max(b - max(a, end), 0.0)
        end = max(end, b)
    per = lambda us: round(us / 1000 / prompts, 3)  # noqa: E731
    return {"files": [f.name for f in files], "gpu_ms_per_prompt": per(total), "gpu_busy_ms_per_prompt": per(busy),
            "kernels_per_prompt": round(len(spans) / prompts, 1),
            "runtime_top": [(n, per(us)) for n, us in runtime.most_common(6)],
            "waits_top": [(n, per(us)) for n, us in waits.most_common(8)],
            "top": [(n, per(us)) for n, us in by_name.most_common(TOP)]}


WAITS = ("cudaDeviceSynchronize", "cudaStreamSynchronize", "cudaEventSynchronize", "cudaMemcpyAsync", "cudaMemcpy")


class _Frames:
    """One thread's python_function events (start, end, name), sorted by start, for enclosing-frame lookups."""

    def __init__(self, frames):
        self.frames = sorted(frames)
        self.starts = [f[0] for f in self.frames]

    def caller(self, e: dict, depth: int = 2, look_back: int = 20000) -> str:
        """The innermost `depth` frames of sglang or sglang_tca that enclose the runtime call e, innermost first;
        "?" without any (a trace taken without --with-stack)."""
        t0, t1 = e["ts"], e["ts"] + e.get("dur", 0.0)
        last = bisect.bisect_right(self.starts, t0) - 1
        names = [n for a, b, n in (self.frames[i] for i in range(last, max(last - look_back, -1), -1))
                 if b >= t1 and "sglang" in n]
        return " < ".join(names[:depth]) or "?"


def profile_backend(backend: str, contexts: list[int], out: Path, with_stack: bool = False) -> dict:
    from sglang_tca.config import TCAConfig
    from sglang_tca.engine import Engine

    tca = TCAConfig(budgets=str(out / "budgets.json")) if backend == "tca" else None
    eng = Engine(model_path=str(MODEL), load_format="dummy", skip_tokenizer_init=True, attention_backend=backend,
                 tca=tca, context_length=131072, mem_fraction_static=MEM_FRACTION, disable_prefill_cuda_graph=True,
                 cuda_graph_max_bs_decode=8, log_level="error")
    rnd = random.Random(1)
    params = {"temperature": 0, "max_new_tokens": NEW_TOKENS, "ignore_eos": True}

    def prefill(n: int) -> float:
        """One fresh random prompt of n tokens, streamed: seconds to its first token (as bench/speed_bench.py)."""
        ids = [rnd.randrange(1000, 120000) for _ in range(n)]

        async def one():
            t0, first = time.perf_counter(), None
            async for _ in await eng.async_generate(input_ids=ids, sampling_params=params, stream=True):
                first = first or time.perf_counter() - t0
            return first

        return eng.loop.run_until_complete(one())

    res = {}
    try:
        for n in contexts:
            prefill(n)                                                   # warm-up of the shape
            ttft = [prefill(n) for _ in range(REPEATS)]
            trace_dir = out / f"trace_{backend}_{n}"
            eng.start_profile(output_dir=str(trace_dir), activities=["CPU", "GPU"], with_stack=with_stack)
            for _ in range(PROFILED):
                prefill(n)
            eng.stop_profile()
            time.sleep(2)                                                # the trace is written by the scheduler
            res[str(n)] = {"ttft_s": round(statistics.median(ttft), 4), **kernel_summary(trace_dir, PROFILED)}
            print(f"[profile] {backend} {n}: ttft {res[str(n)]['ttft_s']} s, GPU "
                  f"{res[str(n)]['gpu_ms_per_prompt']} ms, {res[str(n)]['kernels_per_prompt']} kernels", flush=True)
    finally:
        eng.shutdown()
    return res


def table(results: dict, n: str) -> str:
    lines = [f"context {n}"]
    for b, r in results.items():
        x = r.get(n)
        if not x:
            continue
        lines.append(f"  {b}: TTFT {x['ttft_s'] * 1000:.1f} ms; per prompt GPU kernels {x['gpu_ms_per_prompt']:.2f} ms"
                     f" (busy {x['gpu_busy_ms_per_prompt']:.2f} ms, {x['kernels_per_prompt']:.0f} launches); host "
                     "runtime calls: " + ", ".join(f"{n} {ms:.2f}" for n, ms in x["runtime_top"]))
        for name, ms in x.get("waits_top", []):
            if name != "?":
                lines.append(f"      waited {ms:8.3f} ms  {name[:140]}")
        for name, ms in x["top"]:
            lines.append(f"      {ms:8.3f} ms  {name}")
    return "\n".join(lines)


def main():
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--backends", nargs="+", default=["tca", "flashinfer"])
    ap.add_argument("--out", default="/tmp/profile_prefill")
    ap.add_argument("--with-stack", action="store_true",
                    help="record Python frames: the summary then names who waited in each synchronising call")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    synthetic_budgets(out / "budgets.json")
    results = {}
    for b in a.backends:
        try:
            results[b] = profile_backend(b, a.contexts, out, a.with_stack)
        except Exception as e:                           # keep the other backend's numbers
            results[b] = {"error": f"{type(e).__name__}: {e}"}
            print(f"[profile] {b} failed: {results[b]['error']}", flush=True)
    rec = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "results": results}
    (out / "profile_prefill.json").write_text(json.dumps(rec, indent=1))
    for n in a.contexts:
        print(table(results, str(n)))


if __name__ == "__main__":
    main()
