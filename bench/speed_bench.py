"""Speed: TCA (freed KV) vs dense SGLang (flashinfer), Llama-3.1-8B shape with dummy weights, same machine, same job.

    python bench/speed_bench.py run [--parts engine serving] [--backends tca flashinfer] [--deadline-s S] [--out DIR]
                                    [--contexts N ...] [--batched BSxN ...]     (engine shapes; default all)
    python bench/speed_bench.py report --runs FILE [FILE ...]      (here: writes bench/results/speed.{md,json,png})

Budgets: bench/synthetic_budgets.py (every (layer, KV head) keeps a fixed 8..32 of each block's 64 tokens, mean kept
share of compressed blocks 0.3125, the same as the memory benchmark). Both backends get the same flags and
--mem-fraction-static 0.85, the prefill CUDA graph off (TCA runs prefill without it), decode CUDA graphs on.
Parts, per backend (TCA first):
  engine   one `sglang_tca.engine.Engine` (context 131072, chunked prefill 8192, decode graphs up to bs 32), fresh
           random prompts every time (no cache hits), each shape warmed up once first, every request streamed
           (`Engine.async_generate`, a timestamp per chunk) with N = 128 new tokens:
             bs 1 at every context length of CONTEXTS: TTFT = time to the first streamed token, decode ms/token =
             the time from the first to the last token over the tokens between; median of REPEATS;
             batched decode (BATCHED: 32 x 4K, 16 x 32K): tokens/s in the window where every request of the
             batch decodes (from the last first token to the first last token; `decode_rate`);
  serving  one `launch.py` server and SGLang's own client: `bench_serving --dataset-name random-ids`, 32K in /
           512 out, 32 prompts, --max-concurrency 8: output tokens/s.
Ratios (report): flashinfer time / TCA time for TTFT and decode ms/token, TCA / flashinfer for throughputs (above 1
means TCA is faster). Results: one JSON line per (part, backend) in DIR/speed_runs.jsonl.
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
from paired_runs import cli, run_parts  # noqa: E402
from synthetic_budgets import MODEL, synthetic_budgets  # noqa: E402

ENGINE_CONTEXT = 131072                           # the engine part's context length
CONTEXTS = (1024, 4096, 16384, 32768, 130048)     # 130048 + the generated tokens fit the 131072 context
BATCHED = ((32, 4096), (16, 32768))
DECODE_TOKENS = 128
REPEATS = 3
MEM_FRACTION = 0.85
SERVING_FLAGS = ["--cuda-graph-max-bs", "8"]
SERVING_BENCH = ["--dataset-name", "random-ids", "--random-input-len", "32768", "--random-output-len", "512",
                 "--random-range-ratio", "1.0", "--num-prompts", "32", "--max-concurrency", "8",
                 "--request-rate", "inf"]
ESTIMATE_S = {"engine": {"tca": 330, "flashinfer": 400}, "serving": {"tca": 230, "flashinfer": 260}}


def decode_rate(marks: list[list[tuple[float, int]]]) -> tuple[float, float]:
    """(seconds, tokens) of the window in which every request of a batch decodes: from the last first token to the
    first last token, and the tokens the requests produced in it. marks[r] = [(time, completion tokens so far)] of
    request r's streamed chunks, in order."""
    t0, t1 = max(m[0][0] for m in marks), min(m[-1][0] for m in marks)

    def tokens_at(m, t):
        return max(n for s, n in m if s <= t)

    return t1 - t0, sum(tokens_at(m, t1) - tokens_at(m, t0) for m in marks)


