"""GPU micro-benchmarks of TCA's attention kernels, and a per-piece breakdown of TCA's decode step.

Default mode: TCA sparse attention kernel vs dense causal flash attention of the same shape.

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

Decode breakdown (--decode-breakdown): where the time of one TCA decode step goes, per layer, next to SGLang's dense
decode kernels of the same shape.

    python bench/kernel_bench.py --decode-breakdown --json out.json     # ctx 32768 129024, bs 1 8, keep ~0.25
    python bench/kernel_bench.py --decode-breakdown --device cpu --smoke # tiny shapes, Triton interpreter, checks

Per (ctx, bs) it builds what the server holds for one layer: K/V pools [slots, Hkv, D] (shuffled slots, as
SGLang's allocator hands them out after a while), req_to_token, and the slot-stored block masks `slot_bits`
[slots, Hkv] int64 written at every block-end slot of each request with ~keep of the bits set (heads differ: head h
keeps keep * (0.5 + h / (Hkv - 1)), as the default mode's lists), thresholds [Hkv, Kn-1] ascending. Several copies
of the layer (--pool-layers, default enough for ~1 GiB of KV) are visited in turn, as a model's layers are, so a
call does not find the previous call's K/V in L2. Then it times, each piece alone captured in a CUDA graph of many
calls and replayed (Triton JIT and warm-up outside the timing), ms per layer call:
  a_none / a_all  `selection.select_at_slots` for the bs decode queries: at a position that ends no block (63 of 64
                  steps) / where every request ends a block (same static-shape work; a_all also writes the masks);
  b               `kernels.kept_lists.kept_lists_from_bits` at position ctx - 1 (count, cumsum, write; parallel over block tiles);
  c               `kernels.sparse_attention.tca_sparse_attention` decode at ctx - 1, given b's lists;
  d               a + b + c in one graph, exactly the backend's forward_decode after set_kv_buffer (position ctx - 1);
  e               SGLang's Triton dense decode (`sglang.kernels.ops.attention.decode_attention.decode_attention_fwd`,
                  what TritonAttnBackend.forward_decode calls: max_kv_splits 8, num_kv_splits from
                  get_num_kv_splits_triton, PDL on sm90+; kv_indptr / kv_indices built outside the graph, as SGLang
                  does before a replay);
  f               FlashInfer's BatchDecodeWithPagedKVCacheWrapper, page size 1, as SGLang's flashinfer backend uses it
                  under CUDA graphs (NHD, backend fa2, tensor cores for GQA group >= 4, plan outside the graph).
No piece includes set_kv_buffer (the same for every backend). The table (markdown, printed last) has ms per layer
call, d / e / f x --layers (default 32: Llama-3.1-8B) as attention ms per decode token, and the share of the KV the
TCA step reads ((sink + kept + window) / ctx, mean over requests and heads). Sanity checks per case: c's output of
request 0 against `tca_sparse_attention_ref`, and e against f (dense both). --no-dense skips e and f. With --smoke
(tiny shapes; on CPU the kernels run under TRITON_INTERPRET=1 and nothing is timed) it also checks the built bits'
kept share, b's lists against `selection.kept_positions`, d's output against the reference, and which slots a_none /
a_all write. tests/test_kernel_bench.py runs the CPU smoke checks.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")     # CPU: kernels under the Triton interpreter (before triton loads)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sglang_tca.params import dense_start  # noqa: E402
from sglang_tca.budgets import keep_counts_for  # noqa: E402
from sglang_tca.kernels import tca_sparse_attention, tca_sparse_attention_ref  # noqa: E402
from sglang_tca.kernels.kept_lists import kept_lists_from_bits  # noqa: E402
from sglang_tca.serving.selection import kept_positions, pack_bits, select_at_slots, unpack_bits  # noqa: E402


def head_shares(keep: float, hkv: int, device=None) -> torch.Tensor:
    """Kept share of each KV head's compressed blocks: heads differ, mean ~ keep."""
    return torch.tensor([keep * (0.5 + h / max(hkv - 1, 1)) for h in range(hkv)], device=device)


