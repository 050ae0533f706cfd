"""TCA sparse attention over the compressed store and the dense pool: one Triton kernel for extend (prefill
chunks) and decode.

Semantics (exactly `sglang_tca.algorithm.visible`): with block b and window w, a query at absolute position i
(n = i + 1, ds = dense_start(n) = b * max(1, (n - w) // b)) sees key positions t <= i with

    t < b                                   (sink), or
    t >= ds                                 (dense window), or
    b <= t < ds and t is kept by its KV head (compressed blocks).

Where the keys live (`sglang_tca.serving.sizing.MemoryPlan`): one K and one V arena of [rows, D]. The sink and the
kept tokens of compressed blocks are rows of the compressed store, listed per (request, KV head) by
`kernels.kept_lists`; the dense window is read from the layer's dense buffer, dense slot
l2d[req_to_token[row, t]] of KV head h at arena row dense_base + slot * Hkv + h. A request whose sink block is not
complete yet (fewer than b tokens) has nothing in the store: all its keys come from the dense buffer.

Inputs (bs requests, T packed query tokens, Hq query heads, Hkv KV heads, G = Hq // Hkv):

    q                [T, Hq, D]            fp16 / bf16 / fp32; request r's tokens are q[qo_indptr[r]:qo_indptr[r+1]]
    arena_k, arena_v [rows, D], [rows, Dv] the K and V arenas (same dtype as q, same row stride)
    dense_base       int                   first arena row of this layer's dense buffer
    l2d              [logical ids] int64   SGLang's logical -> dense slot map (full_to_swa_index_mapping)
    req_to_token     [R, max_ctx] int32    logical id of (request row, position)
    req_pool_indices [bs] int32/int64      request row of each batch entry
    q_start_pos      [bs] int32/int64      absolute position of request r's first query (= cached prefix length in
                                           extend, = seq_len - 1 in decode); its queries are q_start_pos[r] + 0..len-1
    qo_indptr        [bs + 1] int32/int64  query offsets into q
    kept_indptr      [bs * Hkv + 1] int    kept list of (r, h) is entries kept_indptr[r*Hkv+h] : kept_indptr[r*Hkv+h+1]
    kept_row         [nnz] int32           arena rows of the kept keys (sink first, then ascending positions)
    kept_pos         [nnz] int32 or None   their absolute positions, all below dense_start(last + 1) for the
                                           request's last query; None for one query per request (decode: all
                                           kept keys are visible)
    out              [T, Hq, Dv]           optional output (dtype of q)

Keys of every position <= a request's last query must already be stored (set_kv_buffer and the compaction before
the call).

Kernel layout: grid (query tile, request, KV head x KV split). The rows of a tile are (query, group head) pairs, so
the G query heads of a KV head share every K/V load (BLOCK_Q = BLOCK_M // G queries per tile). Each program walks one
"virtual key list" = [kept entries visible to the tile | dense range [dense_start(first query + 1), last query]]
with online softmax, and per-element masks apply the per-query rules above (an earlier query of a chunk sees fewer
compressed blocks and a longer dense range). The number of kept entries a tile may see is found in-kernel with a
two-level vectorised search over the sorted positions (two dependent loads), so the work per query is
O(kept + w + BLOCK_Q), never O(i). Kept keys that every row of the tile sees (all of them below the first query's
dense start, once the first query is past the sink) are processed first without per-element masks (2x faster
prefill on H100), and in extend so are the dense keys every row sees (from the last query's dense start to the first
query; engine TTFT on an H200, 2026-12-02 -> 2026-12-03 runs: 16K 0.594 -> 0.496 s, 32K 1.196 -> 1.077 s). Decode
keeps its two loops: the extra ranges made it slower (`bench/results/speed_runs/h200_2026-12-03_ab_attention.txt`).
For decode (few programs) the virtual list can be split over `num_kv_splits` programs, followed by a small
log-sum-exp merge kernel (like SGLang's decode stage 2).

No host synchronisation: the grid only needs Python ints (max_q_len; default T, always an upper bound).
Not supported (yet): fp8 KV (k_scale / v_scale), logit soft-capping, sliding-window layers, attention sinks as
learned logits, returning the LSE.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from sglang_tca.kernels.device import sm_count

_LOG2E = 1.4426950408889634
_SEARCH_SAMPLE = 1024          # level-1 sample count of the in-kernel kept-list search


@triton.jit
def _count_below(ptr, n, x, SAMPLE: tl.constexpr):
    """Number of entries < x in the ascending int list ptr[0:n], with two dependent vector loads (for n <= SAMPLE^2)."""
    stride = tl.maximum((n + SAMPLE - 1) // SAMPLE, 1)
    offs = tl.arange(0, SAMPLE)
    idx = offs * stride
    in_n = idx < n
    vals = tl.load(ptr + idx, mask=in_n, other=0)
    c1 = tl.sum((in_n & (vals < x)).to(tl.int32), 0)
    # samples 0..c1-1 are < x, so everything up to idx[c1-1] is; between idx[c1-1] and idx[c1] is undecided
    base = tl.where(c1 > 0, (c1 - 1) * stride + 1, 0)
    end = tl.minimum(c1 * stride, n)
    cnt = base
    for s in range(base, end, SAMPLE):
        o = s + offs
        m = o < end
        v = tl.load(ptr + o, mask=m, other=0)
        cnt += tl.sum((m & (v < x)).to(tl.int32), 0)
    return cnt


@triton.jit
def _tile_step(acc, m_i, l_i, q, start, v_hi, sk, ds_first, kept_row_base, kept_pos_base, r2t_row, L2D,
               dslots_row, dslots_first, K_Arena, V_Arena, h, stride_row, dense_base, num_kv_heads,
               qpos, ds_row, row_valid, sm_scale_log2, offs_n, offs_d, offs_dv, mask_d, mask_dv,
               BLOCK: tl.constexpr, MASKED: tl.constexpr, WITH_POS: tl.constexpr, DENSE_TABLE: tl.constexpr,
               IEEE: tl.constexpr, DENSE: tl.constexpr):
    """One BLOCK_N step of the virtual key list [kept | dense] with online softmax. MASKED=False: every column is a
    key that all rows see (no per-element masks), a kept key, or with DENSE a dense one."""
    vi = start + offs_n
    in_kept = vi < sk
    if DENSE:
        dpos = ds_first + (vi - sk)
        if DENSE_TABLE:
            dslot = tl.load(dslots_row + (dpos - dslots_first))
        else:
            dslot = tl.load(L2D + tl.load(r2t_row + dpos).to(tl.int64))
        row = dense_base + dslot * num_kv_heads + h
        k = tl.load(K_Arena + row[None, :] * stride_row + offs_d[:, None], mask=mask_d[:, None], other=0.0)
    elif MASKED:
        col_valid = vi < v_hi
        krow = tl.load(kept_row_base + vi, mask=in_kept, other=0).to(tl.int64)
        if WITH_POS:
            kpos = tl.load(kept_pos_base + vi, mask=in_kept, other=0)
        else:
            kpos = offs_n * 0
        dpos = ds_first + (vi - sk)
        in_dense = (vi >= sk) & col_valid
        if DENSE_TABLE:
            dslot = tl.load(dslots_row + (dpos - dslots_first), mask=in_dense, other=0)
        else:
            lid = tl.load(r2t_row + dpos, mask=in_dense, other=0).to(tl.int64)
            dslot = tl.load(L2D + lid, mask=in_dense, other=0)
        row = tl.where(in_kept, krow, dense_base + dslot * num_kv_heads + h)
        pos = tl.where(in_kept, kpos, dpos)
        k = tl.load(K_Arena + row[None, :] * stride_row + offs_d[:, None],
                    mask=col_valid[None, :] & mask_d[:, None], other=0.0)
    else:
        row = tl.load(kept_row_base + vi).to(tl.int64)
        k = tl.load(K_Arena + row[None, :] * stride_row + offs_d[:, None], mask=mask_d[:, None], other=0.0)
    if IEEE:
        qk = tl.dot(q, k, input_precision="ieee")
    else:
        qk = tl.dot(q, k)
    qk = qk * sm_scale_log2
    if MASKED:
        causal = pos[None, :] <= qpos[:, None]
        # kept keys: the sink causally, compressed tokens below the row's dense start (without positions, decode:
        # every kept key is visible, and its placeholder position 0 is)
        kvis = tl.where(pos[None, :] < BLOCK, causal, pos[None, :] < ds_row[:, None])
        vis = (in_kept[None, :] & kvis) | (in_dense[None, :] & causal & (pos[None, :] >= ds_row[:, None]))
        vis = vis & row_valid[:, None]
        qk = tl.where(vis, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = m_new
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(qk - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if MASKED:
        v = tl.load(V_Arena + row[:, None] * stride_row + offs_dv[None, :],
                    mask=col_valid[:, None] & mask_dv[None, :], other=0.0)
    else:
        v = tl.load(V_Arena + row[:, None] * stride_row + offs_dv[None, :], mask=mask_dv[None, :], other=0.0)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i


@triton.jit
def _tca_fwd_kernel(
    Q, K_Arena, V_Arena, O, O_Part, Lse_Part, L2D, Dense_Slots, Dense_First,
    req_to_token, req_pool_indices, q_start_pos, qo_indptr, kept_indptr, kept_row, kept_pos,
    sm_scale_log2, dense_base, stride_ds,
    stride_qt, stride_qh,
    stride_row,
    stride_ot, stride_oh,
    stride_ps, stride_pt, stride_ph,
    stride_ls, stride_lt,
    stride_r2t,
    num_kv_heads,
    Lq: tl.constexpr, Lv: tl.constexpr,
    BLOCK: tl.constexpr, WINDOW: tl.constexpr, G: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_Q: tl.constexpr,
    NUM_SPLITS: tl.constexpr, SEARCH_SAMPLE: tl.constexpr, WITH_POS: tl.constexpr, DENSE_TABLE: tl.constexpr,
    IEEE: tl.constexpr,
):
    tile = tl.program_id(0)
    r = tl.program_id(1)
    pid2 = tl.program_id(2)
    h = pid2 % num_kv_heads
    split = pid2 // num_kv_heads

    qo_start = tl.load(qo_indptr + r)
    q_len = tl.load(qo_indptr + r + 1) - qo_start
    q_tile_start = tile * BLOCK_Q
    if q_tile_start >= q_len:
        return
    q_tile_end = tl.minimum(q_tile_start + BLOCK_Q, q_len)
    rp = tl.load(req_pool_indices + r).to(tl.int64)
    p0 = tl.load(q_start_pos + r).to(tl.int32)
    # Until the request's sink block is complete nothing is in the store: every key is in the dense range.
    sink_done = p0 + q_len - 1 >= BLOCK - 1

    # rows = (query, group head) pairs
    offs_m = tl.arange(0, BLOCK_M)
    qi = offs_m // G
    gh = offs_m % G
    row_valid = (qi < BLOCK_Q) & (q_tile_start + qi < q_len)
    qpos = p0 + q_tile_start + qi                                           # absolute query positions
    ds_row = BLOCK * tl.maximum((qpos + 1 - WINDOW) // BLOCK, 1)            # dense_start(qpos + 1)
    ds_row = tl.where(sink_done, ds_row, 0)

    first_pos = p0 + q_tile_start
    last_pos = p0 + q_tile_end - 1
    ds_first = tl.where(sink_done, BLOCK * tl.maximum((first_pos + 1 - WINDOW) // BLOCK, 1), 0)
    ds_last = tl.where(sink_done, BLOCK * tl.maximum((last_pos + 1 - WINDOW) // BLOCK, 1), 0)

    # virtual key list of this tile: [kept (sink and compressed blocks) < ds_last | dense ds_first..last_pos]
    kbeg = tl.load(kept_indptr + r * num_kv_heads + h)
    kend = tl.load(kept_indptr + r * num_kv_heads + h + 1)
    kept_row_base = kept_row + kbeg
    kept_pos_base = kept_pos + kbeg
    if WITH_POS:
        n_kept = _count_below(kept_pos_base, (kend - kbeg).to(tl.int32), ds_last, SEARCH_SAMPLE)
    else:
        n_kept = (kend - kbeg).to(tl.int32)
    n_dense = tl.maximum(last_pos + 1 - ds_first, 0)
    sk = n_kept
    total = sk + n_dense

    if NUM_SPLITS > 1:
        chunk = tl.cdiv(tl.cdiv(total, NUM_SPLITS), BLOCK_N) * BLOCK_N
        v_lo = split * chunk
        v_hi = tl.minimum(total, v_lo + chunk)
    else:
        v_lo = 0
        v_hi = total

    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < Lq
    mask_dv = offs_dv < Lv

    tok = qo_start + q_tile_start + qi                                      # packed token index of each row
    head = h * G + gh
    q = tl.load(Q + tok[:, None].to(tl.int64) * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_valid[:, None] & mask_d[None, :], other=0.0)

    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    r2t_row = req_to_token + rp * stride_r2t
    dslots_row = Dense_Slots + r.to(tl.int64) * stride_ds
    dslots_first = 0
    if DENSE_TABLE:
        dslots_first = tl.load(Dense_First + r)
    # Kept keys every row of the tile sees (all of them once the first query is past the sink, up to the first
    # query's dense start) need no masks: handle whole BLOCK_N steps of them first, the rest masked.
    n_kept_first = n_kept
    if WITH_POS:
        if ds_first < ds_last:
            n_kept_first = _count_below(kept_pos_base, (kend - kbeg).to(tl.int32), ds_first, SEARCH_SAMPLE)
    # Likewise, in extend, the dense keys every row sees: positions ds_last .. first_pos (at or past every row's
    # dense start, causal for every row). The virtual list, within this program's [v_lo, v_hi), is walked as
    # [v_lo, a) kept unmasked, then the rest.
    nomask_end = tl.where(first_pos >= BLOCK - 1, (n_kept_first // BLOCK_N) * BLOCK_N, 0)
    a = tl.minimum(tl.maximum(nomask_end, v_lo), v_hi)
    for start in range(v_lo, a, BLOCK_N):
        acc, m_i, l_i = _tile_step(acc, m_i, l_i, q, start, v_hi, sk, ds_first, kept_row_base, kept_pos_base,
                                   r2t_row, L2D, dslots_row, dslots_first, K_Arena, V_Arena, h, stride_row,
                                   dense_base, num_kv_heads, qpos, ds_row, row_valid, sm_scale_log2, offs_n, offs_d,
                                   offs_dv, mask_d, mask_dv, BLOCK, False, WITH_POS, DENSE_TABLE, IEEE, False)
    if WITH_POS:
        # extend: the rest in three ranges [a, b) masked | [b, c) dense unmasked, whole steps | [c, v_hi) masked
        dense_all = sk + tl.maximum(ds_last - ds_first, 0)                  # virtual index of position ds_last
        n_dense_all = tl.maximum(first_pos + 1 - tl.maximum(ds_last, ds_first), 0)
        b = tl.minimum(tl.maximum(dense_all, a), v_hi)
        c = b + (tl.maximum(tl.minimum(dense_all + n_dense_all, v_hi) - b, 0) // BLOCK_N) * BLOCK_N
        for start in range(a, b, BLOCK_N):
            acc, m_i, l_i = _tile_step(acc, m_i, l_i, q, start, b, sk, ds_first, kept_row_base, kept_pos_base,
                                       r2t_row, L2D, dslots_row, dslots_first, K_Arena, V_Arena, h, stride_row,
                                       dense_base, num_kv_heads, qpos, ds_row, row_valid, sm_scale_log2, offs_n,
                                       offs_d, offs_dv, mask_d, mask_dv, BLOCK, True, WITH_POS, DENSE_TABLE, IEEE,
                                       False)
        for start in range(b, c, BLOCK_N):
            acc, m_i, l_i = _tile_step(acc, m_i, l_i, q, start, c, sk, ds_first, kept_row_base, kept_pos_base,
                                       r2t_row, L2D, dslots_row, dslots_first, K_Arena, V_Arena, h, stride_row,
                                       dense_base, num_kv_heads, qpos, ds_row, row_valid, sm_scale_log2, offs_n,
                                       offs_d, offs_dv, mask_d, mask_dv, BLOCK, False, WITH_POS, DENSE_TABLE, IEEE,
                                       True)
        for start in range(c, v_hi, BLOCK_N):
            acc, m_i, l_i = _tile_step(acc, m_i, l_i, q, start, v_hi, sk, ds_first, kept_row_base, kept_pos_base,
                                       r2t_row, L2D, dslots_row, dslots_first, K_Arena, V_Arena, h, stride_row,
                                       dense_base, num_kv_heads, qpos, ds_row, row_valid, sm_scale_log2, offs_n,
                                       offs_d, offs_dv, mask_d, mask_dv, BLOCK, True, WITH_POS, DENSE_TABLE, IEEE,
                                       False)
    else:
        # decode (one query per request): the rest masked; unmasked dense steps made it slower (H200, 2026-12-03)
        for start in range(a, v_hi, BLOCK_N):
            acc, m_i, l_i = _tile_step(acc, m_i, l_i, q, start, v_hi, sk, ds_first, kept_row_base, kept_pos_base,
                                       r2t_row, L2D, dslots_row, dslots_first, K_Arena, V_Arena, h, stride_row,
                                       dense_base, num_kv_heads, qpos, ds_row, row_valid, sm_scale_log2, offs_n,
                                       offs_d, offs_dv, mask_d, mask_dv, BLOCK, True, WITH_POS, DENSE_TABLE, IEEE,
                                       False)

    has = l_i > 0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    if NUM_SPLITS == 1:
        tl.store(O + tok[:, None].to(tl.int64) * stride_ot + head[:, None] * stride_oh + offs_dv[None, :],
                 o.to(O.dtype.element_ty), mask=row_valid[:, None] & mask_dv[None, :])
    else:
        tl.store(O_Part + split * stride_ps + tok[:, None].to(tl.int64) * stride_pt + head[:, None] * stride_ph
                 + offs_dv[None, :], o, mask=row_valid[:, None] & mask_dv[None, :])
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        tl.store(Lse_Part + split * stride_ls + tok.to(tl.int64) * stride_lt + head, lse, mask=row_valid)


@triton.jit
def _tca_merge_kernel(
    O_Part, Lse_Part, O, qo_total,
    stride_ps, stride_pt, stride_ph, stride_ls, stride_lt, stride_ot, stride_oh,
    Lv: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    t = tl.program_id(0)
    hq = tl.program_id(1)
    if t >= tl.load(qo_total):
        return
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    ms = offs_s < NUM_SPLITS
    mdv = offs_dv < Lv
    lse = tl.load(Lse_Part + offs_s * stride_ls + t * stride_lt + hq, mask=ms, other=float("-inf"))
    mx = tl.max(lse, 0)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    w = tl.exp2(lse - mx)
    o = tl.load(O_Part + offs_s[:, None] * stride_ps + t * stride_pt + hq * stride_ph + offs_dv[None, :],
                mask=ms[:, None] & mdv[None, :], other=0.0)
    res = tl.sum(w[:, None] * o, 0) / tl.maximum(tl.sum(w, 0), 1e-30)
    tl.store(O + t.to(tl.int64) * stride_ot + hq * stride_oh + offs_dv, res.to(O.dtype.element_ty), mask=mdv)


def tca_sparse_attention(q: torch.Tensor, arena_k: torch.Tensor, arena_v: torch.Tensor, dense_base: int,
                         num_kv_heads: int, l2d: torch.Tensor, req_to_token: torch.Tensor,
                         req_pool_indices: torch.Tensor, q_start_pos: torch.Tensor, qo_indptr: torch.Tensor,
                         kept_indptr: torch.Tensor, kept_row: torch.Tensor, kept_pos: Optional[torch.Tensor],
                         block: int, window: int, sm_scale: float, out: Optional[torch.Tensor] = None, *,
                         dense_slots: Optional[torch.Tensor] = None, dense_first: Optional[torch.Tensor] = None,
                         max_q_len: Optional[int] = None, num_kv_splits: Optional[int] = None,
                         block_m: Optional[int] = None, block_n: Optional[int] = None,
                         num_warps: Optional[int] = None, num_stages: Optional[int] = None) -> torch.Tensor:
    """TCA sparse attention for a packed batch of extend chunks and/or decode tokens (see the module docstring for
    shapes). Returns `out` [T, Hq, Dv] (rows of T not covered by qo_indptr are left untouched).

    kept_pos None: one query per request (decode), every kept key visible.
    dense_slots [bs, n] int64 / dense_first [bs] (optional, decode): the dense slots of positions
        dense_first[r] .. dense_first[r] + n - 1 of request r, read instead of req_to_token and l2d (SGLang's
        scheduler may rewrite those while a decode CUDA graph replays; the backend fills this table before).
    max_q_len: Python int upper bound on the per-request query count (sizes the grid; default T = q.shape[0]).
    num_kv_splits: split each tile's key list over this many programs (+ a merge kernel); default: 1 on CPU and for
        long chunks, and on CUDA for short ones (decode) enough for ~8 programs per SM, at most 32.
    block_m / block_n / num_warps / num_stages: tile overrides (block_m rows = (query, group head) pairs).
    """
    assert q.dim() == 3 and arena_k.dim() == 2 and arena_v.dim() == 2, "q [T,Hq,D], arenas [rows, D]"
    assert block > 0 and block & (block - 1) == 0, "block must be a power of two"
    assert window % block == 0 and window >= block, "window must be a positive multiple of block"
    T, Hq, Lq = q.shape
    Hkv, Lv = num_kv_heads, arena_v.shape[1]
    assert arena_k.shape[1] == Lq and Hq % Hkv == 0 and arena_k.stride(0) == arena_v.stride(0)
    G = Hq // Hkv
    bs = qo_indptr.numel() - 1
    assert req_pool_indices.numel() >= bs and q_start_pos.numel() >= bs
    assert kept_indptr.numel() == bs * Hkv + 1, "kept_indptr must have bs * Hkv + 1 entries"
    assert q.stride(-1) == 1 and arena_k.stride(-1) == 1 and arena_v.stride(-1) == 1
    assert req_to_token.stride(-1) == 1
    if out is None:
        out = torch.empty(T, Hq, Lv, dtype=q.dtype, device=q.device)
    assert out.shape == (T, Hq, Lv) and out.stride(-1) == 1
    if bs == 0 or T == 0:
        return out
    with_pos = kept_pos is not None
    if kept_row.numel() == 0:                     # keep valid pointers for the (masked) loads
        kept_row = torch.zeros(1, dtype=torch.int32, device=q.device)
    if not with_pos or kept_pos.numel() == 0:
        kept_pos = kept_row

    max_q_len = T if max_q_len is None else max(1, min(int(max_q_len), T))
    on_gpu = q.is_cuda
    rows = max_q_len * G
    if block_m is None:
        block_m = 16 if rows <= 16 else 32 if rows <= 32 else 64 if rows <= 64 else 128
    block_m = max(block_m, triton.next_power_of_2(G), 16)
    block_q = block_m // G
    if block_n is None:
        # H200 decode sweep (bench/tile_sweep.sh MODE=decode, 2026-12-03): 128 keys per step at BLOCK_M 16 beat 64
        # by 1.1-1.8x (bs 1-64, 4K-32K); prefill keeps 64 (kernel_tiles_h200.md)
        block_n = 128 if block_m == 16 else 64
    q_tiles = triton.cdiv(max_q_len, block_q)
    if num_kv_splits is None:
        # H100 sweep (bench/kernel_bench.py, 32K, bs 1/16): decode wants ~8 programs per SM; prefill has plenty
        if on_gpu:
            progs = bs * Hkv * q_tiles
            num_kv_splits = max(1, min(32, triton.cdiv(8 * sm_count(q.device), max(progs, 1)))) if rows <= 64 else 1
        else:
            num_kv_splits = 1
    num_kv_splits = max(1, int(num_kv_splits))
    if num_warps is None:
        # H200 tile sweep (bench/tile_sweep.sh, 2026-12-03): 4 warps beat 8 at BLOCK_M 128 by 1.17x at 32K
        # and 1.25x at 128K prefill, equal at 4K
        num_warps = 4
    extra = {"num_warps": num_warps}
    if num_stages is None and on_gpu:
        num_stages = 3
    if num_stages is not None:
        extra["num_stages"] = num_stages

    BLOCK_D = triton.next_power_of_2(Lq)
    BLOCK_DV = triton.next_power_of_2(Lv)
    if num_kv_splits > 1:
        o_part = torch.empty(num_kv_splits, T, Hq, Lv, dtype=torch.float32, device=q.device)
        lse_part = torch.empty(num_kv_splits, T, Hq, dtype=torch.float32, device=q.device)
        ps = o_part.stride()
        ls = lse_part.stride()
    else:
        o_part = lse_part = out                   # unused
        ps = (0, 0, 0)
        ls = (0, 0)

    dense_table = dense_slots is not None
    if dense_table:
        assert dense_first is not None and dense_slots.shape[0] >= bs and dense_slots.stride(1) == 1
    grid = (q_tiles, bs, Hkv * num_kv_splits)
    _tca_fwd_kernel[grid](
        q, arena_k, arena_v, out, o_part, lse_part, l2d,
        dense_slots if dense_table else l2d, dense_first if dense_table else q_start_pos,
        req_to_token, req_pool_indices, q_start_pos, qo_indptr, kept_indptr, kept_row, kept_pos,
        float(sm_scale) * _LOG2E, dense_base, dense_slots.stride(0) if dense_table else 0,
        q.stride(0), q.stride(1),
        arena_k.stride(0),
        out.stride(0), out.stride(1),
        ps[0], ps[1], ps[2],
        ls[0], ls[1],
        req_to_token.stride(0),
        Hkv,
        Lq=Lq, Lv=Lv, BLOCK=block, WINDOW=window, G=G,
        BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_Q=block_q,
        NUM_SPLITS=num_kv_splits, SEARCH_SAMPLE=_SEARCH_SAMPLE, WITH_POS=with_pos, DENSE_TABLE=dense_table,
        IEEE=(q.dtype == torch.float32),
        **extra,
    )
    if num_kv_splits > 1:
        _tca_merge_kernel[(T, Hq)](
            o_part, lse_part, out, qo_indptr[bs:],
            ps[0], ps[1], ps[2], ls[0], ls[1], out.stride(0), out.stride(1),
            Lv=Lv, NUM_SPLITS=num_kv_splits, BLOCK_S=max(2, triton.next_power_of_2(num_kv_splits)),
            BLOCK_DV=BLOCK_DV, num_warps=4,
        )
    return out


def tca_sparse_attention_ref(q, arena_k, arena_v, dense_base, num_kv_heads, l2d, req_to_token, req_pool_indices,
                             q_start_pos, qo_indptr, kept_indptr, kept_row, kept_pos, block, window, sm_scale,
                             out=None) -> torch.Tensor:
    """Pure-PyTorch reference with the same inputs (kept_pos required): per request, rebuild each position's K/V
    (kept positions from their arena rows, the dense range through req_to_token and l2d), rebuild the keep mask
    from the kept lists and call `algorithm.visible` + `algorithm.masked_attention`; keys that no query sees are
    zeroed, not read (freed rows may hold anything). Host-synchronising and slow; for tests."""
    from sglang_tca.algorithm import masked_attention, visible
    from sglang_tca.params import TCAParams, dense_start

    p = TCAParams(block=block, window=window)
    T, Hq, _ = q.shape
    Hkv = num_kv_heads
    if out is None:
        out = torch.zeros(T, Hq, arena_v.shape[1], dtype=q.dtype, device=q.device)
    qo = qo_indptr.tolist()
    kin = kept_indptr.tolist()
    for r in range(len(qo) - 1):
        s, e = qo[r], qo[r + 1]
        if e == s:
            continue
        p0 = int(q_start_pos[r])
        L = p0 + (e - s)
        dense = dense_base + l2d[req_to_token[int(req_pool_indices[r]), :L].long()].long()[None, :] * Hkv \
            + torch.arange(Hkv, device=q.device)[:, None]                            # [Hkv, L] dense rows
        keep = torch.ones(Hkv, L, dtype=torch.bool, device=q.device)
        if L >= block:                                                               # the sink is in the store
            keep[:, :dense_start(L, block, window)] = False
        rows = dense.clone()
        for h in range(Hkv):
            lo, hi = kin[r * Hkv + h], kin[r * Hkv + h + 1]
            pos = kept_pos[lo:hi].long()
            rows[h, pos] = kept_row[lo:hi].long()
            keep[h, pos] = True
        qpos = torch.arange(p0, L, device=q.device)
        mask = visible(keep, qpos, L, p) if L >= block else \
            (torch.arange(L, device=q.device)[None, None, :] <= qpos[None, :, None]).expand(Hkv, -1, -1)
        # Keys no query sees are not read: their rows may be freed memory (poisoned with NaN in tests), which the
        # mask alone would not hide (NaN + -inf, 0 * NaN in the softmax).
        seen = mask.any(1)[..., None]                                                # [Hkv, L, 1]
        k = torch.where(seen, arena_k[rows], 0)                                      # [Hkv, L, D]
        v = torch.where(seen, arena_v[rows], 0)
        out[s:e] = masked_attention(q[s:e].transpose(0, 1), k, v, mask, sm_scale).transpose(0, 1).to(out.dtype)
    return out
