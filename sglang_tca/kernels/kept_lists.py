"""Kept-token lists for `tca_sparse_attention` from the block masks the server stores at KV slots.

The server keeps block j's b-bit keep mask at the slot of the block's last token (sglang_tca/slot_state.py). For a
batch, this builds per (request, KV head) the ascending kept positions of the blocks compressed at the request's last
query, as the CSR pair (kept_indptr [bs*Hkv+1], kept_pos) that `tca_sparse_attention` reads. Two passes with no host
synchronisation (count, then write at cumsum offsets), so decode CUDA graphs capture it; `kept_pos` is
caller-allocated with a capacity that bounds the total (e.g. sum of sequence lengths x Hkv).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _block_tile(slot_bits, req_to_token, row, h, t0, nb, stride_sb, stride_r2t,
                BLOCK: tl.constexpr, BLOCK_B: tl.constexpr):
    """Keep mask [BLOCK_B, BLOCK] of blocks j = 1 + t0 .. 1 + t0 + BLOCK_B - 1 (masked beyond block nb)."""
    j = 1 + t0 + tl.arange(0, BLOCK_B)
    valid = j <= nb
    slot = tl.load(req_to_token + row * stride_r2t + (j + 1) * BLOCK - 1, mask=valid, other=0).to(tl.int64)
    bits = tl.load(slot_bits + slot * stride_sb + h, mask=valid, other=0)
    bit = tl.arange(0, BLOCK).to(tl.int64)
    keep = ((bits[:, None] >> bit[None, :]) & 1) != 0
    return keep & valid[:, None], j


@triton.jit
def _kept_lists_kernel(slot_bits, req_to_token, req_pool_indices, last_pos, counts, kept_indptr, kept_pos,
                       stride_sb, stride_r2t, Hkv, window,
                       BLOCK: tl.constexpr, BLOCK_B: tl.constexpr, WRITE: tl.constexpr):
    r = tl.program_id(0)
    h = tl.program_id(1)
    row = tl.load(req_pool_indices + r).to(tl.int64)
    n = tl.load(last_pos + r).to(tl.int64) + 1
    nb = tl.maximum((n - window) // BLOCK, 1) - 1            # blocks 1..nb have left the window
    if WRITE:
        out = tl.load(kept_indptr + r * Hkv + h).to(tl.int64)
    total = 0
    for t0 in range(0, nb, BLOCK_B):
        keep, j = _block_tile(slot_bits, req_to_token, row, h, t0, nb, stride_sb, stride_r2t, BLOCK, BLOCK_B)
        k1 = tl.reshape(keep.to(tl.int32), [BLOCK_B * BLOCK])
        if WRITE:
            pos = tl.reshape(j[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :], [BLOCK_B * BLOCK])
            dest = out + total + tl.cumsum(k1, 0) - 1
            tl.store(kept_pos + dest, pos.to(tl.int32), mask=k1 != 0)
        total += tl.sum(k1, 0)
    if not WRITE:
        tl.store(counts + r * Hkv + h, total)


def kept_lists_from_bits(slot_bits: torch.Tensor, req_to_token: torch.Tensor, req_pool_indices: torch.Tensor,
                         last_pos: torch.Tensor, block: int, window: int, kept_pos: torch.Tensor,
                         block_tile: int = 16) -> torch.Tensor:
    """slot_bits [slots, Hkv] int64 (one layer), last_pos [bs] = position of each request's last query; fills
    kept_pos (int32, capacity >= the total) and returns kept_indptr [bs*Hkv+1] int32."""
    bs, hkv = req_pool_indices.numel(), slot_bits.shape[1]
    counts = torch.empty(bs * hkv, dtype=torch.int32, device=slot_bits.device)
    kept_indptr = torch.zeros(bs * hkv + 1, dtype=torch.int32, device=slot_bits.device)
    if bs == 0:
        return kept_indptr
    args = (slot_bits, req_to_token, req_pool_indices, last_pos, counts, kept_indptr, kept_pos,
            slot_bits.stride(0), req_to_token.stride(0), hkv, window)
    _kept_lists_kernel[(bs, hkv)](*args, BLOCK=block, BLOCK_B=block_tile, WRITE=False)
    torch.cumsum(counts, 0, out=kept_indptr[1:])
    _kept_lists_kernel[(bs, hkv)](*args, BLOCK=block, BLOCK_B=block_tile, WRITE=True)
    return kept_indptr
