"""GPU micro-benchmarks of TCA's attention kernels, and a per-piece breakdown of TCA's decode step, on the server's
memory (sglang_tca.serving.sizing.MemoryPlan: one K and one V arena, the compressed store's pages first, then every
layer's dense buffer).

Default mode: TCA sparse attention kernel vs dense causal flash attention of the same shape.

    python bench/kernel_bench.py                      # 8K and 32K, prefill + decode (bs 1, 16), ~30% kept, bf16
    python bench/kernel_bench.py --ctx 32768 --keep 0.2 --decode-bs 1 8 64 --json out.json

Per context length it times (ms per call, CUDA-graph replays by default, as SGLang runs decode):
  * prefill: one request, all ctx queries in one chunk (extend from position 0);
  * decode: bs requests, one query each at position ctx - 1 (no kept positions, as the server's decode).
The arena holds what the server holds at that point (`make_pool`): the sink and the kept tokens of the compressed
blocks in store rows (a block's kept rows of a KV head consecutive, blocks at shuffled places, as compaction leaves
them), and the queries' dense range (decode: the window; prefill: everything after the sink) in dense slots (pages of
b slots, shuffled, as SGLang's paged allocator hands them out after a while), read through req_to_token and the
logical -> dense map.
Columns: tca (~keep of each compressed block kept, heads differ), tca_all (the same kernel with every compressed
token kept: the kernel's dense cost), dense (dense causal, named in the last column: prefill FlashInfer's
single prefill when flashinfer is installed, then flash_attn, else torch SDPA with the flash backend; K/V contiguous
outside the timing), speedup = dense / tca, and the share of the dense KV the
sparse run reads (sink + kept + window) / ctx.
Needs CUDA; sglang is not needed (only torch, triton and sglang_tca).

Decode breakdown (--decode-breakdown): where the time of one TCA decode step goes, per layer, next to SGLang's dense
decode kernels of the same shape.

    python bench/kernel_bench.py --decode-breakdown --json out.json     # ctx 32768 129024, bs 1 8, keep ~0.25
    python bench/kernel_bench.py --decode-breakdown --device cpu --smoke # tiny shapes, Triton interpreter, checks

Per (ctx, bs) it builds what the server holds for --pool-layers layers (`DecodeCase`; default enough layers for ~1
GiB of dense K/V, so a call does not find the previous layer's data in L2): bs requests of ctx tokens on logical
pages (one per block, shuffled), a `CompressedStore` with a record for every block that completed before the
current one (the sink keeps everything; block j >= 1 keeps each token with probability keep * (0.5 + h / (Hkv - 1))
for KV head h, independently per layer, as the default mode's lists), written as the compaction writes them (per
record layer-major, then head; pages from a shuffled free list), the block the current token completes with its
worst-case pages reserved (as `CompressedStore.begin_forward` reserves them), and the dense window of each request
in the layers' dense buffers; thresholds [Hkv, Kn-1] ascending. Then it times, each piece alone captured in a CUDA
graph of many calls and replayed (Triton JIT and warm-up outside the timing), ms per layer call, exactly as
`TCAAttnBackend.forward_decode` calls them after set_kv_buffer:
  a_none / a_all  `kernels.selection.select_blocks` for the bs decode queries (every row runs, check_pos: rows
                  that end no block return at once): at a position that ends no block (63 of 64 steps) / where every request ends a block (same
                  static-shape work; a_all also stores real masks);
  b_none / b_all  `kernels.compaction.compact_blocks` (positions given: rows that end no block return at once) /
                  where every request ends a block (copies the kept rows of all layers' heads into the store);
  c               `kernels.kept_lists.kept_lists` at position ctx - 1 (rows only; blocks' logical pages from the
                  per-batch block_pages table; max_len = req_to_token's width, the static bound of decode CUDA
                  graphs, --table-ctx; count, cumsum, write; parallel over block tiles, a grid of about 16
                  programs per SM each looping over tiles);
  c_tiles         c with one program per tile (the grid before that loop: mostly empty programs when the table
                  is much wider than the requests);
  d               `kernels.sparse_attention.tca_sparse_attention` decode at ctx - 1 (kept_pos None; the window's
                  dense slots from the per-batch dense_slots / dense_first table), given c's lists;
  e               a + b + c + d in one graph at position ctx - 1 (a block end when ctx % b == 0);
  f               SGLang's Triton dense decode (`sglang.kernels.ops.attention.decode_attention.decode_attention_fwd`,
                  what TritonAttnBackend.forward_decode calls: max_kv_splits 8, num_kv_splits from
                  get_num_kv_splits_triton, PDL on sm90+; kv_indptr / kv_indices built outside the graph, as SGLang
                  does before a replay), over dense K/V pools [slots, Hkv, D] of every token (shuffled slots);
  g               FlashInfer's BatchDecodeWithPagedKVCacheWrapper, page size 1, as SGLang's flashinfer backend uses it
                  under CUDA graphs (NHD, backend fa2, tensor cores for GQA group >= 4, plan outside the graph).
No piece includes set_kv_buffer (the same for every backend). The table (markdown, printed last) has ms per layer
call, e / f / g x --layers (default 32: Llama-3.1-8B) as attention ms per decode token, and the share of the KV the
TCA step reads ((sink + kept + window) / ctx, mean over requests and heads). Sanity checks per case: d's output of
request 0 against `tca_sparse_attention_ref`, and f against g (dense both). --no-dense skips f and g. With --smoke
(tiny shapes; on CPU the kernels run under TRITON_INTERPRET=1 and nothing is timed; every arena row nothing should
read is NaN) it also checks the built masks' kept share, c's lists (rows, and positions when asked) against a
plain-Python view of the store's records, which masks a_none / a_all write, that b_none writes nothing and b_all
stores the kept keys where the records say, e's output per layer and d's against the reference.
tests/test_kernel_bench.py runs the CPU smoke checks.
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
from sglang_tca.kernels.compaction import compact_blocks  # noqa: E402
from sglang_tca.kernels.kept_lists import kept_lists  # noqa: E402
from sglang_tca.kernels.selection import select_blocks  # noqa: E402
from sglang_tca.serving.selection import pack_bits, unpack_bits  # noqa: E402
from sglang_tca.serving.sizing import ROWS_PER_PAGE, MemoryPlan, ModelDims  # noqa: E402
from sglang_tca.serving.store import CompressedStore, record_kept  # noqa: E402


def head_shares(keep: float, hkv: int, device=None) -> torch.Tensor:
    """Kept share of each KV head's compressed blocks: heads differ, mean ~ keep."""
    return torch.tensor([keep * (0.5 + h / max(hkv - 1, 1)) for h in range(hkv)], device=device)


