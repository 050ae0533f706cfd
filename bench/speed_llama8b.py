"""Speed on a Llama-3.1-8B-shaped model with dummy weights: TCA vs dense SGLang backends, same machine, same run.

    python bench/speed_llama8b.py --backends tca triton [flashinfer] [--out DIR]

Budgets: `synthetic_budgets()` gives every (layer, KV head) one fixed keep count k in {4, 8, 16, 32} of b = 64
(heterogeneous across heads, mean kept share of compressed blocks 0.23): dummy weights have no meaningful attention
to calibrate on, and a fixed k makes the kept fraction exact. Per backend, one Engine: TTFT and decode ms/token at
32K and 126K prompt tokens (bs 1, after a warm-up of the same shape), then 8 concurrent 32K requests. Appends one
JSON line per backend to DIR/speed.jsonl and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MODEL = ROOT / "bench" / "llama31_8b"
KS = (4, 8, 16, 32, 8, 16, 4, 32)


def synthetic_budgets(path: Path, ks=KS):
    """Budgets where (layer l, KV head h) keeps exactly ks[(l + h) % len(ks)] tokens of every compressed block."""
    import math

    import torch

    from sglang_tca.budgets import Budgets, ModelShape

    shape = ModelShape.from_hf_config(json.loads((MODEL / "config.json").read_text()))
    L, H, kn = shape.num_layers, shape.num_kv_heads, 7
    P = torch.zeros(L, H, kn)
    T = torch.empty(L, H, kn - 1)
    for l in range(L):
        for h in range(H):
            m = int(math.log2(ks[(l + h) % len(ks)]))
            P[l, h, m] = 1
            T[l, h, :m], T[l, h, m:] = -math.inf, math.inf          # every block keeps exactly 2**m tokens
    b = Budgets(shape, 64, 1024, float("nan"), "block_last", "neff", P, T, {"synthetic": f"fixed k per head {ks}"})
    b.save(path)
    return b


def run(backend, out: Path):
    from sglang_tca.config import TCAConfig
    from sglang_tca.engine import Engine

    tca = TCAConfig(budgets=str(out / "llama8b_budgets.json")) if backend == "tca" else None
    t0 = time.time()
    eng = Engine(model_path=str(MODEL), load_format="dummy", skip_tokenizer_init=True, attention_backend=backend,
                 tca=tca, context_length=131072, mem_fraction_static=0.85, disable_prefill_cuda_graph=True,
                 cuda_graph_max_bs_decode=8, log_level="error")
    res = {"backend": backend, "start_s": round(time.time() - t0, 1)}
    import random

    rnd = random.Random(0)
    ids = lambda n: [rnd.randrange(1000, 120000) for _ in range(n)]  # noqa: E731

    def gen(prompts, new):
        t = time.time()
        eng.generate(input_ids=prompts, sampling_params={"temperature": 0, "max_new_tokens": new, "ignore_eos": True})
        return time.time() - t

    try:
        for n, tag in ((32768, "32k"), (126976, "126k")):
            p = ids(n)
            gen([p], 1)                                                   # warm-up (JIT, shapes)
            eng.flush_cache()
            ttft = gen([ids(n)], 1)
            eng.flush_cache()
            full = gen([ids(n)], 129)
            eng.flush_cache()
            res[f"ttft_{tag}_s"] = round(ttft, 3)
            res[f"decode_{tag}_ms"] = round((full - ttft) / 128 * 1000, 2)
            print(f"[speed] {backend} {tag}: ttft {ttft:.2f}s decode {(full - ttft) / 128 * 1000:.2f} ms/token",
                  flush=True)
        res["conc8_32k_s"] = round(gen([ids(32768) for _ in range(8)], 64), 2)
        print(f"[speed] {backend} 8x32k: {res['conc8_32k_s']}s", flush=True)
    finally:
        eng.shutdown()
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backends", nargs="+", default=["tca", "triton", "flashinfer"])
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/speed"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    b = synthetic_budgets(out / "llama8b_budgets.json")
    import torch

    dev = torch.cuda.get_device_name()
    for be in args.backends:
        r = run(be, out)
        r.update(device=dev, kept_32k=round(b.expected_kept(32768), 3) if be == "tca" else 1.0,
                 kept_126k=round(b.expected_kept(126976), 3) if be == "tca" else 1.0)
        with open(out / "speed.jsonl", "a") as f:
            f.write(json.dumps(r) + "\n")
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
