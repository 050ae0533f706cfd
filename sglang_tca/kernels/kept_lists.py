"""Kept-token lists for `tca_sparse_attention` from the block masks the server stores at KV slots.

The server keeps block j's b-bit keep mask at the slot of the block's last token (sglang_tca/serving/selection.py). For a
batch, this builds per (request, KV head) the ascending kept positions of the blocks compressed at the request's last
query (blocks 1..nb, nb = max((n - window) // b, 1) - 1 with n = last_pos + 1), as the CSR pair
(kept_indptr [bs*Hkv+1], kept_pos) that `tca_sparse_attention` reads, in (request, head) order.

The work is parallel over tiles of `block_tile` blocks: a grid (n_tiles, bs, Hkv), one program per (tile, request,
head), with n_tiles = ceil(nb_max / block_tile) for the nb of the host-side bound `max_len` (an int >= last_pos + 1
of every request: the context length in decode, the batch's longest sequence in extend). Three launches with no host
synchronisation, so decode CUDA graphs capture it (static shapes given bs, Hkv and max_len):
  1. count: each program stores its tile's number of kept tokens (0 past the request's nb) in a flat
     [bs*Hkv*n_tiles] int32 buffer, ordered (request, head, tile);
  2. torch.cumsum of that buffer: the (inclusive) end of every tile's run in kept_pos;
  3. write: each program writes its tile's kept positions at its start offset (end - count, in-tile tl.cumsum), and
     the tile-0 / last-tile programs fill kept_indptr.
Programs of tiles past a request's nb only load its last_pos (and, in the write pass, its count) and exit. A request
longer than max_len would lose the blocks past the last tile: max_len is clamped to req_to_token's row length, which
bounds every position, so passing that (or anything larger) is always safe. `kept_pos` is caller-allocated with a
capacity that bounds the total (e.g. sum of sequence lengths x Hkv); offsets are int32 (total < 2**31).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _block_tile(slot_bits, req_to_token, obs_bits, obs_nb, row, h, t0, nb, stride_sb, stride_r2t, stride_or,
                stride_oj, BLOCK: tl.constexpr, BLOCK_B: tl.constexpr, OBSERVED: tl.constexpr):
    """Keep mask [BLOCK_B, BLOCK] of blocks j = 1 + t0 .. 1 + t0 + BLOCK_B - 1 (masked beyond block nb); with
    OBSERVED, blocks j <= obs_nb[row] come from the request's observed masks obs_bits[row, j, h]."""
    j = 1 + t0 + tl.arange(0, BLOCK_B)
    valid = j <= nb
    from_slot = valid
    if OBSERVED:
        n_obs = tl.load(obs_nb + row)
        from_obs = valid & (j <= n_obs)
        from_slot = valid & (j > n_obs)
    slot = tl.load(req_to_token + row * stride_r2t + (j + 1) * BLOCK - 1, mask=from_slot, other=0).to(tl.int64)
    bits = tl.load(slot_bits + slot * stride_sb + h, mask=from_slot, other=0)
    if OBSERVED:
        bits = tl.where(from_obs, tl.load(obs_bits + row * stride_or + j * stride_oj + h, mask=from_obs, other=0),
                        bits)
    bit = tl.arange(0, BLOCK).to(tl.int64)
    keep = ((bits[:, None] >> bit[None, :]) & 1) != 0
    return keep & valid[:, None], j