def make_kv(bs, ctx, hkv, d, dtype, g, n_layers=1, contiguous=False):
    """Dense K/V pools [n_layers, slots, Hkv, D] (random normal) and req_to_token [bs+1, ctx+64] int32: rows 1..bs hold
    bs requests of ctx tokens each on shuffled slots (slot 0 is SGLang's padding slot; row 0 is unused). What the
    dense baselines read."""
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


def make_thresholds(hkv, block, device=None):
    """Ascending n_eff thresholds [Hkv, Kn-1] that differ per head: with factor 1, a block of n_eff x keeps about
    2^ceil(log2 x) tokens (the timing does not depend on the values; the shapes are the budgets file's)."""
    kn = len(keep_counts_for(block))
    base = 2.0 ** (torch.arange(1, kn, dtype=torch.float32) - 0.5)
    return (torch.linspace(0.75, 1.5, hkv)[:, None] * base).to(device)


def _perm(n, g, contiguous):
    """0..n-1, shuffled unless contiguous."""
    return torch.arange(n, device=g.device) if contiguous else torch.randperm(n, generator=g, device=g.device)


def logical_layout(bs, ctx, block, g, contiguous=False, width=None):
    """req_to_token [bs+1, width or ctx+64] int32 of logical ids: request r (row r+1) has its block j on logical page
    pages[r, j] (shuffled, page 0 is SGLang's padding page), position t at id pages[r, t // b] * b + t % b."""
    n_blk = -(-ctx // block)
    pages = (_perm(bs * n_blk, g, contiguous) + 1).view(bs, n_blk)
    t = torch.arange(ctx, device=g.device)
    r2t = torch.zeros(bs + 1, max(width or 0, ctx + 64), dtype=torch.int32, device=g.device)
    r2t[1:, :ctx] = (pages[:, t // block] * block + t % block).int()
    return r2t, pages


def dense_layout(pages, lo, ctx, block, g, contiguous=False):
    """Dense slots of positions lo..ctx-1 (lo a multiple of b) of every request: one dense page of b slots per
    block, shuffled (dense page 0 is the padding page). Returns (l2d [logical ids] int64 with 0 for every other
    position, i.e. freed, and the number of dense slots used)."""
    bs, n_blk = pages.shape
    first = lo // block
    n_dense = bs * (n_blk - first)
    dpages = (_perm(n_dense, g, contiguous) + 1).view(bs, n_blk - first)
    l2d = torch.zeros((int(pages.max()) + 1) * block, dtype=torch.int64, device=g.device)
    t = torch.arange(lo, ctx, device=g.device)
    lid = pages[:, t // block] * block + t % block
    l2d[lid] = dpages[:, t // block - first] * block + t % block
    return l2d, n_dense * block


def place_records(keep, start, g, contiguous=False):
    """Arena rows of the kept tokens keep [bs, n_blocks, Hkv, b] as the compaction lays them out: per record
    (request, block) its heads' kept rows one after the other, records at shuffled places from row `start` on.
    Returns (rows [bs, n_blocks, Hkv, b] int64, valid where keep; the number of rows used)."""
    bs, nb, hkv, b = keep.shape
    cnt = keep.sum(-1)                                                              # [bs, nb, Hkv]
    per_rec = cnt.sum(-1).flatten()
    order = _perm(per_rec.numel(), g, contiguous)
    sizes = per_rec[order]
    base = torch.empty_like(per_rec)
    base[order] = sizes.cumsum(0) - sizes
    rows = start + base.view(bs, nb, 1, 1) + (cnt.cumsum(-1) - cnt)[..., None] + keep.cumsum(-1) - 1
    return rows, int(per_rec.sum())


def csr_lists(keep, rows):
    """Kept lists (kept_indptr, kept_row, kept_pos) in (request, head) order, positions ascending, from keep / rows
    [bs, n_blocks, Hkv, b] (block j of a request covers positions j*b .. j*b + b - 1)."""
    bs, nb, hkv, b = keep.shape
    kp = keep.permute(0, 2, 1, 3).reshape(bs * hkv, nb * b)
    rp = rows.permute(0, 2, 1, 3).reshape(bs * hkv, nb * b)
    pos = torch.arange(nb * b, device=keep.device).expand(bs * hkv, -1)
    indptr = torch.nn.functional.pad(kp.sum(-1).cumsum(0), (1, 0)).int()
    return dict(kept_indptr=indptr, kept_row=rp[kp].int(), kept_pos=pos[kp].int())


def make_pool(bs, ctx, q_len, hq, hkv, d, b, w, keep, dtype, seed=0, contiguous=False, device="cuda"):
    """TCA's memory for bs requests of ctx tokens each, one layer (see the module docstring), two sets of store
    rows: `sparse` (~keep of each compressed block kept, heads differ) and `full` (every compressed token kept).
    The queries are positions ctx - q_len .. ctx - 1. Off the GPU every arena row nothing should read is NaN.
    Returns (common kernel args, sparse lists, full lists, KV read share); the lists hold kept_pos, which decode
    (q_len 1) does not pass."""
    if ctx < w + 2 * b:
        raise ValueError(f"ctx {ctx} has no compressed block (needs ctx >= window + 2 * block)")
    g = torch.Generator(device=device).manual_seed(seed)
    nc = dense_start(ctx, b, w) // b                              # listed blocks: the sink and blocks 1 .. nc - 1
    shares = head_shares(keep, hkv, device)
    keep_sparse = torch.rand(bs, nc, hkv, b, generator=g, device=device) < shares.view(1, 1, hkv, 1)
    keep_sparse[:, 0] = True                                      # the sink keeps everything
    keep_full = torch.ones_like(keep_sparse)
    r2t, pages = logical_layout(bs, ctx, b, g, contiguous)
    lo = dense_start(ctx - q_len + 1, b, w)                       # the first query's dense start
    l2d, dense_tokens = dense_layout(pages, lo, ctx, b, g, contiguous)
    rows_sparse, n_sparse = place_records(keep_sparse, ROWS_PER_PAGE, g, contiguous)
    rows_full, n_full = place_records(keep_full, ROWS_PER_PAGE + n_sparse, g, contiguous)
    heap_pages = -(-(n_sparse + n_full) // ROWS_PER_PAGE) + 1     # page 0: the trash page
    dims = ModelDims(1, hkv, d, d, torch.empty(0, dtype=dtype).element_size())
    plan = MemoryPlan(dims, b, w, dense_tokens, heap_pages, pages.numel() * b, max_pages_per_record=1,
                      block_reserve_pages=1, expected_share=keep, decode_kept_rows=0, reservation_rows=1,
                      budget_bytes=0)
    arena_k = torch.empty(plan.arena_rows, d, dtype=dtype, device=device).normal_(generator=g)
    arena_v = torch.empty_like(arena_k).normal_(generator=g)
    pos = torch.arange(nc * b, device=device).view(1, nc, 1, b)
    for keep_, rows_ in ((keep_sparse, rows_sparse), (keep_full, rows_full)):
        # prefill: the stored tokens of compressed blocks are still dense too; both copies hold the same keys
        both = keep_ & (pos >= lo)
        r, _, h, _ = both.nonzero(as_tuple=True)
        src = plan.dense_base(0) + l2d[r2t[1 + r, pos.expand_as(both)[both]].long()] * hkv + h
        arena_k[rows_[both]] = arena_k[src]
        arena_v[rows_[both]] = arena_v[src]
    if torch.device(device).type != "cuda":                       # poison: a wrong read shows
        used = torch.zeros(plan.arena_rows, dtype=torch.bool, device=device)
        used[ROWS_PER_PAGE:ROWS_PER_PAGE + n_sparse + n_full] = True
        live = l2d[r2t[1:, lo:ctx].long()].flatten()
        used[(plan.dense_base(0) + live[:, None] * hkv + torch.arange(hkv, device=device)).flatten()] = True
        arena_k[~used] = float("nan")
        arena_v[~used] = float("nan")
    q = torch.randn(bs * q_len, hq, d, generator=g, device=device).to(dtype)
    common = dict(q=q, arena_k=arena_k, arena_v=arena_v, dense_base=plan.dense_base(0), num_kv_heads=hkv, l2d=l2d,
                  req_to_token=r2t, req_pool_indices=torch.arange(1, bs + 1, device=device),
                  q_start_pos=torch.full((bs,), ctx - q_len, device=device, dtype=torch.int32),
                  qo_indptr=torch.arange(0, bs + 1, device=device, dtype=torch.int32) * q_len,
                  block=b, window=w, sm_scale=d ** -0.5)
    sparse, full = csr_lists(keep_sparse, rows_sparse), csr_lists(keep_full, rows_full)
    read = (sparse["kept_row"].numel() / (bs * hkv) + ctx - nc * b) / ctx
    return common, sparse, full, read


def dense_fn(bs, ctx, q_len, hq, hkv, d, dtype):
    """Dense causal attention over contiguous K/V. Prefill: q_len == ctx; decode: q_len == 1.
    Prefill of one request prefers FlashInfer's single prefill (its FA3 kernel on Hopper, what SGLang's flashinfer
    backend runs). Otherwise it prefers the flash_attn package (flash_attn_with_kvcache for decode, which splits the
    KV); else torch SDPA with the flash backend (GQA via enable_gqa, or K/V expanded outside the timing; SDPA's decode
    does not split the KV, so it is a weak decode baseline: compare decode with the tca_all column too)."""
    dev = "cuda"
    q = torch.randn(bs, q_len, hq, d, device=dev, dtype=dtype)
    k = torch.randn(bs, ctx, hkv, d, device=dev, dtype=dtype)
    v = torch.randn(bs, ctx, hkv, d, device=dev, dtype=dtype)
    if q_len > 1 and bs == 1:
        try:
            from flashinfer import single_prefill_with_kv_cache  # type: ignore

            def fi():
                return single_prefill_with_kv_cache(q[0], k[0], v[0], causal=True)
            fi()
            torch.cuda.synchronize()
            return "flashinfer", fi
        except Exception as e:                # named in the table's last column; say why here
            print(f"[kernel_bench] dense prefill baseline: flashinfer unavailable ({type(e).__name__}: {e})"[:300],
                  file=sys.stderr)
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
def _same(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Equal, NaN at the same places counting as equal."""
    if not x.is_floating_point():
        return torch.equal(x, y)
    return torch.equal(x.isnan(), y.isnan()) and torch.equal(x.nan_to_num(0.0), y.nan_to_num(0.0))


class DecodeCase:
    """One decode batch of the TCA backend over a realistic store: bs requests of ctx tokens, n_layers layers (see the
    module docstring). Each piece is a callable fn(layer) with static shapes (CUDA-graph capturable). poison: every
    arena row nothing should read is NaN (the dense slots of freed positions, store pages no record holds, the
    padding page)."""

    def __init__(self, ctx, bs, hq, hkv, d, block, window, keep, dtype, device, n_layers, seed=0, contiguous=False,
                 poison=False, page_rows=ROWS_PER_PAGE, table_ctx=None):
        if ctx < window + 2 * block:
            raise ValueError(f"ctx {ctx} has no compressed block (needs ctx >= window + 2 * block)")
        b = block
        self.ctx, self.bs, self.block, self.window, self.n_layers = ctx, bs, b, window, n_layers
        self.hq, self.hkv, self.d, self.dtype, self.contiguous, self.seed = hq, hkv, d, dtype, contiguous, seed
        self.scale = d ** -0.5
        g = torch.Generator(device=device).manual_seed(seed)
        self.shares = head_shares(keep, hkv, device)
        self.thr = make_thresholds(hkv, b, device)
        self.heads = torch.arange(hkv, device=device)                             # global KV head ids (TP 1)
        self.q = torch.randn(bs, hq, d, generator=g, device=device).to(dtype)
        self.rows = torch.arange(1, bs + 1, device=device)                         # req_pool_indices
        full = lambda p: torch.full((bs,), p, dtype=torch.int64, device=device)   # noqa: E731
        self.pos = full(ctx - 1)                                                   # positions = seq_len - 1
        self.pos_none = full(ctx - 1 if ctx % b else ctx - 2)                      # ends no block
        self.pos_all = full((ctx // b) * b - 1)                                    # every request ends a block
        # req_to_token's width is the server's context length (table_ctx): the kept lists' grid of a decode graph
        self.r2t, self.pages = logical_layout(bs, ctx, b, g, contiguous, width=table_ctx)
        self.jl = ctx // b - 1                         # the block pos_all ends: completed by a_all / b_all (and e)
        lo = dense_start(ctx, b, window)               # the decode's dense window (the block jl lies inside it)
        self.l2d, dense_tokens = dense_layout(self.pages, lo, ctx, b, g, contiguous)
        # records of blocks 0 .. jl - 1: masks, then offsets, cursor and pages as the compaction writes them
        keep_bits = torch.rand(bs, self.jl, n_layers, hkv, b, generator=g, device=device) < \
            self.shares.view(1, 1, 1, hkv, 1)
        keep_bits[:, 0] = True                                                     # the sink keeps everything
        cnt = keep_bits.sum(-1).flatten(2)                                         # [bs, jl, layers * Hkv]
        off = (cnt.cumsum(-1) - cnt).view(bs, self.jl, n_layers, hkv)
        total = cnt.sum(-1)                                                        # [bs, jl] rows per record
        used = -(-total // page_rows)
        rec_pages = -(-n_layers * hkv * b // page_rows)                            # worst case (the sink's)
        heap_pages = int(used.sum()) + bs * rec_pages + 1                          # page 0: the trash page
        dims = ModelDims(n_layers, hkv, d, d, torch.empty(0, dtype=dtype).element_size())
        self.plan = MemoryPlan(dims, b, window, dense_tokens, heap_pages, self.pages.numel() * b,
                               max_pages_per_record=rec_pages, block_reserve_pages=rec_pages, expected_share=keep,
                               decode_kept_rows=bs * self.r2t.shape[1] * hkv, reservation_rows=bs, budget_bytes=0,
                               page_rows=page_rows)
        self.store = st = CompressedStore(self.plan, device, chunk_tokens=b)
        perm = _perm(heap_pages - 1, g, contiguous).to(torch.int32) + 1
        u = used.flatten()
        start = (u.cumsum(0) - u).view_as(used)                                    # records' first pages in perm
        k = torch.arange(rec_pages, device=device)
        table = torch.where(k < used[..., None], perm[(start[..., None] + k).clamp(max=perm.numel() - 1)], 0)
        P = self.pages[:, :self.jl]
        st.mask[P] = pack_bits(keep_bits)
        st.off[P] = off.int()
        st.cursor[P] = total.int()
        st.page_table[P] = table.int()
        n_used = int(used.sum())
        reserved = perm[n_used:n_used + bs * rec_pages].view(bs, rec_pages)       # begin_forward's reservation
        st.res_pages[:bs] = reserved
        self.page = self.pages[:, self.jl]                                         # the step's records
        self.record_pages = P
        # the arena: random K/V; with poison, NaN where nothing should be read
        self.arena_k = torch.empty(self.plan.arena_rows, d, dtype=dtype, device=device).normal_(generator=g)
        self.arena_v = torch.empty_like(self.arena_k).normal_(generator=g)
        if poison:
            live = torch.zeros(self.plan.arena_rows, dtype=torch.bool, device=device)
            pages_used = table[table > 0].long()
            live[(pages_used[:, None] * page_rows + torch.arange(page_rows, device=device)).flatten()] = True
            slots = self.l2d[self.r2t[1:, lo:ctx].long()].flatten()
            for l in range(n_layers):
                live[(self.plan.dense_base(l) + slots[:, None] * hkv + self.heads).flatten()] = True
            self.arena_k[~live] = float("nan")
            self.arena_v[~live] = float("nan")
        # static per-step inputs (what the backend computes from the forward batch)
        # (positions, logical pages of their blocks (out_cache_loc // b)) of each step kind
        self.at = {name: (p, self.r2t[self.rows, p].long() // b)
                   for name, p in (("step", self.pos), ("none", self.pos_none), ("all", self.pos_all))}
        self.slot_of = torch.arange(bs, dtype=torch.int32, device=device)
        # the per-batch tables the host fills before a decode graph replay (TCAAttnBackend._set_decode_metadata):
        # the dense slots of each request's window and the logical page of each block
        width = self.r2t.shape[1]
        r2t_rows = self.r2t[self.rows].long()
        self.dense_first = torch.full((bs,), lo, dtype=torch.int32, device=device)
        win = (lo + torch.arange(window + b, device=device)).clamp(max=width - 1)
        self.dense_slots = self.l2d[r2t_rows[:, win]]
        self.block_pages = (r2t_rows[:, 0:width:b] // b).int()
        self.qo_indptr = torch.arange(bs + 1, dtype=torch.int32, device=device)
        self.kept_buf = torch.empty(self.plan.decode_kept_rows, dtype=torch.int32, device=device)
        self.pos_buf = torch.empty_like(self.kept_buf)
        self.out = torch.empty_like(self.q)
        self.built_share = self.mask_share()          # before any selection overwrites a mask (a_all, e)
        # d's input: each layer's lists at ctx - 1, built once (compact copies; positions for the reference)
        self.lists = []
        for l in range(n_layers):
            indptr = self.kept_lists(l, self.pos_buf)
            n = int(indptr[-1])
            self.lists.append((indptr.clone(), self.kept_buf[:n].clone(), self.pos_buf[:n].clone()))
        self._dense = None

    # the pieces ----------------------------------------------------------------------------------------------
    def k_dense(self, l):
        base, n = self.plan.dense_base(l), (self.plan.dense_tokens + self.block) * self.hkv
        return self.arena_k[base:base + n].view(-1, self.hkv, self.d)

    def select(self, l, at="step"):
        pos, page = self.at[at]
        select_blocks(self.q, pos, page, self.l2d, self.k_dense(l), self.thr, self.store.mask, self.block, l,
                      self.scale, "tca", self.heads, check_pos=True)

    def select_none(self, l):
        self.select(l, "none")

    def select_all(self, l):
        self.select(l, "all")

    def compact(self, l, at="step"):
        pos, page = self.at[at]
        compact_blocks(self.arena_k, self.arena_v, self.l2d, page, self.slot_of, self.store, l,
                       self.plan.dense_base(l), self.block, positions=pos)

    def compact_none(self, l):
        self.compact(l, "none")

    def compact_all(self, l):
        self.compact(l, "all")

    def kept_lists(self, l, kept_pos=None, programs=None):
        return kept_lists(self.store, l, self.r2t, self.rows, self.pos, self.window, self.kept_buf,
                          self.r2t.shape[1], kept_pos, block_pages=self.block_pages, programs=programs)

    def kept_lists_per_tile(self, l):
        """c with one program per tile (the grid before `programs`)."""
        return self.kept_lists(l, programs=1 << 30)

    def attend(self, l, indptr=None, kept=None):
        if indptr is None:
            indptr, kept, _ = self.lists[l]
        return tca_sparse_attention(self.q, self.arena_k, self.arena_v, self.plan.dense_base(l), self.hkv, self.l2d,
                                    self.r2t, self.rows, self.pos, self.qo_indptr, indptr, kept, None, self.block,
                                    self.window, self.scale, out=self.out, dense_slots=self.dense_slots,
                                    dense_first=self.dense_first, max_q_len=1)

    def step(self, l):
        """a + b + c + d, as TCAAttnBackend.forward_decode runs them after set_kv_buffer."""
        self.select(l)
        self.compact(l)
        return self.attend(l, self.kept_lists(l), self.kept_buf)

    def dense_pools(self):
        """(K, V [n_layers, slots, Hkv, D], req_to_token of slots) for the dense baselines, built on first use."""
        if self._dense is None:
            g = torch.Generator(device=self.q.device).manual_seed(self.seed + 1)
            self._dense = make_kv(self.bs, self.ctx, self.hkv, self.d, self.dtype, g, self.n_layers,
                                  self.contiguous)
        return self._dense

    # what the step reads, and checks -------------------------------------------------------------------------
    def read_share(self, l=0):
        """(sink + kept + window) / ctx that position ctx - 1 reads, mean over requests and KV heads."""
        n = self.ctx
        kept = self.lists[l][0].diff().double().mean().item()                      # the sink included
        return (kept + n - dense_start(n, self.block, self.window)) / n

    def mask_share(self):
        """Per-head share of set bits in the built records of blocks j >= 1, all layers (the sink keeps all)."""
        bits = self.store.mask[self.record_pages[:, 1:]]                           # [bs, jl - 1, layers, Hkv]
        return unpack_bits(bits, self.block).float().mean(dim=(0, 1, 2, 4))

    def ref_lists(self, l=0):
        """CSR lists (indptr, rows, positions) at ctx - 1, read from the store's records in plain Python (the
        reference of c): block j of request row r is record P = req_to_token[r, j*b] // b, its kept tokens the set
        bits of mask[P, l, h] from virtual row off[P, l, h] on, at page_table[P, v // R] * R + v % R."""
        b, R = self.block, self.plan.page_rows
        mask, off, pt = self.store.mask.cpu(), self.store.off.cpu(), self.store.page_table.cpu()
        r2t = self.r2t.cpu()
        nb = dense_start(self.ctx, b, self.window) // b                              # blocks 0 .. nb - 1
        indptr, rows, pos = [0], [], []
        for r in self.rows.tolist():
            for h in range(self.hkv):
                for j in range(nb):
                    for t, row in record_kept(mask, off, pt, int(r2t[r, j * b]) // b, l, h, b, R):
                        pos.append(j * b + t)
                        rows.append(row)
                indptr.append(len(rows))
        dev = self.q.device
        as_t = lambda x: torch.tensor(x, dtype=torch.int32, device=dev)           # noqa: E731
        return as_t(indptr), as_t(rows), as_t(pos)

    def reference(self, l, indptr, rows, pos, n_req=None):
        n_req = self.bs if n_req is None else n_req
        return tca_sparse_attention_ref(self.q[:n_req], self.arena_k, self.arena_v, self.plan.dense_base(l),
                                        self.hkv, self.l2d, self.r2t, self.rows[:n_req], self.pos[:n_req],
                                        self.qo_indptr[:n_req + 1], indptr[:n_req * self.hkv + 1], rows, pos,
                                        self.block, self.window, self.scale)

    def attention_error(self, l=0, n_req=1):
        """Max |d - tca_sparse_attention_ref| over the first n_req requests (layer l's precomputed lists)."""
        n_req = min(n_req, self.bs)
        indptr, rows, pos = self.lists[l]
        got = self.attend(l)[:n_req].float()
        return (got - self.reference(l, indptr, rows, pos, n_req).float()).abs().max().item()

    def smoke_checks(self):
        """Checks of the construction and of every piece (tiny shapes; slow reference paths). Returns a dict."""
        st, hkv = self.store, self.hkv
        res = {"mask_share": self.built_share.tolist(), "target_share": self.shares.tolist()}
        # c equals the plain-Python view of the records, rows and (asked for) positions, at every layer
        match = True
        for l in range(self.n_layers):
            want = self.ref_lists(l)
            indptr, rows, pos = self.lists[l]
            match &= all(torch.equal(x.cpu(), y.cpu()) for x, y in zip((indptr, rows, pos), want))
            got = self.kept_lists(l)                                               # rows only, as decode runs it
            match &= torch.equal(got.cpu(), want[0].cpu()) and torch.equal(self.kept_buf[:int(got[-1])].cpu(),
                                                                           want[1].cpu())
        res["lists_match"] = bool(match)
        # a_none writes no mask; a_all exactly the step's records, at its layer only
        l = 0
        before = st.mask.clone()
        self.select_none(l)
        changed = (st.mask != before).flatten(1).any(1).nonzero().flatten().tolist()
        res["a_none_writes_nothing"] = not changed
        st.mask[self.page] = 0                    # the pieces ran already; a selection keeps >= 1 token per head
        before = st.mask.clone()
        self.select_all(l)
        diff = st.mask != before                                                    # [pages, layers, Hkv]
        res["a_all_writes_block_ends"] = (sorted(diff.flatten(1).any(1).nonzero().flatten().tolist())
                                          == sorted(self.page.tolist()) and not diff[:, 1:].any().item())
        # b_none writes nothing; b_all (every layer in order, as a forward) stores the kept keys where the records say
        for l in range(self.n_layers):
            self.select_all(l)
        tables = [x.clone() for x in (st.off, st.cursor, st.page_table, st.out_rows, self.arena_k, self.arena_v)]
        for l in range(self.n_layers):
            self.compact_none(l)
        after = (st.off, st.cursor, st.page_table, st.out_rows, self.arena_k, self.arena_v)
        res["b_none_writes_nothing"] = all(_same(x, y) for x, y in zip(tables, after))
        for l in range(self.n_layers):
            self.compact_all(l)
        res["b_all_compacts_block_ends"] = self.check_compacted()
        # e (select + compact + lists + attention) per layer, and d, equal the reference over the reference lists
        errs = []
        for l in range(self.n_layers):
            out = self.step(l).float().clone()
            errs.append((out - self.reference(l, *self.ref_lists(l)).float()).abs().max().item())
        res["step_err"] = max(errs)
        res["attention_err"] = max(self.attention_error(l, self.bs) for l in range(self.n_layers))
        res["read_share"] = self.read_share()
        res["hkv"] = hkv
        return res

    def check_compacted(self) -> bool:
        """After b_all at every layer: each step record's rows hold its kept keys (from the dense buffer), its
        page table is its reservation, and the row count reported to the host is its cursor."""
        st, b, R = self.store, self.block, self.plan.page_rows
        ok = True
        for r, P in enumerate(self.page.tolist()):
            ok &= torch.equal(st.page_table[P], st.res_pages[r])
            v_end = 0
            for l in range(self.n_layers):
                kd = self.k_dense(l)
                slots = self.l2d[P * b + torch.arange(b, device=kd.device)]
                for h in range(self.hkv):
                    keep = unpack_bits(st.mask[P, l, h], b)
                    v = int(st.off[P, l, h]) + torch.arange(int(keep.sum()), device=kd.device)
                    ok &= int(st.off[P, l, h]) == v_end
                    v_end += int(keep.sum())
                    rows = st.page_table[P, v // R].long() * R + v % R
                    ok &= torch.equal(self.arena_k[rows], kd[slots[keep], h])
            ok &= int(st.cursor[P]) == v_end and int(st.out_rows[r]) == v_end and int(st.out_page[r]) == P
        return bool(ok)


def triton_dense_decode(case: DecodeCase, max_kv_splits: int = 8):
    """fn(layer) running SGLang's Triton decode kernel as TritonAttnBackend.forward_decode does (server defaults:
    triton_attention_num_kv_splits 8; num_kv_splits per request from get_num_kv_splits_triton, computed outside the
    graph like init_forward_metadata_out_graph; use_pdl = sm90+ as sgl_kernel's is_arch_support_pdl)."""
    from sglang.kernels.ops.attention.decode_attention import decode_attention_fwd
    from sglang.kernels.ops.attention.metadata import get_num_kv_splits_triton
    import triton

    k, v, r2t = case.dense_pools()
    bs, ctx, dev = case.bs, case.ctx, case.q.device
    hq, dv = case.q.shape[1], v.shape[3]
    hkv = k.shape[2]
    seq_lens = case.pos + 1
    kv_indptr = torch.zeros(bs + 1, dtype=torch.int32, device=dev)
    kv_indptr[1:] = torch.cumsum(seq_lens, 0)
    kv_indices = r2t[case.rows][:, :ctx].reshape(-1).long()                        # every request has ctx tokens
    num_kv_splits = torch.empty(bs, dtype=torch.int32, device=dev)
    get_num_kv_splits_triton[(1,)](num_kv_splits, seq_lens, bs, 1, hq, hkv, max_kv_splits,
                                   torch.cuda.get_device_properties(dev).multi_processor_count,
                                   MAX_NUM_SEQ=256 if bs < 256 else triton.next_power_of_2(bs))
    attn_logits = torch.empty(bs, hq, max_kv_splits, dv, dtype=torch.float32, device=dev)
    attn_lse = torch.empty(bs, hq, max_kv_splits, dtype=torch.float32, device=dev)
    out = torch.empty(bs, hq, dv, dtype=case.q.dtype, device=dev)
    use_pdl = torch.cuda.get_device_capability(dev)[0] >= 9

    def fn(l):
        decode_attention_fwd(case.q, k[l], v[l], out, kv_indptr, kv_indices, attn_logits, attn_lse,
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

    k, v, r2t = case.dense_pools()
    bs, ctx, dev, dtype = case.bs, case.ctx, case.q.device, case.q.dtype
    hq, hkv, d = case.q.shape[1], k.shape[2], k.shape[3]
    env = os.environ.get("SGLANG_FLASHINFER_USE_TENSOR_CORE")
    use_tc = env.lower() == "true" if env is not None else (hq // hkv >= 4 and dtype in (torch.float16,
                                                                                             torch.bfloat16))
    workspace = torch.zeros(384 * 1024 * 1024, dtype=torch.uint8, device=dev)
    indptr = torch.zeros(bs + 1, dtype=torch.int32, device=dev)
    indptr[1:] = torch.cumsum(case.pos + 1, 0)
    indices = r2t[case.rows][:, :ctx].reshape(-1).int().contiguous()
    last_page_len = torch.ones(bs, dtype=torch.int32, device=dev)
    wrapper = BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD", backend="fa2", use_cuda_graph=True,
                                                 use_tensor_cores=use_tc, paged_kv_indptr_buffer=indptr,
                                                 paged_kv_indices_buffer=indices,
                                                 paged_kv_last_page_len_buffer=last_page_len)
    wrapper.plan(indptr, indices, last_page_len, hq, hkv, d, 1, data_type=dtype, q_data_type=dtype,
                 non_blocking=True, fixed_split_size=None, disable_split_kv=False)

    def fn(l):
        return wrapper.forward(case.q, (k[l], v[l]), sm_scale=case.scale, logits_soft_cap=0.0,
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
    """Layer copies so that one round over them holds ~1 GiB of dense K/V (2 to 8); TCA's compressed layers are
    smaller, and still far beyond L2 at these sizes."""
    per_layer = 2 * (bs * ctx + 64) * hkv * d * torch.empty(0, dtype=dtype).element_size()
    return max(2, min(8, math.ceil(target_bytes / per_layer)))


PIECES = [("a_none", "select, no block end"), ("a_all", "select, all end a block"),
          ("b_none", "compact, no block end"), ("b_all", "compact, all end a block"), ("c", "kept lists"),
          ("c_tiles", "kept lists, a program per tile"), ("d", "attention"), ("e", "a+b+c+d graph"), ("f", "triton dense"), ("g", "flashinfer")]
PROJECTED = ("e", "f", "g")            # per-token projections (x --layers)


def breakdown_table(rows, layers) -> str:
    fmt = lambda x: "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"  # noqa: E731
    head = (["ctx", "bs", "KV read"] + [f"{k}: {name}" for k, name in PIECES]
            + [f"{k} x{layers} (ms/token)" for k in PROJECTED])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["ctx"]), str(r["bs"]), f"{r['read']:.3f}"] + [fmt(r[f"{k}_ms"]) for k, _ in PIECES]
        cells += [fmt(r[f"{k}_ms"] * layers if r[f"{k}_ms"] is not None else None) for k in PROJECTED]
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
                              contiguous=a.contiguous, poison=a.smoke, table_ctx=a.table_ctx)
            row = dict(mode="decode_breakdown", ctx=ctx, bs=bs, table_ctx=case.r2t.shape[1], pool_layers=n_layers,
                       keep=keep,
                       read=case.read_share(), mask_share=case.built_share.mean().item(), layers=a.layers,
                       store_pages=case.plan.heap_pages, arena_rows=case.plan.arena_rows)
            fns = dict(a_none=case.select_none, a_all=case.select_all, b_none=case.compact_none,
                       b_all=case.compact_all, c=case.kept_lists, c_tiles=case.kept_lists_per_tile, d=case.attend,
                       e=case.step)
            notes = {}
            if not a.no_dense and on_gpu:
                for key, make in (("f", triton_dense_decode), ("g", flashinfer_decode)):
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
                elif on_gpu and key in ("f", "g"):
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
            row["abcd_sum_ms"] = row["a_none_ms"] + row["b_none_ms"] + row["c_ms"] + row["d_ms"]
            row["attention_err_req0"] = case.attention_error()
            if "f" in fns and "g" in fns:
                row["f_vs_g_err"] = (fns["f"](0).float() - fns["g"](0).float()).abs().max().item()
            if a.smoke:
                row["smoke"] = case.smoke_checks()
            if notes:
                row["notes"] = notes
            rows.append(row)
            msg = " ".join(f"{k}={row[f'{k}_ms']:.4f}" for k, _ in PIECES if row[f"{k}_ms"] is not None)
            print(f"ctx={ctx} bs={bs} pool_layers={n_layers} read={row['read']:.3f} "
                  f"mask_share={row['mask_share']:.3f}  {msg} ms/layer  |d-ref|={row['attention_err_req0']:.2e}"
                  + (f" |f-g|={row['f_vs_g_err']:.2e}" if "f_vs_g_err" in row else "")
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


def main(argv=None):
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
                    help="give each request contiguous logical and dense pages and store rows in order (what "
                         "SGLang's allocator mostly does early on); default shuffled")
    ap.add_argument("--no-dense", action="store_true",
                    help="skip the tca_all and dense columns (tuning); --decode-breakdown: skip f and g")
    ap.add_argument("--no-graph", action="store_true",
                    help="time eager launches (do_bench) instead of CUDA-graph replays (do_bench_cudagraph); eager "
                         "small decodes then measure the Python launch overhead, not the GPU")
    ap.add_argument("--json", default=None)
    bd = ap.add_argument_group("decode breakdown")
    bd.add_argument("--decode-breakdown", action="store_true",
                    help="per-layer time of TCA's decode pieces (selection, compaction, kept lists, attention, all "
                         "four) next to SGLang's triton and flashinfer decode (see above)")
    bd.add_argument("--table-ctx", type=int, default=None,
                    help="req_to_token width = the server's context length, which bounds a decode CUDA graph's "
                         "kept-list grid (default ctx + 64)")
    bd.add_argument("--layers", type=int, default=32, help="layers per token for the ms/token projection")
    bd.add_argument("--pool-layers", type=int, default=None,
                    help="layers built and visited in turn (default: ~1 GiB of dense K/V, 2..8; CPU: 2)")
    bd.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    bd.add_argument("--smoke", action="store_true",
                    help="tiny shapes (Hq 4, Hkv 2, D 16, b 16, w 64, ctx 200 256, bs 1 3), NaN in every arena row "
                         "nothing should read, plus correctness checks")
    a = ap.parse_args(argv)
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
        if mode == "decode":                  # as the server's decode: no positions, every kept key visible
            sparse, full = {**sparse, "kept_pos": None}, {**full, "kept_pos": None}
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