def make_kv(bs, ctx, hkv, d, dtype, g, n_layers=1, contiguous=False):
    """K/V pools [n_layers, slots, Hkv, D] (random normal) and req_to_token [bs+1, ctx+64] int32: rows 1..bs hold
    bs requests of ctx tokens each on shuffled slots (slot 0 is SGLang's padding slot; row 0 is unused)."""
    dev = g.device
    n_slots = bs * ctx + 64
    perm = torch.randperm(n_slots - 1, generator=g, device=dev) + 1
    if contiguous:
        perm = torch.arange(1, n_slots, device=dev)
    k = torch.empty(n_layers, n_slots, hkv, d, dtype=dtype, device=dev)
    v = torch.empty_like(k)
    for l in range(n_layers):
        k[l].normal_(generator=g)
        v[l].normal_(generator=g)
    r2t = torch.zeros(bs + 1, ctx + 64, dtype=torch.int32, device=dev)
    r2t[1:, :ctx] = perm[: bs * ctx].view(bs, ctx).int()
    return k, v, r2t


def make_slot_bits(r2t, bs, ctx, n_slots, shares, block, g, n_layers=1):
    """slot_bits [n_layers, slots, Hkv] int64, as the server stores them: at the slot of every block-end position
    (j+1)*b - 1 (j >= 1) below ctx of requests 1..bs, a b-bit keep mask with each bit set with probability shares[h]
    (independently per layer, request, block and head); 0 elsewhere."""
    dev = r2t.device
    hkv = shares.numel()
    ends = torch.arange(2 * block - 1, ctx, block, device=dev)                     # block-end positions, j >= 1
    slots = r2t[1:bs + 1][:, ends].long()                                          # [bs, nb]
    bits = torch.zeros(n_layers, n_slots, hkv, dtype=torch.int64, device=dev)
    for l in range(n_layers):
        keep = torch.rand(bs, ends.numel(), hkv, block, generator=g, device=dev) < shares.view(1, 1, hkv, 1)
        bits[l][slots] = pack_bits(keep)
    return bits


def make_thresholds(hkv, block, device=None):
    """Ascending n_eff thresholds [Hkv, Kn-1] that differ per head: with factor 1, a block of n_eff x keeps about
    2^ceil(log2 x) tokens (the timing does not depend on the values; the shapes are the budgets file's)."""
    kn = len(keep_counts_for(block))
    base = 2.0 ** (torch.arange(1, kn, dtype=torch.float32) - 0.5)
    return (torch.linspace(0.75, 1.5, hkv)[:, None] * base).to(device)


def make_pool(bs, ctx, q_len, hq, hkv, d, b, w, keep, dtype, seed=0, contiguous=False):
    """A pool holding bs requests of ctx tokens each (shuffled slots) and per-(request, head) kept lists."""
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(seed)
    k, v, r2t = make_kv(bs, ctx, hkv, d, dtype, g, contiguous=contiguous)
    k_buf, v_buf = k[0], v[0]
    ds = dense_start(ctx, b, w)
    t = torch.arange(b, ds, device=dev)
    shares = head_shares(keep, hkv).tolist()
    lists_sparse, lists_all = [], []
    for _ in range(bs):
        for h in range(hkv):
            lists_sparse.append(t[torch.rand(t.numel(), generator=g, device=dev) < shares[h]].int())
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


