"""Server-side block selection: the keep masks of blocks that complete in a forward pass.

The selection of block j is computed once, when the forward pass processes the block's last token (position
(j+1)*b - 1), from that token's query (scoring "block_last"), and stored as a b-bit mask (b <= 64, one int64) per
(layer, KV head) in the compressed store's record of the block (`CompressedStore.mask[P, layer, h]`, P the block's
logical page). The sink (block 0) keeps everything. Right after, the block is compacted (kernels/compaction.py).

Why per logical page: the radix cache shares a prefix by sharing its logical pages, so a request that reuses a
cached prefix reads exactly the records the first request wrote, and prefix purity says they are what a fresh
computation would give. No payload travels with radix nodes.

The selection itself is one Triton launch per layer (`sglang_tca.kernels.selection.select_blocks`, the same math as
`sglang_tca.algorithm`); here: `block_end_rows` and `decode_block_ends` find the block-end tokens of an extend or
decode batch on the host, and `pack_bits` / `unpack_bits` convert masks (tests, statistics). Tests:
tests/test_selection.py (against sglang_tca.algorithm).
"""
from __future__ import annotations

import torch


def pack_bits(keep: torch.Tensor) -> torch.Tensor:
    """keep [..., b] bool -> [...] int64 with bit t set for token t (bit 63 wraps to the sign bit, as intended)."""
    shifts = torch.arange(keep.shape[-1], device=keep.device, dtype=torch.int64)
    return (keep.to(torch.int64) << shifts).sum(-1)


def unpack_bits(bits: torch.Tensor, block: int) -> torch.Tensor:
    shifts = torch.arange(block, device=bits.device, dtype=torch.int64)
    return ((bits[..., None] >> shifts) & 1).bool()


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


def decode_block_ends(seq_lens, block: int) -> list[int]:
    """Indices of the decode rows whose token completes a block, given each row's sequence length after the step
    (host ints): a positive multiple of the block. Used by the backend (forward's seq_lens) and by SGLang's decode
    memory check (patches/schedule_batch_check_decode_mem: the length the next step will have). A row's block is
    the sink when its length is the block."""
    return [i for i, n in enumerate(seq_lens) if n > 0 and n % block == 0]
