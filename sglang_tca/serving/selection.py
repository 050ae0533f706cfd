"""Server-side block selection: the keep masks of blocks that complete in a forward pass.

The selection of block j is computed once, when the forward pass processes the block's last token (position
(j+1)*b - 1), from that token's query (scoring "block_last"), and stored as a b-bit mask (b <= 64, one int64) per
(layer, KV head) in the compressed store's record of the block (`CompressedStore.mask[P, layer, h]`, P the block's
logical page). The sink (block 0) keeps everything. Right after, the block is compacted (kernels/compaction.py).

Why per logical page: the radix cache shares a prefix by sharing its logical pages, so a request that reuses a
cached prefix reads exactly the records the first request wrote, and prefix purity says they are what a fresh
computation would give. No payload travels with radix nodes.

`scores_to_bits` is the selection math (vectorised torch, graph-safe shapes; the same math as
`sglang_tca.algorithm`), `select_blocks` runs it for a forward's block-end tokens, `block_end_rows` finds those tokens
of an extend batch on the host. Tests: tests/test_selection.py (against sglang_tca.algorithm).
"""
from __future__ import annotations

import torch

from sglang_tca.algorithm import apply_policy, block_keep_counts, keep_from_counts, neff


def pack_bits(keep: torch.Tensor) -> torch.Tensor:
    """keep [..., b] bool -> [...] int64 with bit t set for token t (bit 63 wraps to the sign bit, as intended)."""
    shifts = torch.arange(keep.shape[-1], device=keep.device, dtype=torch.int64)
    return (keep.to(torch.int64) << shifts).sum(-1)


def unpack_bits(bits: torch.Tensor, block: int) -> torch.Tensor:
    shifts = torch.arange(block, device=bits.device, dtype=torch.int64)
    return ((bits[..., None] >> shifts) & 1).bool()


def scores_to_bits(q_last: torch.Tensor, k_blk: torch.Tensor, thresholds: torch.Tensor, scale: float,
                   policy: str = "tca", first_pos: torch.Tensor | None = None, heads: torch.Tensor | None = None,
                   layer: int = 0):
    """Selection of n blocks j >= 1 from their last queries (scoring="block_last").

    q_last [n, Hq, D], k_blk [n, b, Hkv, D] (the block's keys), thresholds [Hkv, Kn-1] -> (bits [n, Hkv] int64,
    counts [n, Hkv]). Same math as algorithm.block_scores/neff/block_keep_counts/keep_from_counts/apply_policy;
    the "random" policy also needs the blocks' first positions [n], the global KV head ids [Hkv] and the layer."""
    n, hq, d = q_last.shape
    b, hkv = k_blk.shape[1], k_blk.shape[2]
    g = hq // hkv
    s = torch.einsum("nhgd,nbhd->nhgb", q_last.float().view(n, hkv, g, d), k_blk.float()) * scale
    a = s.softmax(-1).amax(2)                                                        # [n, Hkv, b]
    counts = block_keep_counts(neff(a).T.contiguous(), thresholds.float(), b).T        # [n, Hkv]
    if policy != "tca":
        pos = first_pos.view(n, 1, 1) + torch.arange(b, device=a.device)
        a, counts = apply_policy(a, counts, policy, pos, heads.view(1, hkv, 1), layer)
    return pack_bits(keep_from_counts(a, counts)), counts


def block_end_rows(prefix_lens, extend_lens, block: int) -> tuple[list[int], list[int]]:
    """(rows, positions) of the tokens of a packed extend batch (requests' new tokens back to back; request r's
    start at position prefix_lens[r]) that end a block (the sink included): the tokens that select and compact.
    Host ints in, host lists out, so the server selects those rows alone without a device sync."""
    rows, positions, off = [], [], 0
    for p, e in zip(prefix_lens, extend_lens):
        first = p + (-(p + 1)) % block                                              # (first + 1) % block == 0
        positions.extend(range(first, p + e, block))
        rows.extend(range(off + first - p, off + e, block))
        off += e
    return rows, positions


def select_blocks(q: torch.Tensor, positions: torch.Tensor, rec_page: torch.Tensor, l2d: torch.Tensor,
                  k_dense: torch.Tensor, thresholds: torch.Tensor, mask: torch.Tensor, block: int, layer: int,
                  scale: float, policy: str = "tca", heads: torch.Tensor | None = None,
                  valid: torch.Tensor | None = None) -> None:
    """Select the blocks that end at these tokens and store their masks at mask[P, layer] (P = rec_page).

    q [n, Hq, D] the tokens' queries (this layer), positions [n] (each ends a block, unless `valid` [n] bool says
    otherwise: decode runs every row and its rows that end no block write to logical page 0, SGLang's padding
    page), rec_page [n] their logical pages; l2d SGLang's logical->dense map; k_dense [dense slots, Hkv, D] this
    layer's dense K buffer, holding the blocks' keys; mask [logical pages, layers, Hkv] int64. The sink keeps
    every token."""
    if q.shape[0] == 0:
        return
    tokens = rec_page[:, None] * block + torch.arange(block, device=q.device)          # the blocks' logical ids
    k_blk = k_dense[l2d[tokens]]                                                       # [n, b, Hkv, D]
    bits, _ = scores_to_bits(q, k_blk, thresholds, scale, policy, positions - block + 1, heads, layer)
    bits = torch.where((positions < block)[:, None], torch.full_like(bits, -1 if block == 64 else (1 << block) - 1),
                       bits)
    page = rec_page if valid is None else torch.where(valid, rec_page, torch.zeros_like(rec_page))
    mask[page, layer] = bits
