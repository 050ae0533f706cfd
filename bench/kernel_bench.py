"""GPU micro-benchmark: TCA sparse attention kernel vs dense causal flash attention of the same shape.

    python bench/kernel_bench.py                      # 8K and 32K, prefill + decode (bs 1, 16), ~30% kept, bf16
    python bench/kernel_bench.py --ctx 32768 --keep 0.2 --decode-bs 1 8 64 --json out.json

Per context length it times (ms per call, CUDA-graph replays by default, as SGLang runs decode):
  * prefill: one request, all ctx queries in one chunk (extend from position 0);
  * decode: bs requests, one query each at position ctx - 1.
Columns: tca (sparse lists with ~keep of each compressed block, heads differ), tca_all (the same kernel with every
compressed token kept: the kernel's dense cost), flash (dense causal: flash_attn if installed, else torch SDPA with the
flash backend; K/V contiguous and GQA-expanded outside the timing), speedup = flash / tca, and the share of the
dense KV the sparse run reads (sink + kept + window) / ctx.
Needs CUDA; sglang is not needed (only torch, triton and sglang_tca).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sglang_tca.algorithm import dense_start  # noqa: E402
from sglang_tca.kernels import tca_sparse_attention  # noqa: E402


def make_pool(bs, ctx, q_len, hq, hkv, d, b, w, keep, dtype, seed=0, contiguous=False):
    """A pool holding bs requests of ctx tokens each (shuffled slots) and per-(request, head) kept lists."""
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(seed)
    n_slots = bs * ctx + 64
    perm = torch.randperm(n_slots - 1, generator=g, device=dev) + 1
    if contiguous:
        perm = torch.arange(1, n_slots, device=dev)
    k_buf = torch.randn(n_slots, hkv, d, generator=g, device=dev).to(dtype)
    v_buf = torch.randn(n_slots, hkv, d, generator=g, device=dev).to(dtype)
    r2t = torch.zeros(bs + 1, ctx + 64, dtype=torch.int32, device=dev)
    r2t[1:, :ctx] = perm[: bs * ctx].view(bs, ctx).int()
    ds = dense_start(ctx, b, w)
    t = torch.arange(b, ds, device=dev)
    lists_sparse, lists_all = [], []
    for _ in range(bs):
        for h in range(hkv):
            share = keep * (0.5 + h / max(hkv - 1, 1))                  # heads differ, mean ~ keep
            lists_sparse.append(t[torch.rand(t.numel(), generator=g, device=dev) < share].int())
            lists_all.append(t.int())
    q = torch.randn(bs * q_len, hq, d, generator=g, device=dev).to(dtype)
    common = dict(q=q, k_buffer=k_buf, v_buffer=v_buf, req_to_token=r2t,
                  req_pool_indices=torch.arange(1, bs + 1, device=dev),
                  q_start_pos=torch.full((bs,), ctx - q_len, device=dev, dtype=torch.int32),
                  qo_indptr=torch.arange(0, bs + 1, device=dev, dtype=torch.int32) * q_len,
                  block=b, window=w, sm_scale=d ** -0.5)

    def lists(ls):
        return dict(kept_indptr=torch.tensor([0] + [len(x) for x in ls], device=dev).cumsum(0).int(),
                    kept_pos=torch.cat(ls))
    read = (min(b, ctx) + sum(len(x) for x in lists_sparse) / (bs * hkv) + (ctx - ds)) / ctx
    return common, lists(lists_sparse), lists(lists_all), read


def dense_fn(bs, ctx, q_len, hq, hkv, d, dtype):
    """Dense causal attention over contiguous K/V. Prefill: q_len == ctx; decode: q_len == 1.
    Prefers the flash_attn package (flash_attn_with_kvcache for decode, which splits the KV); else torch SDPA with the
    flash backend (GQA via enable_gqa, or K/V expanded outside the timing; SDPA's decode does not split the KV, so it
    is a weak decode baseline: compare decode with the tca_all column too)."""
    dev = "cuda"
    q = torch.randn(bs, q_len, hq, d, device=dev, dtype=dtype)
    k = torch.randn(bs, ctx, hkv, d, device=dev, dtype=dtype)
    v = torch.randn(bs, ctx, hkv, d, device=dev, dtype=dtype)
    try:
        import flash_attn  # type: ignore  # noqa: F401
        from flash_attn import flash_attn_func, flash_attn_with_kvcache  # type: ignore
        if q_len == 1:
            return "flash_attn_kvcache", lambda: flash_attn_with_kvcache(q, k, v, causal=True)
        return "flash_attn", lambda: flash_attn_func(q, k, v, causal=True)
    except Exception:
        pass
    from torch.nn.attention import SDPBackend, sdpa_kernel
    causal = q_len > 1
    if causal and q_len != ctx:
        raise ValueError("SDPA baseline supports q_len == ctx (prefill) or q_len == 1 (decode)")
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()

    def gqa():
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, enable_gqa=True)
    try:
        gqa()
        torch.cuda.synchronize()
        return "sdpa_flash_gqa", gqa
    except Exception:
        pass
    g = hq // hkv
    ke, ve = kt.repeat_interleave(g, 1), vt.repeat_interleave(g, 1)

    def expanded():
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return torch.nn.functional.scaled_dot_product_attention(qt, ke, ve, is_causal=causal)
    return "sdpa_flash_expanded", expanded


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ctx", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--decode-bs", type=int, nargs="*", default=[1, 16])
    ap.add_argument("--no-prefill", action="store_true")
    ap.add_argument("--keep", type=float, default=0.3, help="mean kept share of each compressed block")
    ap.add_argument("--hq", type=int, default=32)
    ap.add_argument("--hkv", type=int, default=8)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--block-m", type=int, default=None)
    ap.add_argument("--block-n", type=int, default=None)
    ap.add_argument("--splits", type=int, default=None, help="num_kv_splits (default: the kernel's heuristic)")
    ap.add_argument("--num-warps", type=int, default=None)
    ap.add_argument("--num-stages", type=int, default=None)
    ap.add_argument("--contiguous", action="store_true",
                    help="give each request contiguous slots (what SGLang's allocator mostly does); default shuffled")
    ap.add_argument("--no-dense", action="store_true", help="skip the tca_all and dense columns (tuning)")
    ap.add_argument("--no-graph", action="store_true",
                    help="time eager launches (do_bench) instead of CUDA-graph replays (do_bench_cudagraph); eager "
                         "small decodes then measure the Python launch overhead, not the GPU")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    assert torch.cuda.is_available(), "kernel_bench needs a CUDA GPU"
    from triton.testing import do_bench, do_bench_cudagraph

    def bench(fn):
        if a.no_graph:
            return do_bench(fn)
        fn()                                  # compile / autotune outside the capture
        torch.cuda.synchronize()
        return do_bench_cudagraph(fn)

    dtype = torch.bfloat16
    rows = []
    cases = []
    for ctx in a.ctx:
        if not a.no_prefill:
            cases.append(("prefill", 1, ctx, ctx))
        for bs in a.decode_bs:
            cases.append(("decode", bs, ctx, 1))
    print(f"{torch.cuda.get_device_name()}  {'eager' if a.no_graph else 'cuda graph'}  Hq={a.hq} Hkv={a.hkv} D={a.d} b={a.block} w={a.window} keep~{a.keep}")
    hdr = f"{'mode':8} {'bs':>3} {'ctx':>6} {'read':>6} {'tca ms':>9} {'tca_all ms':>10} {'dense ms':>9} {'speedup':>7}  dense"
    print(hdr)
    print("-" * len(hdr))
    for mode, bs, ctx, q_len in cases:
        common, sparse, full, read = make_pool(bs, ctx, q_len, a.hq, a.hkv, a.d, a.block, a.window, a.keep, dtype,
                                               contiguous=a.contiguous)
        kw = dict(max_q_len=q_len, num_kv_splits=a.splits, block_m=a.block_m, block_n=a.block_n,
                  num_warps=a.num_warps, num_stages=a.num_stages)
        out = torch.empty(bs * q_len, a.hq, a.d, device="cuda", dtype=dtype)
        t_sp = bench(lambda: tca_sparse_attention(**common, **sparse, out=out, **kw))
        if a.no_dense:
            t_all, t_d, name = float("nan"), float("nan"), "-"
        else:
            t_all = bench(lambda: tca_sparse_attention(**common, **full, out=out, **kw))
            name, fn = dense_fn(bs, ctx, q_len, a.hq, a.hkv, a.d, dtype)
            t_d = bench(fn)
        row = dict(mode=mode, bs=bs, ctx=ctx, read=read, tca_ms=t_sp, tca_all_ms=t_all, dense_ms=t_d, dense=name,
                   speedup=t_d / t_sp)
        rows.append(row)
        print(f"{mode:8} {bs:>3} {ctx:>6} {read:>6.1%} {t_sp:>9.3f} {t_all:>10.3f} {t_d:>9.3f} {t_d / t_sp:>6.2f}x  {name}")
        del common, sparse, full, out
        torch.cuda.empty_cache()
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), args=vars(a), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
