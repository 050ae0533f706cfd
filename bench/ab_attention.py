"""A/B of TCA's decode attention kernel: another revision's sparse_attention.py against the working tree's, on the
same `kernel_bench.DecodeCase` (Llama-3.1-8B attention shape, bf16, ~25% kept, req_to_token as wide as a 128K
context), each timed as kernel_bench times a piece (CUDA-graph replay, ms per layer call), in the order old, new,
old, new.

    git show REV:sglang_tca/kernels/sparse_attention.py > /tmp/old_sa.py
    python bench/ab_attention.py --old /tmp/old_sa.py [--cases 4096x1 32768x1 4096x32 16384x32]     (GPU)
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
import kernel_bench as kb  # noqa: E402
from sglang_tca.kernels import sparse_attention as new  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", required=True, help="the other revision's sparse_attention.py")
    ap.add_argument("--cases", nargs="+", default=["4096x1", "32768x1", "4096x32", "16384x32"], help="CTXxBS")
    a = ap.parse_args()
    spec = importlib.util.spec_from_file_location("old_sparse_attention", a.old)
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    print(f"decode attention, {torch.cuda.get_device_name()}: us per layer call (old, new, old, new)")
    for case_s in a.cases:
        ctx, bs = (int(x) for x in case_s.split("x"))
        case = kb.DecodeCase(ctx, bs, 32, 8, 128, 64, 1024, 0.25, torch.bfloat16, "cuda", 4, table_ctx=131072)

        def attend(mod):
            def fn(l):
                indptr, kept, _ = case.lists[l]
                return mod.tca_sparse_attention(
                    case.q, case.arena_k, case.arena_v, case.plan.dense_base(l), case.hkv, case.l2d, case.r2t,
                    case.rows, case.pos, case.qo_indptr, indptr, kept, None, case.block, case.window, case.scale,
                    out=case.out, dense_slots=case.dense_slots, dense_first=case.dense_first, max_q_len=1)
            return fn

        times = [kb.graph_ms(attend(m), 4) * 1000 for m in (old, new, old, new)]
        ref = attend(old)(0).clone()
        diff = (attend(new)(0).float() - ref.float()).abs().max().item()
        print(f"ctx={ctx} bs={bs} old={times[0]:.1f}us new={times[1]:.1f}us old={times[2]:.1f}us "
              f"new={times[3]:.1f}us |new-old|={diff:.1e}", flush=True)
        del case
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