# ---- decode breakdown (--decode-breakdown) ------------------------------------------------------------------------
class DecodeCase:
    """One decode batch of the TCA backend over a realistic pool: bs requests of ctx tokens, n_layers copies of one
    layer's K/V and slot_bits. Each piece is a callable fn(layer) with static shapes (CUDA-graph capturable)."""

    def __init__(self, ctx, bs, hq, hkv, d, block, window, keep, dtype, device, n_layers, seed=0, contiguous=False):
        if ctx < window + 2 * block:
            raise ValueError(f"ctx {ctx} has no compressed block (needs ctx >= window + 2 * block)")
        self.ctx, self.bs, self.block, self.window, self.n_layers = ctx, bs, block, window, n_layers
        self.scale = d ** -0.5
        g = torch.Generator(device=device).manual_seed(seed)
        self.k, self.v, self.r2t = make_kv(bs, ctx, hkv, d, dtype, g, n_layers, contiguous)
        self.shares = head_shares(keep, hkv, device)
        self.bits = make_slot_bits(self.r2t, bs, ctx, self.k.shape[1], self.shares, block, g, n_layers)
        self.built_share = self.bits_share()       # before any selection overwrites a mask (a_all, d)
        self.thr = make_thresholds(hkv, block, device)
        self.q = torch.randn(bs, hq, d, generator=g, device=device).to(dtype)
        self.rows = torch.arange(1, bs + 1, device=device)                         # req_pool_indices
        full = lambda p: torch.full((bs,), p, dtype=torch.int64, device=device)   # noqa: E731
        self.pos = full(ctx - 1)                                                   # positions = seq_len - 1
        self.pos_none = full(ctx - 1 if ctx % block else ctx - 2)                  # ends no block
        self.pos_all = full((ctx // block) * block - 1)                            # every request ends a block
        self.loc, self.loc_none, self.loc_all = (self.r2t[self.rows, p].long()      # out_cache_loc
                                                 for p in (self.pos, self.pos_none, self.pos_all))
        self.qo_indptr = torch.arange(bs + 1, dtype=torch.int32, device=device)
        self.kept_buf = torch.empty(bs * ctx * hkv, dtype=torch.int32, device=device)   # the backend's capacity
        self.out = torch.empty_like(self.q)
        # c's input: each layer's lists at ctx - 1, built once (compact copies)
        self.lists = []
        for l in range(n_layers):
            indptr = self.kept_lists(l)
            self.lists.append((indptr.clone(), self.kept_buf[: int(indptr[-1])].clone()))

    # the pieces ----------------------------------------------------------------------------------------------
    def select(self, l, pos=None, loc=None):
        pos = self.pos if pos is None else pos
        loc = self.loc if loc is None else loc
        select_at_slots(self.q, pos, loc, self.rows, self.r2t, self.k[l], self.thr, self.bits[l], self.block,
                        self.scale)

    def select_none(self, l):
        self.select(l, self.pos_none, self.loc_none)

    def select_all(self, l):
        self.select(l, self.pos_all, self.loc_all)

    def kept_lists(self, l):
        return kept_lists_from_bits(self.bits[l], self.r2t, self.rows, self.pos, self.block, self.window,
                                    self.kept_buf, self.ctx)

    def attend(self, l, indptr=None, kept=None):
        if indptr is None:
            indptr, kept = self.lists[l]
        return tca_sparse_attention(self.q, self.k[l], self.v[l], self.r2t, self.rows, self.pos, self.qo_indptr,
                                    indptr, kept, self.block, self.window, self.scale, out=self.out, max_q_len=1)

    def step(self, l):
        """a + b + c, as TCAAttnBackend.forward_decode runs them after set_kv_buffer."""
        self.select(l)
        return self.attend(l, self.kept_lists(l), self.kept_buf)

    # what the step reads, and checks -------------------------------------------------------------------------
    def read_share(self, l=0):
        """(sink + kept + window) / ctx that position ctx - 1 reads, mean over requests and KV heads."""
        n = self.ctx
        indptr = self.lists[l][0]
        kept = indptr.diff().double().mean().item() if indptr.numel() > 1 else 0.0
        return (min(self.block, n) + kept + n - dense_start(n, self.block, self.window)) / n

    def bits_share(self, l=0):
        """Per-head share of set bits at every block-end slot make_slot_bits wrote (a_all and d overwrite the last
        block's mask with a real selection)."""
        ends = torch.arange(2 * self.block - 1, self.ctx, self.block, device=self.r2t.device)
        bits = self.bits[l][self.r2t[1:self.bs + 1][:, ends].long()]                # [bs, nb, Hkv]
        return unpack_bits(bits, self.block).float().mean(dim=(0, 1, 3))

    def ref_lists(self, l=0):
        """CSR lists at ctx - 1 from `selection.kept_positions` (torch reference of b)."""
        r2t, bits = self.r2t.cpu(), self.bits[l].cpu()
        ls = [x for r in range(self.bs)
              for x in kept_positions(r + 1, self.ctx, r2t, bits, self.block, self.window)]
        indptr = torch.tensor([0] + [len(x) for x in ls]).cumsum(0).int()
        kept = torch.cat(ls).int() if ls else torch.zeros(0, dtype=torch.int32)
        return indptr.to(self.q.device), kept.to(self.q.device)

    def attention_error(self, l=0, n_req=1):
        """Max |c - tca_sparse_attention_ref| over the first n_req requests (layer l's precomputed lists)."""
        n_req = min(n_req, self.bs)
        hkv = self.k.shape[2]
        indptr, kept = self.lists[l]
        got = self.attend(l)[:n_req].float()
        want = tca_sparse_attention_ref(self.q[:n_req], self.k[l], self.v[l], self.r2t, self.rows[:n_req],
                                        self.pos[:n_req], self.qo_indptr[:n_req + 1], indptr[:n_req * hkv + 1],
                                        kept, self.block, self.window, self.scale)
        return (got - want.float()).abs().max().item()

    def smoke_checks(self, l=0):
        """Checks of the construction and the pipeline (tiny shapes; slow reference paths). Returns a dict."""
        hkv = self.k.shape[2]
        res = {"bits_share": self.built_share.tolist(), "target_share": self.shares.tolist()}
        # b equals the torch reference view of the masks
        ref_indptr, ref_kept = self.ref_lists(l)
        indptr, kept = self.lists[l]
        res["lists_match"] = bool(torch.equal(indptr.cpu(), ref_indptr.cpu()) and torch.equal(kept.cpu(),
                                                                                               ref_kept.cpu()))
        # a_none writes no mask but slot 0's; a_all writes exactly the block-end slot of every request
        before = self.bits[l].clone()
        self.select_none(l)
        changed = (self.bits[l] != before).any(1).nonzero().flatten().tolist()
        res["a_none_writes_only_slot0"] = set(changed) <= {0}
        self.bits[l][0] = before[0]
        self.bits[l][self.loc_all] = 0                       # a selection keeps >= 1 token: its mask is non-zero
        before = self.bits[l].clone()
        self.select_all(l)
        changed = (self.bits[l] != before).any(1).nonzero().flatten().tolist()
        res["a_all_writes_block_ends"] = sorted(changed) == sorted(self.loc_all.tolist())
        # d (select + lists + attention) equals the reference attention over the reference lists
        out = self.step(l).float().clone()
        ref_indptr, ref_kept = self.ref_lists(l)
        want = tca_sparse_attention_ref(self.q, self.k[l], self.v[l], self.r2t, self.rows, self.pos, self.qo_indptr,
                                        ref_indptr, ref_kept, self.block, self.window, self.scale)
        res["step_err"] = (out - want.float()).abs().max().item()
        res["attention_err"] = self.attention_error(l, self.bs)
        res["read_share"] = self.read_share(l)
        res["hkv"] = hkv
        return res


def triton_dense_decode(case: DecodeCase, max_kv_splits: int = 8):
    """fn(layer) running SGLang's Triton decode kernel as TritonAttnBackend.forward_decode does (server defaults:
    triton_attention_num_kv_splits 8; num_kv_splits per request from get_num_kv_splits_triton, computed outside the
    graph like init_forward_metadata_out_graph; use_pdl = sm90+ as sgl_kernel's is_arch_support_pdl)."""
    from sglang.kernels.ops.attention.decode_attention import decode_attention_fwd
    from sglang.kernels.ops.attention.metadata import get_num_kv_splits_triton
    import triton

    bs, ctx, dev = case.bs, case.ctx, case.q.device
    hq, dv = case.q.shape[1], case.v.shape[3]
    hkv = case.k.shape[2]
    seq_lens = case.pos + 1
    kv_indptr = torch.zeros(bs + 1, dtype=torch.int32, device=dev)
    kv_indptr[1:] = torch.cumsum(seq_lens, 0)
    kv_indices = case.r2t[case.rows][:, :ctx].reshape(-1).long()                   # every request has ctx tokens
    num_kv_splits = torch.empty(bs, dtype=torch.int32, device=dev)
    get_num_kv_splits_triton[(1,)](num_kv_splits, seq_lens, bs, 1, hq, hkv, max_kv_splits,
                                   torch.cuda.get_device_properties(dev).multi_processor_count,
                                   MAX_NUM_SEQ=256 if bs < 256 else triton.next_power_of_2(bs))
    attn_logits = torch.empty(bs, hq, max_kv_splits, dv, dtype=torch.float32, device=dev)
    attn_lse = torch.empty(bs, hq, max_kv_splits, dtype=torch.float32, device=dev)
    out = torch.empty(bs, hq, dv, dtype=case.q.dtype, device=dev)
    use_pdl = torch.cuda.get_device_capability(dev)[0] >= 9

    def fn(l):
        decode_attention_fwd(case.q, case.k[l], case.v[l], out, kv_indptr, kv_indices, attn_logits, attn_lse,
                             num_kv_splits, max_kv_splits, case.scale, 1.0, 1.0, logit_cap=0.0, sinks=None,
                             xai_temperature_len=-1, has_mla=False, use_pdl=use_pdl, page_size=1)
        return out
    return fn, dict(triton_kv_splits=int(num_kv_splits.max()), triton_pdl=use_pdl)


def flashinfer_decode(case: DecodeCase):
    """fn(layer) running FlashInfer's paged decode as SGLang's flashinfer backend does under decode CUDA graphs:
    BatchDecodeWithPagedKVCacheWrapper(workspace 384 MiB, "NHD", backend "fa2", use_cuda_graph, tensor cores when
    the GQA group is >= 4 for 16-bit KV (should_use_tensor_core; SGLANG_FLASHINFER_USE_TENSOR_CORE overrides)),
    page size 1, planned outside the graph; forward(q, (k, v), sm_scale) inside."""
    from flashinfer import BatchDecodeWithPagedKVCacheWrapper

    bs, ctx, dev, dtype = case.bs, case.ctx, case.q.device, case.q.dtype
    hq, hkv, d = case.q.shape[1], case.k.shape[2], case.k.shape[3]
    env = os.environ.get("SGLANG_FLASHINFER_USE_TENSOR_CORE")
    use_tc = env.lower() == "true" if env is not None else (hq // hkv >= 4 and dtype in (torch.float16,
                                                                                             torch.bfloat16))
    workspace = torch.zeros(384 * 1024 * 1024, dtype=torch.uint8, device=dev)
    indptr = torch.zeros(bs + 1, dtype=torch.int32, device=dev)
    indptr[1:] = torch.cumsum(case.pos + 1, 0)
    indices = case.r2t[case.rows][:, :ctx].reshape(-1).int().contiguous()
    last_page_len = torch.ones(bs, dtype=torch.int32, device=dev)
    wrapper = BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD", backend="fa2", use_cuda_graph=True,
                                                 use_tensor_cores=use_tc, paged_kv_indptr_buffer=indptr,
                                                 paged_kv_indices_buffer=indices,
                                                 paged_kv_last_page_len_buffer=last_page_len)
    wrapper.plan(indptr, indices, last_page_len, hq, hkv, d, 1, data_type=dtype, q_data_type=dtype,
                 non_blocking=True, fixed_split_size=None, disable_split_kv=False)

    def fn(l):
        return wrapper.forward(case.q, (case.k[l], case.v[l]), sm_scale=case.scale, logits_soft_cap=0.0,
                               k_scale=None, v_scale=None)
    fn.keep_alive = (workspace, wrapper)
    return fn, dict(flashinfer_tensor_cores=use_tc)


