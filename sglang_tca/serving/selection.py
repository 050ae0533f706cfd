"""Where the server keeps TCA's selections: one keep mask per (layer, KV-pool slot, KV head).

The selection of block j is computed once, when the forward pass processes the block's last token (position
(j+1)*b - 1), and stored as a b-bit mask (b <= 64, one int64) at that token's KV slot. Why at the slot:

* The radix cache shares a prefix by sharing its KV slots. A request that reuses a cached prefix reads, through
  `req_to_token`, exactly the slots (and so the selections) the first request wrote, and prefix purity says those
  selections are what a fresh computation would give. No payload travels with radix nodes.
* A freed slot is only read again as a block-last slot after a new block-last token was written there, which
  recomputes its mask first; masks of other slots are never read.

`scores_to_bits` and `select_at_slots` are the server-side selection (vectorised torch, graph-safe shapes);
`kept_positions` expands the masks of a request into its kept token positions. Tests: tests/test_selection.py
(against sglang_tca.algorithm).

The question-aware end of prompt (`--tca-observe N`, `observe_request`) is the one selection that is *not* prefix-pure:
it belongs to one request, so it is kept per request (a row of `obs_bits` [R, blocks, Hkv] per layer, indexed like
req_to_token), never at shared slots.
"""
from __future__ import annotations

import torch

from sglang_tca.algorithm import apply_policy, block_keep_counts, keep_from_counts, neff, observe_keep
from sglang_tca.params import TCAParams, dense_start


def bits_dtype_check(block: int) -> None:
    if block > 64:
        raise ValueError(f"the server stores a block's keep mask in 64 bits; block {block} > 64 is not supported")


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
    """Selection of n blocks from their last queries (scoring="block_last").

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


def block_end_rows(prefix_lens, extend_lens, block: int) -> list[int]:
    """Rows of a packed extend batch (requests' new tokens back to back; request r's start at position
    prefix_lens[r]) whose token ends a block j >= 1: the only tokens that select. Host ints in, host list out, so the
    server can select those rows alone without a device sync (`select_at_slots` on the subset)."""
    rows, off = [], 0
    for p, e in zip(prefix_lens, extend_lens):
        first = max(p, 2 * block - 1)
        first += (-(first + 1)) % block                                             # (first + 1) % block == 0
        rows.extend(range(off + first - p, off + e, block))
        off += e
    return rows


def select_at_slots(q: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, req_rows: torch.Tensor,
                    req_to_token: torch.Tensor, k_buffer: torch.Tensor, thresholds: torch.Tensor,
                    slot_bits: torch.Tensor, block: int, scale: float, policy: str = "tca",
                    heads: torch.Tensor | None = None, layer: int = 0) -> None:
    """For every token of the batch that ends a block j >= 1, select that block and store its mask at the token's
    slot. Tokens that end no block write to slot 0 (SGLang's padding slot), so shapes stay static (CUDA graphs).

    q [T, Hq, D] this layer's queries; positions, slots (out_cache_loc), req_rows (req_pool_idx per token) [T];
    req_to_token [R, C]; k_buffer [slots, Hkv, D]; slot_bits [slots, Hkv] int64 (this layer's, written in place).
    The block's keys must already be in k_buffer (the caller saves the batch's K/V first). policy, heads (global KV
    head ids of k_buffer's heads) and layer as in `scores_to_bits`."""
    ends = ((positions + 1) % block == 0) & (positions >= 2 * block - 1)
    start = (positions - block + 1).clamp_min(0)
    cols = start[:, None] + torch.arange(block, device=positions.device)             # [T, b]
    k_slots = req_to_token[req_rows[:, None].long(), cols.long()]                      # [T, b]
    bits, _ = scores_to_bits(q, k_buffer[k_slots.long()], thresholds, scale, policy, start, heads, layer)
    dest = torch.where(ends, slots, torch.zeros_like(slots))
    slot_bits[dest.long()] = torch.where(ends[:, None], bits, slot_bits[dest.long()])


def observe_request(q_obs: torch.Tensor, k_buffer: torch.Tensor, req_to_token: torch.Tensor, row: torch.Tensor,
                    n: int, counts: torch.Tensor, p: TCAParams, scale: float, obs_bits: torch.Tensor) -> torch.Tensor:
    """Question-aware end of prompt of one request of length n (a host int; n >= w + 2b) in req_to_token row `row`
    ([1] device tensor: no host sync): `algorithm.observe_keep` of its last queries q_obs [N, Hq, D] over its keys,
    keeping counts [Hkv] tokens per head. Writes the masks of its compressed blocks 1..nb into obs_bits [R, nblk,
    Hkv] (this layer's, int64) at that row and returns the kept positions as [Hkv, ds - b] int32, each head's
    ascending and then padded with ds (entries the attention kernel ignores, so the list of head h is the fixed
    range [h * (ds - b), (h + 1) * (ds - b)): kept_indptr needs no host sync)."""
    ds = int(dense_start(n, p.block, p.window))
    slots = req_to_token.index_select(0, row)[0, :n].long()
    keep = observe_keep(q_obs.transpose(0, 1), k_buffer[slots].transpose(0, 1), counts, p, scale)   # [Hkv, ds - b]
    hkv, nb = keep.shape[0], ds // p.block - 1
    blocks = torch.arange(1, nb + 1, device=keep.device)
    obs_bits.view(-1, hkv)[row * obs_bits.shape[1] + blocks] = pack_bits(keep.view(hkv, nb, p.block)).T
    pos = torch.arange(p.block, ds, device=keep.device, dtype=torch.int32)
    return torch.where(keep, pos, ds).sort(-1).values


def kept_positions(req_row: int, seq_len: int, req_to_token, slot_bits, block: int, window: int) -> list[torch.Tensor]:
    """Kept positions per KV head of the compressed blocks of one request at length seq_len (a reference/debug view
    used by tests; the attention kernels read the masks directly)."""
    from sglang_tca.params import dense_start

    n_comp = dense_start(seq_len, block, window) // block - 1
    if n_comp <= 0:
        return [torch.zeros(0, dtype=torch.long) for _ in range(slot_bits.shape[1])]
    last = torch.arange(1, n_comp + 1) * block + block - 1
    bits = slot_bits[req_to_token[req_row, last].long()]                               # [n_comp, Hkv]
    keep = unpack_bits(bits, block)                                                   # [n_comp, Hkv, b]
    pos = (torch.arange(1, n_comp + 1)[:, None] * block + torch.arange(block)).flatten()
    return [pos[keep[:, h].flatten().cpu()] for h in range(slot_bits.shape[1])]