@triton.jit
def _kept_count_kernel(slot_bits, req_to_token, obs_bits, obs_nb, req_pool_indices, last_pos, counts,
                       stride_sb, stride_r2t, stride_or, stride_oj, Hkv, window, n_tiles,
                       BLOCK: tl.constexpr, BLOCK_B: tl.constexpr, OBSERVED: tl.constexpr):
    t = tl.program_id(0)
    r = tl.program_id(1)
    h = tl.program_id(2)
    idx = (r * Hkv + h).to(tl.int64) * n_tiles + t
    n = tl.load(last_pos + r).to(tl.int64) + 1
    nb = tl.maximum((n - window) // BLOCK, 1) - 1            # blocks 1..nb have left the window
    t0 = t.to(tl.int64) * BLOCK_B
    total = 0
    if t0 < nb:
        row = tl.load(req_pool_indices + r).to(tl.int64)
        keep, j = _block_tile(slot_bits, req_to_token, obs_bits, obs_nb, row, h, t0, nb, stride_sb, stride_r2t,
                              stride_or, stride_oj, BLOCK, BLOCK_B, OBSERVED)
        total = tl.sum(tl.reshape(keep.to(tl.int32), [BLOCK_B * BLOCK]), 0)
    tl.store(counts + idx, total)


@triton.jit
def _kept_write_kernel(slot_bits, req_to_token, obs_bits, obs_nb, req_pool_indices, last_pos, counts, ends,
                       kept_indptr, kept_pos, stride_sb, stride_r2t, stride_or, stride_oj, Hkv, window, n_tiles,
                       BLOCK: tl.constexpr, BLOCK_B: tl.constexpr, OBSERVED: tl.constexpr):
    t = tl.program_id(0)
    r = tl.program_id(1)
    h = tl.program_id(2)
    rh = r * Hkv + h
    idx = rh.to(tl.int64) * n_tiles + t
    end = tl.load(ends + idx)                                # inclusive cumsum: this tile's run ends here
    if t == 0:
        tl.store(kept_indptr + rh, end - tl.load(counts + idx))
    if t == n_tiles - 1:
        tl.store(kept_indptr + rh + 1, end)                  # the next (request, head)'s start; the total at the end
    n = tl.load(last_pos + r).to(tl.int64) + 1
    nb = tl.maximum((n - window) // BLOCK, 1) - 1
    t0 = t.to(tl.int64) * BLOCK_B
    if t0 < nb:
        out = end.to(tl.int64) - tl.load(counts + idx)
        row = tl.load(req_pool_indices + r).to(tl.int64)
        keep, j = _block_tile(slot_bits, req_to_token, obs_bits, obs_nb, row, h, t0, nb, stride_sb, stride_r2t,
                              stride_or, stride_oj, BLOCK, BLOCK_B, OBSERVED)
        k1 = tl.reshape(keep.to(tl.int32), [BLOCK_B * BLOCK])
        pos = tl.reshape(j[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :], [BLOCK_B * BLOCK])
        dest = out + tl.cumsum(k1, 0) - 1
        tl.store(kept_pos + dest, pos.to(tl.int32), mask=k1 != 0)


def n_block_tiles(max_len: int, block: int, window: int, block_tile: int) -> int:
    """Tiles per (request, head) of the grid for sequences of at most max_len tokens (>= 1)."""
    nb_max = max((max_len - window) // block, 1) - 1
    return max(triton.cdiv(nb_max, block_tile), 1)


def kept_lists_from_bits(slot_bits: torch.Tensor, req_to_token: torch.Tensor, req_pool_indices: torch.Tensor,
                         last_pos: torch.Tensor, block: int, window: int, kept_pos: torch.Tensor, max_len: int,
                         block_tile: int = 16, observed: tuple[torch.Tensor, torch.Tensor] | None = None
                         ) -> torch.Tensor:
    """slot_bits [slots, Hkv] int64 (one layer), last_pos [bs] = position of each request's last query, max_len a
    host int >= last_pos + 1 of every request (sets the grid; larger only adds empty tiles); fills kept_pos (int32,
    capacity >= the total) and returns kept_indptr [bs*Hkv+1] int32. `observed` = (obs_bits [R, nblk, Hkv] int64
    (one layer), obs_nb [R] int32): blocks 1..obs_nb[row] of the request in req_to_token row `row` take their masks
    from obs_bits[row] instead of the slots (the question-aware end of prompt, see sglang_tca.serving.backend)."""
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len <= 0:
        raise ValueError(f"max_len must be a positive int (an upper bound on last_pos + 1), got {max_len!r}")
    if block_tile <= 0 or block_tile & (block_tile - 1):
        raise ValueError(f"block_tile must be a power of two, got {block_tile!r}")
    max_len = min(max_len, req_to_token.shape[1])            # every position indexes a req_to_token row
    bs, hkv = req_pool_indices.numel(), slot_bits.shape[1]
    dev = slot_bits.device
    kept_indptr = torch.empty(bs * hkv + 1, dtype=torch.int32, device=dev)
    if bs == 0:
        return kept_indptr.zero_()
    n_tiles = n_block_tiles(max_len, block, window, block_tile)
    counts = torch.empty(bs * hkv * n_tiles, dtype=torch.int32, device=dev)
    ends = torch.empty_like(counts)
    grid = (n_tiles, bs, hkv)
    obs_bits, obs_nb = observed if observed is not None else (slot_bits, last_pos)   # unread without OBSERVED
    if observed is not None and obs_bits.stride(2) != 1:
        raise ValueError("obs_bits must be contiguous over KV heads")
    common = dict(stride_sb=slot_bits.stride(0), stride_r2t=req_to_token.stride(0),
                  stride_or=obs_bits.stride(0), stride_oj=obs_bits.stride(1) if observed is not None else 0,
                  Hkv=hkv, window=window, n_tiles=n_tiles, BLOCK=block, BLOCK_B=block_tile,
                  OBSERVED=observed is not None)
    _kept_count_kernel[grid](slot_bits, req_to_token, obs_bits, obs_nb, req_pool_indices, last_pos, counts, **common)
    torch.cumsum(counts, 0, out=ends)
    _kept_write_kernel[grid](slot_bits, req_to_token, obs_bits, obs_nb, req_pool_indices, last_pos, counts, ends,
                             kept_indptr, kept_pos, **common)
    return kept_indptr