def graph_ms(fn, n_layers: int, target_ms: float = 20.0, max_calls: int = 512, replays: int = 5) -> float:
    """GPU ms per call of fn(layer), layers 0..n_layers-1 in turn (distinct buffers, as a model's layers), from a
    CUDA graph of many calls replayed `replays` times (median). Warm-up (Triton JIT / autotune, allocator) first, on
    a side stream as torch.cuda.graph recommends; the call count is sized from an eager estimate."""
    cur = torch.cuda.current_stream()
    side = torch.cuda.Stream()
    side.wait_stream(cur)
    with torch.cuda.stream(side):
        for l in range(n_layers):
            fn(l)
    cur.wait_stream(side)
    torch.cuda.synchronize()
    t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0.record()
    for l in range(n_layers):
        fn(l)
    t1.record()
    torch.cuda.synchronize()
    est = max(t0.elapsed_time(t1) / n_layers, 1e-3)
    calls = max(n_layers, 32, min(max_calls, int(target_ms / est)))
    calls = -(-calls // n_layers) * n_layers
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            fn(i % n_layers)
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        t0.record()
        g.replay()
        t1.record()
        t1.synchronize()
        times.append(t0.elapsed_time(t1) / calls)
    del g
    return statistics.median(times)


def auto_pool_layers(bs, ctx, hkv, d, dtype, target_bytes=1 << 30):
    """Layer copies so that one round over them holds ~1 GiB of K/V (2 to 8)."""
    per_layer = 2 * (bs * ctx + 64) * hkv * d * torch.empty(0, dtype=dtype).element_size()
    return max(2, min(8, math.ceil(target_bytes / per_layer)))


PIECES = [("a_none", "select, no block end"), ("a_all", "select, all end a block"), ("b", "kept lists"),
          ("c", "attention"), ("d", "a+b+c graph"), ("e", "triton dense"), ("f", "flashinfer")]


def breakdown_table(rows, layers) -> str:
    fmt = lambda x: "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"  # noqa: E731
    head = (["ctx", "bs", "KV read"] + [f"{k}: {name}" for k, name in PIECES]
            + [f"{k} x{layers} (ms/token)" for k in ("d", "e", "f")])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["ctx"]), str(r["bs"]), f"{r['read']:.3f}"] + [fmt(r[f"{k}_ms"]) for k, _ in PIECES]
        cells += [fmt(r[f"{k}_ms"] * layers if r[f"{k}_ms"] is not None else None) for k in ("d", "e", "f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_decode_breakdown(a):
    dev = a.device
    on_gpu = dev == "cuda"
    if on_gpu:
        assert torch.cuda.is_available(), "--device cuda needs a CUDA GPU (use --device cpu --smoke on CPU)"
    if a.smoke:
        a.hq, a.hkv, a.d, a.block, a.window = 4, 2, 16, 16, 64
    ctxs = a.ctx or ([200, 256] if a.smoke else [32768, 129024])
    bss = a.decode_bs or ([1, 3] if a.smoke else [1, 8])
    keep = a.keep if a.keep is not None else (0.4 if a.smoke else 0.25)
    dtype = torch.bfloat16 if on_gpu else torch.float32        # the interpreter has no bf16
    name = torch.cuda.get_device_name() if on_gpu else "cpu (Triton interpreter, untimed)"
    print(f"decode breakdown  {name}  Hq={a.hq} Hkv={a.hkv} D={a.d} b={a.block} w={a.window} keep~{keep} "
          f"{dtype}  x{a.layers} layers per token", flush=True)
    rows, t_start = [], time.time()
    for ctx in ctxs:
        for bs in bss:
            t_case = time.time()
            n_layers = a.pool_layers or (auto_pool_layers(bs, ctx, a.hkv, a.d, dtype) if on_gpu else 2)
            case = DecodeCase(ctx, bs, a.hq, a.hkv, a.d, a.block, a.window, keep, dtype, dev, n_layers,
                              contiguous=a.contiguous)
            row = dict(mode="decode_breakdown", ctx=ctx, bs=bs, pool_layers=n_layers, keep=keep,
                       read=case.read_share(), bits_share=case.built_share.mean().item(), layers=a.layers)
            fns = dict(a_none=case.select_none, a_all=case.select_all, b=case.kept_lists, c=case.attend,
                       d=case.step)
            notes = {}
            if not a.no_dense and on_gpu:
                for key, make in (("e", triton_dense_decode), ("f", flashinfer_decode)):
                    try:
                        fns[key], info = make(case)
                        row.update(info)
                    except Exception as e:                       # a missing package: say so, keep the rest
                        notes[key] = f"{type(e).__name__}: {e}"
                        print(f"  [{key}] unavailable: {notes[key]}", flush=True)
            for key, _ in PIECES:
                fn = fns.get(key)
                if fn is None:
                    row[f"{key}_ms"] = None
                elif on_gpu and key in ("e", "f"):
                    try:                                         # e.g. FlashInfer has no head_dim 16 (--smoke)
                        row[f"{key}_ms"] = graph_ms(fn, n_layers)
                    except Exception as e:
                        notes[key] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                        print(f"  [{key}] failed: {notes[key]}", flush=True)
                        row[f"{key}_ms"] = None
                        del fns[key]
                elif on_gpu:
                    row[f"{key}_ms"] = graph_ms(fn, n_layers)
                else:
                    for l in range(n_layers):                    # CPU: exercise the piece, no timing
                        fn(l)
                    row[f"{key}_ms"] = float("nan")
            row["abc_sum_ms"] = row["a_none_ms"] + row["b_ms"] + row["c_ms"]
            row["attention_err_req0"] = case.attention_error()
            if "e" in fns and "f" in fns:
                row["e_vs_f_err"] = (fns["e"](0).float() - fns["f"](0).float()).abs().max().item()
            if a.smoke:
                row["smoke"] = case.smoke_checks()
            if notes:
                row["notes"] = notes
            rows.append(row)
            msg = " ".join(f"{k}={row[f'{k}_ms']:.4f}" for k, _ in PIECES if row[f"{k}_ms"] is not None)
            print(f"ctx={ctx} bs={bs} pool_layers={n_layers} read={row['read']:.3f} "
                  f"bits_share={row['bits_share']:.3f}  {msg} ms/layer  |c-ref|={row['attention_err_req0']:.2e}"
                  + (f" |e-f|={row['e_vs_f_err']:.2e}" if "e_vs_f_err" in row else "")
                  + f"  ({time.time() - t_case:.1f} s)", flush=True)
            if a.smoke:
                print(f"  smoke checks: {row['smoke']}", flush=True)
            del case, fns
            gc.collect()
            if on_gpu:
                torch.cuda.empty_cache()
    print(f"\ntotal {time.time() - t_start:.1f} s; ms per layer call (CUDA-graph replay), attention ms per token = "
          f"x{a.layers} layers; KV read = (sink + kept + window) / ctx of the TCA step\n")
    print(breakdown_table(rows, a.layers))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(device=name, mode="decode_breakdown", args=vars(a), rows=rows), f, indent=1)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ctx", type=int, nargs="+", default=None,
                    help="context lengths (default 8192 32768; --decode-breakdown: 32768 129024)")
    ap.add_argument("--decode-bs", type=int, nargs="*", default=None,
                    help="decode batch sizes (default 1 16; --decode-breakdown: 1 8)")
    ap.add_argument("--no-prefill", action="store_true")
    ap.add_argument("--keep", type=float, default=None,
                    help="mean kept share of each compressed block (default 0.3; --decode-breakdown: 0.25)")
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
    ap.add_argument("--no-dense", action="store_true",
                    help="skip the tca_all and dense columns (tuning); --decode-breakdown: skip e and f")
    ap.add_argument("--no-graph", action="store_true",
                    help="time eager launches (do_bench) instead of CUDA-graph replays (do_bench_cudagraph); eager "
                         "small decodes then measure the Python launch overhead, not the GPU")
    ap.add_argument("--json", default=None)
    bd = ap.add_argument_group("decode breakdown")
    bd.add_argument("--decode-breakdown", action="store_true",
                    help="per-layer time of TCA's decode pieces (select, kept lists, attention, all three) next to "
                         "SGLang's triton and flashinfer decode (see above)")
    bd.add_argument("--layers", type=int, default=32, help="layers per token for the ms/token projection")
    bd.add_argument("--pool-layers", type=int, default=None,
                    help="layer copies visited in turn (default: ~1 GiB of K/V, 2..8; CPU: 2)")
    bd.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    bd.add_argument("--smoke", action="store_true",
                    help="tiny shapes (Hq 4, Hkv 2, D 16, b 16, w 64, ctx 200 256, bs 1 3) plus correctness checks")
    a = ap.parse_args()
    if a.decode_breakdown:
        run_decode_breakdown(a)
        return
    a.ctx = a.ctx or [8192, 32768]
    a.decode_bs = [1, 16] if a.decode_bs is None else a.decode_bs
    a.keep = 0.3 if a.keep is None else a.keep
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
