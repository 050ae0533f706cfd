"""Compaction of newly completed blocks into the compressed store (one layer per launch).

For each new record i (a block whose last token the forward pass is processing; logical page P = rec_page[i]) and
each KV head h of layer l, the tokens the keep mask mask[P, l, h] (b bits) keeps are copied, in ascending order, from
the block's dense slots to consecutive virtual rows of the record, starting where layer l-1 ended (cursor[P]; 0 at
layer 0). Virtual row v of record P is arena row page_table[P, v // R] * R + v % R (R = the store's page_rows). The kernel
writes off[P, l, h] (the first virtual row of (l, h)) and advances cursor[P]; at layer 0 it also copies the
record's reserved pages res_pages[slot[i]] into page_table[P]; at the last layer it reports (P, rows used) in
out_page / out_rows[slot[i]] for the host (`sglang_tca.serving.store`).

Arena layout (`sizing.MemoryPlan`): one K and one V tensor of [rows, D]; store pages first, then each layer's dense
buffer of [dense slots, KV heads] rows, so a dense (slot s, head h) of layer l is row dense_base + s * Hkv + h.
The block's dense slots are l2d[P * b + t] (SGLang's logical->dense map, t = 0..b-1).

`valid` (optional, [n] bool) skips rows that complete no block: decode runs every row of the batch (static shapes
under CUDA graphs), and only rows whose position ends a block are real records. No host synchronisation.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _compact_kernel(arena_k, arena_v, l2d, rec_page, positions, slot_of, res_pages, mask, off, cursor, page_table,
                    out_page, out_rows, dense_base, layer, n_layers, stride_d, stride_res, stride_pt,
                    HKV: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr,
                    BLOCK_D: tl.constexpr, MAX_PAGES: tl.constexpr, BLOCK_PAGES: tl.constexpr,
                    CHECK_POS: tl.constexpr):
    i = tl.program_id(0)
    if CHECK_POS:                                   # decode: only rows whose token ends a block
        pos = tl.load(positions + i)
        if (pos + 1) % BLOCK != 0:
            return
    p = tl.load(rec_page + i).to(tl.int64)
    slot = tl.load(slot_of + i).to(tl.int64)
    res_row = res_pages + slot * stride_res
    if layer == 0:
        for c in range(0, MAX_PAGES, BLOCK_PAGES):
            offs = c + tl.arange(0, BLOCK_PAGES)
            m = offs < MAX_PAGES
            tl.store(page_table + p * stride_pt + offs, tl.load(res_row + offs, mask=m, other=0), mask=m)
    base = tl.where(layer == 0, 0, tl.load(cursor + p))                        # layer 0 starts the record
    t = tl.arange(0, BLOCK)
    d = tl.arange(0, BLOCK_D)
    md = d < D
    dslot = tl.load(l2d + p * BLOCK + t).to(tl.int64)                         # the block's dense slots
    for h in range(HKV):
        bits = tl.load(mask + (p * n_layers + layer) * HKV + h)
        keep = ((bits >> t.to(tl.int64)) & 1) != 0
        rank = tl.cumsum(keep.to(tl.int32), 0) - 1
        v = base + rank
        dst = tl.load(res_row + v // ROWS, mask=keep, other=0).to(tl.int64) * ROWS + v % ROWS
        src = dense_base + dslot * HKV + h
        m2 = keep[:, None] & md[None, :]
        k = tl.load(arena_k + src[:, None] * stride_d + d[None, :], mask=m2, other=0.0)
        tl.store(arena_k + dst[:, None] * stride_d + d[None, :], k, mask=m2)
        val = tl.load(arena_v + src[:, None] * stride_d + d[None, :], mask=m2, other=0.0)
        tl.store(arena_v + dst[:, None] * stride_d + d[None, :], val, mask=m2)
        tl.store(off + (p * n_layers + layer) * HKV + h, base)
        base += tl.sum(keep.to(tl.int32), 0)
    tl.store(cursor + p, base)
    if layer == n_layers - 1:
        tl.store(out_page + slot, p)
        tl.store(out_rows + slot, base)


def compact_blocks(arena_k: torch.Tensor, arena_v: torch.Tensor, l2d: torch.Tensor, rec_page: torch.Tensor,
                   slot_of: torch.Tensor, store, layer: int, dense_base: int, block: int,
                   positions: torch.Tensor | None = None) -> None:
    """Compact the new records of one layer (see the module docstring). rec_page [n] logical pages, slot_of [n] their
    rows in the store's reservation table; `store` is a `CompressedStore` (its mask for this layer must be written);
    positions [n] (decode) makes rows whose position ends no block skip."""
    n = rec_page.numel()
    if n == 0:
        return
    hkv = store.mask.shape[2]
    d = arena_k.shape[1]
    assert arena_v.shape[1] == d and arena_k.stride(1) == 1 and arena_v.stride(0) == arena_k.stride(0)
    max_pages = store.page_table.shape[1]
    _compact_kernel[(n,)](
        arena_k, arena_v, l2d, rec_page, positions if positions is not None else rec_page, slot_of,
        store.res_pages, store.mask, store.off, store.cursor, store.page_table, store.out_page, store.out_rows,
        dense_base, layer, store.mask.shape[1], arena_k.stride(0), store.res_pages.stride(0),
        store.page_table.stride(0), HKV=hkv, BLOCK=block, ROWS=store.plan.page_rows, D=d,
        BLOCK_D=triton.next_power_of_2(d), MAX_PAGES=max_pages,
        BLOCK_PAGES=min(triton.next_power_of_2(max_pages), 256), CHECK_POS=positions is not None, num_warps=4)
