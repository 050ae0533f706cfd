"""Kept-token lists for `tca_sparse_attention`, read from the compressed store's records.

For a batch and one layer, this builds per (request, KV head) the kept tokens of the blocks its last query sees
from the store: the sink (block 0, once complete) and the compressed blocks 1..nb, nb = max((n - window) // b, 1) - 1
with n = last_pos + 1. Block j of the request in req_to_token row `row` is record P = req_to_token[row, j*b] // b (a
block is one logical page); its kept tokens are the set bits of mask[P, layer, h], stored from virtual row
off[P, layer, h] on, virtual row v at arena row page_table[P, v // R] * R + v % R (R = the store's page_rows). The output is
the CSR triple (kept_indptr [bs*Hkv+1], kept_row, and optionally kept_pos: ascending absolute positions) that
`tca_sparse_attention` reads, in (request, head) order. Every listed block must already be compacted (this layer's
new records are compacted before the lists are built).

The work is parallel over tiles of `block_tile` blocks: n_tiles per (request, head) from the host-side bound `max_len`
(an int >= last_pos + 1 of every request: the context length in decode, the batch's longest sequence in extend), on a
grid (programs, bs, Hkv) where each program loops over every programs-th tile. Decode CUDA graphs bound by the
context length, so a large batch of short requests would otherwise launch mostly empty programs (128 x 16K requests
under a 128K context: 9 of 10); `programs` keeps the grid near the GPU's resident capacity. Three launches with no
host synchronisation, so decode CUDA graphs capture it:
  1. count: each program stores each of its tiles' number of kept tokens (0 past the request's last block) in a flat
     [bs*Hkv*n_tiles] int32 buffer, ordered (request, head, tile);
  2. torch.cumsum of that buffer: the (inclusive) end of every tile's run;
  3. write: each program writes its tiles' rows (and positions) at their start offsets (end - count, in-tile
     tl.cumsum), and the programs of tile 0 / the last tile fill kept_indptr.
max_len is clamped to req_to_token's row length, which bounds every position, so passing that is always safe.
kept_row / kept_pos are caller-allocated with a capacity that bounds the total (e.g. sum of lengths x Hkv).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sglang_tca.kernels.device import sm_count

PROGRAMS_PER_SM = 16       # default grid of one launch: about this many programs per SM (all resident at once)


@triton.jit
def _block_pages(req_to_token, block_pages, r, row, j, valid, stride_r2t, stride_bp, BLOCK: tl.constexpr,
                 PAGES_TABLE: tl.constexpr):
    """Logical pages of blocks j of batch entry r (request row `row`): from req_to_token, or from the per-batch
    table block_pages [bs, blocks] the host side filled before a decode CUDA-graph replay."""
    if PAGES_TABLE:
        return tl.load(block_pages + r * stride_bp + j, mask=valid, other=0).to(tl.int64)
    return tl.load(req_to_token + row * stride_r2t + j * BLOCK, mask=valid, other=0).to(tl.int64) // BLOCK


@triton.jit
def _block_keep(mask, req_to_token, block_pages, r, row, h, layer, n_layers, t0, nb, stride_r2t, stride_bp,
                HKV: tl.constexpr, BLOCK: tl.constexpr, BLOCK_B: tl.constexpr, PAGES_TABLE: tl.constexpr):
    """Keep mask [BLOCK_B, BLOCK] of blocks j = t0 .. t0 + BLOCK_B - 1 (masked past nb), with j, their logical pages
    and their (page, layer, head) entries of the store's tables."""
    j = t0 + tl.arange(0, BLOCK_B)
    valid = j <= nb
    p = _block_pages(req_to_token, block_pages, r, row, j, valid, stride_r2t, stride_bp, BLOCK, PAGES_TABLE)
    entry = (p * n_layers + layer) * HKV + h
    bits = tl.load(mask + entry, mask=valid, other=0)
    keep = (((bits[:, None] >> tl.arange(0, BLOCK)[None, :].to(tl.int64)) & 1) != 0) & valid[:, None]
    return keep, j, p, entry