def part_engine(backend: str, out: Path, contexts=CONTEXTS, batched=BATCHED) -> dict:
    import asyncio

    from sglang_tca.config import TCAConfig
    from sglang_tca.engine import Engine

    tca = TCAConfig(budgets=str(out / "budgets.json")) if backend == "tca" else None
    t0 = time.time()
    eng = Engine(model_path=str(MODEL), load_format="dummy", skip_tokenizer_init=True, attention_backend=backend,
                 tca=tca, context_length=ENGINE_CONTEXT, mem_fraction_static=MEM_FRACTION, disable_prefill_cuda_graph=True,
                 cuda_graph_max_bs_decode=32, log_level="error")
    res = {"start_s": round(time.time() - t0, 1), "contexts": {}, "batched": {}}
    rnd = random.Random(0)

    def stream(bs, n, new):
        """bs fresh random prompts of n tokens, streamed: each request's [(seconds since the start, tokens)]."""
        params = {"temperature": 0, "max_new_tokens": new, "ignore_eos": True}

        async def one(ids):
            marks = []
            async for chunk in await eng.async_generate(input_ids=ids, sampling_params=params, stream=True):
                marks.append((time.perf_counter() - start, chunk["meta_info"]["completion_tokens"]))
            return marks

        async def batch():
            return await asyncio.gather(*[one(p) for p in prompts])

        prompts = [[rnd.randrange(1000, 120000) for _ in range(n)] for _ in range(bs)]
        start = time.perf_counter()
        marks = eng.loop.run_until_complete(batch())
        eng.flush_cache()
        return marks

    try:
        for n in contexts:
            stream(1, n, DECODE_TOKENS + 1)                               # warm-up of the shape
            ttft, dec = [], []
            for _ in range(REPEATS):
                marks = stream(1, n, DECODE_TOKENS + 1)
                secs, toks = decode_rate(marks)
                ttft.append(marks[0][0][0])
                dec.append(secs / toks * 1000)
            res["contexts"][str(n)] = {"ttft_s": round(statistics.median(ttft), 4),
                                       "decode_ms": round(statistics.median(dec), 3),
                                       "ttft_all_s": [round(x, 4) for x in ttft], "decode_all_ms": [round(x, 3) for x in dec]}
            print(f"[speed] {backend} {n}: {res['contexts'][str(n)]}", flush=True)
        for bs, n in batched:
            stream(bs, n, 8)                                              # warm-up
            secs, toks = decode_rate(stream(bs, n, DECODE_TOKENS + 1))
            res["batched"][f"{bs}x{n}"] = {"decode_tok_s": round(toks / secs, 1), "window_s": round(secs, 3),
                                          "window_tokens": toks}
            print(f"[speed] {backend} {bs}x{n}: {res['batched'][f'{bs}x{n}']}", flush=True)
    finally:
        eng.shutdown()
    return res


def part_serving(backend: str, out: Path, port: int) -> dict:
    from memory_bench import Server, bench_serving

    srv = Server(backend, out, port, SERVING_FLAGS, "speed_serving")
    try:
        return {"server_start_s": srv.start_s, **bench_serving(srv, SERVING_BENCH, out, "speed")}
    finally:
        srv.stop()


def run(args):
    budgets = synthetic_budgets(Path(args.out) / "budgets.json")

    batched = args.batched
    def base(part, backend):
        rec = {"mem_fraction_static": MEM_FRACTION}
        if part == "engine" and backend == "tca":
            rec["kept"] = {str(n): round(budgets.expected_kept(n), 4) for n in args.contexts}
        return rec

    run_parts("speed", args, ESTIMATE_S, lambda part, backend, i: part_engine(backend, Path(args.out), args.contexts,
                                                                             batched)
              if part == "engine" else part_serving(backend, Path(args.out), 30000 + i), base)


def batch_shape(text: str) -> tuple[int, int]:
    """BSxLEN, e.g. 32x4096."""
    try:
        bs, n = (int(x) for x in text.split("x"))
        if bs > 0 and n > 0:
            return bs, n
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected BSxLEN with positive integers (e.g. 32x4096), got {text!r}")


def context_length(text: str) -> int:
    longest = ENGINE_CONTEXT - DECODE_TOKENS - 1                   # the prompt and its generated tokens fit
    if text.isdigit() and 0 < int(text) <= longest:
        return int(text)
    raise argparse.ArgumentTypeError(f"expected a context length of 1..{longest} tokens (the engine's context is "
                                     f"{ENGINE_CONTEXT}), got {text!r}")


def engine_args(ap):
    """The engine part's shapes (default: all; fewer for a shorter job)."""
    ap.add_argument("--contexts", type=context_length, nargs="+", default=list(CONTEXTS), help="bs-1 context lengths")
    ap.add_argument("--batched", nargs="*", type=batch_shape, default=list(BATCHED),
                    help="batched decode shapes BSxLEN")


def main():
    from speed_report import report

    cli(__doc__, "speed", list(ESTIMATE_S), run, report, extra=engine_args)


if __name__ == "__main__":
    main()
