"""Budgets for the Llama-3.1-8B-shaped model with dummy weights (bench/llama31_8b), used by the speed and memory
benchmarks: dummy weights have no attention worth calibrating, so every (layer l, KV head h) keeps exactly
ks[(l + h) % len(ks)] of the 64 tokens of each compressed block (heterogeneous across heads, the kept share exact).

KS = (8, 16, 32, 16, 8, 32, 16, 32): mean 20 of 64 = 0.3125 of each compressed block.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

MODEL = Path(__file__).resolve().parent / "llama31_8b"
KS = (8, 16, 32, 16, 8, 32, 16, 32)


def synthetic_budgets(path: Path, ks=KS):
    """Write (and return) budgets where (layer l, KV head h) keeps exactly ks[(l + h) % len(ks)] tokens of every
    compressed block (each a power of two <= 64)."""
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