@triton.jit
def _block_tile(mask, off, page_table, req_to_token, block_pages, r, row, h, layer, n_layers, t0, nb, stride_r2t,
                stride_bp, stride_pt, HKV: tl.constexpr, BLOCK: tl.constexpr, BLOCK_B: tl.constexpr,
                ROWS: tl.constexpr, PAGES_TABLE: tl.constexpr):
    """Keep mask [BLOCK_B, BLOCK], arena rows and positions of blocks j = t0 .. t0 + BLOCK_B - 1 (masked past nb)."""
    keep, j, p, entry = _block_keep(mask, req_to_token, block_pages, r, row, h, layer, n_layers, t0, nb, stride_r2t,
                                    stride_bp, HKV, BLOCK, BLOCK_B, PAGES_TABLE)
    base = tl.load(off + entry, mask=j <= nb, other=0)
    t = tl.arange(0, BLOCK)
    v = base[:, None] + tl.cumsum(keep.to(tl.int32), 1) - 1
    page = tl.load(page_table + p[:, None] * stride_pt + v // ROWS, mask=keep, other=0).to(tl.int64)
    rows = page * ROWS + v % ROWS
    pos = j[:, None] * BLOCK + t[None, :]
    return keep, rows, pos


@triton.jit
def _n_blocks(last_pos, r, window, BLOCK: tl.constexpr):
    """Index of the last listed block (-1: none): the compressed blocks, and the sink once it is complete."""
    n = tl.load(last_pos + r).to(tl.int64) + 1
    nb = tl.maximum((n - window) // BLOCK, 1) - 1
    return tl.where(n >= BLOCK, nb, -1)


@triton.jit
def _kept_count_kernel(mask, off, page_table, req_to_token, block_pages, req_pool_indices, last_pos, counts, layer,
                       n_layers, stride_r2t, stride_bp, stride_pt, window, n_tiles, n_progs, tiles_per_prog,
                       HKV: tl.constexpr, BLOCK: tl.constexpr, BLOCK_B: tl.constexpr, ROWS: tl.constexpr,
                       PAGES_TABLE: tl.constexpr):
    p = tl.program_id(0)
    r = tl.program_id(1)
    h = tl.program_id(2)
    base = (r * HKV + h).to(tl.int64) * n_tiles
    nb = _n_blocks(last_pos, r, window, BLOCK)
    row = tl.load(req_pool_indices + r).to(tl.int64)
    for k in range(0, tiles_per_prog):
        t = p + k * n_progs                                  # this program's tiles: p, p + n_progs, ...
        if t < n_tiles:
            t0 = t.to(tl.int64) * BLOCK_B
            total = 0
            if t0 <= nb:
                keep, _, _, _ = _block_keep(mask, req_to_token, block_pages, r, row, h, layer, n_layers, t0, nb,
                                            stride_r2t, stride_bp, HKV, BLOCK, BLOCK_B, PAGES_TABLE)
                total = tl.sum(tl.reshape(keep.to(tl.int32), [BLOCK_B * BLOCK]), 0)
            tl.store(counts + base + t, total)


@triton.jit
def _kept_write_kernel(mask, off, page_table, req_to_token, block_pages, req_pool_indices, last_pos, counts, ends,
                       kept_indptr, kept_row, kept_pos, layer, n_layers, stride_r2t, stride_bp, stride_pt, window,
                       n_tiles, n_progs, tiles_per_prog, HKV: tl.constexpr, BLOCK: tl.constexpr,
                       BLOCK_B: tl.constexpr, ROWS: tl.constexpr, PAGES_TABLE: tl.constexpr, WITH_POS: tl.constexpr):
    p = tl.program_id(0)
    r = tl.program_id(1)
    h = tl.program_id(2)
    rh = r * HKV + h
    base = rh.to(tl.int64) * n_tiles
    if p == 0:
        tl.store(kept_indptr + rh, tl.load(ends + base) - tl.load(counts + base))
    if p == (n_tiles - 1) % n_progs:
        tl.store(kept_indptr + rh + 1, tl.load(ends + base + n_tiles - 1))   # the next (request, head)'s start
    nb = _n_blocks(last_pos, r, window, BLOCK)
    row = tl.load(req_pool_indices + r).to(tl.int64)
    for k in range(0, tiles_per_prog):
        t = p + k * n_progs
        t0 = t.to(tl.int64) * BLOCK_B
        if (t < n_tiles) & (t0 <= nb):
            idx = base + t
            out = tl.load(ends + idx).to(tl.int64) - tl.load(counts + idx)   # inclusive cumsum: the run's end
            keep, rows, pos = _block_tile(mask, off, page_table, req_to_token, block_pages, r, row, h, layer,
                                          n_layers, t0, nb, stride_r2t, stride_bp, stride_pt, HKV, BLOCK, BLOCK_B,
                                          ROWS, PAGES_TABLE)
            k1 = tl.reshape(keep.to(tl.int32), [BLOCK_B * BLOCK])
            dest = out + tl.cumsum(k1, 0) - 1
            tl.store(kept_row + dest, tl.reshape(rows, [BLOCK_B * BLOCK]).to(tl.int32), mask=k1 != 0)
            if WITH_POS:
                tl.store(kept_pos + dest, tl.reshape(pos, [BLOCK_B * BLOCK]).to(tl.int32), mask=k1 != 0)


def n_block_tiles(max_len: int, block: int, window: int, block_tile: int) -> int:
    """Tiles per (request, head) of the grid for sequences of at most max_len tokens (>= 1)."""
    last_block = max((max_len - window) // block, 1) - 1
    return max(triton.cdiv(last_block + 1, block_tile), 1)


def kept_lists(store, layer: int, req_to_token: torch.Tensor, req_pool_indices: torch.Tensor,
               last_pos: torch.Tensor, window: int, kept_row: torch.Tensor, max_len: int,
               kept_pos: torch.Tensor | None = None, block_tile: int = 16,
               block_pages: torch.Tensor | None = None, programs: int | None = None) -> torch.Tensor:
    """Fill kept_row (int32 arena rows) and, when given, kept_pos (int32 positions) for `layer` of a
    `CompressedStore`; last_pos [bs] = position of each request's last query; max_len a host int >= last_pos + 1
    of every request (sets the grid; larger only adds empty tiles). block_pages [bs, >= blocks] (optional): the
    requests' logical pages per block, read instead of req_to_token (decode CUDA graphs: SGLang's scheduler may
    rewrite req_to_token while a graph replays). programs: programs per (request, head), each looping over every
    programs-th tile (default: one per tile, at most about PROGRAMS_PER_SM x SMs in all on CUDA). Returns
    kept_indptr [bs*Hkv+1] int32."""
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len <= 0:
        raise ValueError(f"max_len must be a positive int (an upper bound on last_pos + 1), got {max_len!r}")
    if block_tile <= 0 or block_tile & (block_tile - 1):
        raise ValueError(f"block_tile must be a power of two, got {block_tile!r}")
    block = store.block
    max_len = min(max_len, req_to_token.shape[1])
    bs, hkv = req_pool_indices.numel(), store.mask.shape[2]
    dev = store.mask.device
    kept_indptr = torch.empty(bs * hkv + 1, dtype=torch.int32, device=dev)
    if bs == 0:
        return kept_indptr.zero_()
    n_tiles = n_block_tiles(max_len, block, window, block_tile)
    if programs is None:
        programs = n_tiles if dev.type != "cuda" else triton.cdiv(PROGRAMS_PER_SM * sm_count(dev), bs * hkv)
    n_progs = max(1, min(int(programs), n_tiles))
    counts = torch.empty(bs * hkv * n_tiles, dtype=torch.int32, device=dev)
    ends = torch.empty_like(counts)
    grid = (n_progs, bs, hkv)
    pages_table = block_pages is not None
    common = dict(layer=layer, n_layers=store.mask.shape[1], stride_r2t=req_to_token.stride(0),
                  stride_bp=block_pages.stride(0) if pages_table else 0, stride_pt=store.page_table.stride(0),
                  window=window, n_tiles=n_tiles, n_progs=n_progs, tiles_per_prog=triton.cdiv(n_tiles, n_progs),
                  HKV=hkv, BLOCK=block, BLOCK_B=block_tile, ROWS=store.plan.page_rows, PAGES_TABLE=pages_table)
    bp = block_pages if pages_table else req_to_token
    _kept_count_kernel[grid](store.mask, store.off, store.page_table, req_to_token, bp, req_pool_indices, last_pos,
                             counts, **common)
    torch.cumsum(counts, 0, out=ends)
    _kept_write_kernel[grid](store.mask, store.off, store.page_table, req_to_token, bp, req_pool_indices, last_pos,
                             counts, ends, kept_indptr, kept_row, kept_pos if kept_pos is not None else kept_row,
                             WITH_POS=kept_pos is not None, **common)
    return kept_indptr
