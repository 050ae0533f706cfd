"""Kept lists built in a Triton kernel from the slot-stored block masks equal the reference view."""
import pytest
import torch

from sglang_tca.kernels.kept_lists import kept_lists_from_bits, n_block_tiles
from sglang_tca.serving.selection import kept_positions
from test_selection import B, HKV, W, FakePool, rand_seq

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def check_against_reference(indptr, kept_pos, rows, lens, r2t, bits, block, window):
    """indptr/kept_pos equal the CSR of `kept_positions` in (request, head) order; nothing written past the end."""
    indptr, kept_pos, hkv = indptr.cpu(), kept_pos.cpu(), bits.shape[1]
    assert indptr.dtype == torch.int32 and indptr.shape == (len(rows) * hkv + 1,)
    want_ptr = [0]
    for i, (row, n) in enumerate(zip(rows, lens)):
        want = kept_positions(row, n, r2t.cpu(), bits.cpu(), block, window)
        for h in range(hkv):
            want_ptr.append(want_ptr[-1] + len(want[h]))
            got = kept_pos[indptr[i * hkv + h]: indptr[i * hkv + h + 1]].long()
            assert torch.equal(got, want[h]), (i, row, n, h)
    assert indptr.tolist() == want_ptr
    assert (kept_pos[indptr[-1]:] == -1).all()                                       # nothing written past the end


def random_pool(rows, ctx, hkv, block, seed, n_slots=None):
    """Shuffled req_to_token rows and random per-head masks (low `block` bits; some all-zero, some all-one heads)."""
    g = torch.Generator().manual_seed(seed)
    n_slots = n_slots or rows * ctx + 1
    r2t = (torch.randperm(n_slots - 1, generator=g)[: rows * ctx] + 1).view(rows, ctx).int()
    bits = torch.randint(-2 ** 63, 2 ** 63 - 1, (n_slots, hkv), generator=g, dtype=torch.int64)
    if block < 64:
        bits &= (1 << block) - 1
    bits[torch.rand(n_slots, hkv, generator=g) < 0.1] = 0                            # blocks that keep nothing
    bits[torch.rand(n_slots, hkv, generator=g) < 0.1] = -1 if block == 64 else (1 << block) - 1
    return r2t, bits


def run(r2t, bits, rows, lens, block, window, max_len, block_tile):
    last = torch.tensor(lens, device=DEV) - 1
    kept_pos = torch.full((max(sum(lens), 1) * bits.shape[1],), -1, dtype=torch.int32, device=DEV)
    indptr = kept_lists_from_bits(bits.to(DEV), r2t.to(DEV), torch.tensor(rows, device=DEV), last, block, window,
                                  kept_pos, max_len, block_tile=block_tile)
    return indptr, kept_pos


def test_kept_lists_match_slot_view_for_a_batch():
    pool = FakePool(n_slots=3000, rows=4)
    lens = {0: 300, 2: 45, 3: 170}                                                   # one too short to compress
    for row, L in lens.items():
        q, k = rand_seq(L, seed=row)
        pool.extend(row, 0, q, k)
    indptr, kept_pos = run(pool.req_to_token, pool.bits, list(lens), list(lens.values()), B, W, max(lens.values()),
                           16)
    assert indptr[-1] > 0
    check_against_reference(indptr, kept_pos, list(lens), list(lens.values()), pool.req_to_token, pool.bits, B, W)


@pytest.mark.parametrize("block_tile,extra", [(2, 0), (4, 37), (2, 10 ** 9)])   # max_len = longest, longer, clamped
def test_many_tiles_mixed_lengths(block_tile, extra):
    """block 8, window 16: lengths from one token to many tiles per request (nb at, before and after tile edges),
    rows out of order, Hkv = 2; a max_len past the longest request adds tiles that are empty for every request."""
    block, window, hkv, ctx = 8, 16, 2, 256
    r2t, bits = random_pool(rows=9, ctx=ctx, hkv=hkv, block=block, seed=block_tile + extra % 7)
    lens = [1, 200, 31, 32, 40, 8 * 13, 8 * 13 + 7, 8 * 14, 41]
    rows = [5, 0, 8, 2, 7, 1, 3, 6, 4]
    assert n_block_tiles(max(lens), block, window, block_tile) >= 6                  # the longest spans many tiles
    indptr, kept_pos = run(r2t, bits, rows, lens, block, window, max(lens) + extra, block_tile)
    check_against_reference(indptr, kept_pos, rows, lens, r2t, bits, block, window)
    assert indptr[-1] > 0


def test_full_width_masks_and_one_head():
    """block 64 (bit 63 = the int64 sign bit), Hkv = 1, several tiles."""
    block, window = 64, 96
    r2t, bits = random_pool(rows=2, ctx=64 * 14, hkv=1, block=block, seed=3)
    lens, rows = [64 * 14, 64 * 5 + 3], [1, 0]
    indptr, kept_pos = run(r2t, bits, rows, lens, block, window, 64 * 14, 4)
    check_against_reference(indptr, kept_pos, rows, lens, r2t, bits, block, window)


def test_no_compressed_block_and_empty_batch():
    block, window = 8, 16
    r2t, bits = random_pool(rows=3, ctx=64, hkv=2, block=block, seed=4)
    indptr, kept_pos = run(r2t, bits, [2, 0], [31, 5], block, window, 64, 2)         # max_len spans tiles, all empty
    assert indptr.tolist() == [0] * 5 and (kept_pos == -1).all()
    indptr = kept_lists_from_bits(bits, r2t, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long),
                                  block, window, kept_pos, 64)
    assert indptr.tolist() == [0]


@pytest.mark.parametrize("max_len", [0, -5, 3.0, None, "64", True])
def test_max_len_must_be_a_positive_int(max_len):
    r2t, bits = random_pool(rows=1, ctx=64, hkv=1, block=8, seed=5)
    with pytest.raises(ValueError, match="max_len"):
        kept_lists_from_bits(bits, r2t, torch.zeros(1, dtype=torch.long), torch.full((1,), 63), 8, 16,
                             torch.empty(64, dtype=torch.int32), max_len)


def test_observed_blocks_come_from_the_request_masks():
    """With `observed`, blocks 1..obs_nb[row] of each request read obs_bits[row] (the question-aware end of prompt),
    later blocks their slots: obs_nb 0 (off), inside the compressed range, and past it, over several tiles."""
    from sglang_tca.params import dense_start
    from sglang_tca.serving.selection import unpack_bits

    block, window, hkv, ctx = 8, 16, 2, 256
    r2t, bits = random_pool(rows=5, ctx=ctx, hkv=hkv, block=block, seed=11)
    g = torch.Generator().manual_seed(12)
    obs_bits = torch.randint(0, 1 << block, (5, ctx // block + 1, hkv), generator=g, dtype=torch.int64)
    obs_nb = torch.tensor([0, 3, 9, 40, 7], dtype=torch.int32)
    rows, lens = [1, 0, 2, 3, 4], [200, 150, 120, 90, 17]
    last = torch.tensor(lens, device=DEV) - 1
    kept_pos = torch.full((sum(lens) * hkv,), -1, dtype=torch.int32, device=DEV)
    indptr = kept_lists_from_bits(bits.to(DEV), r2t.to(DEV), torch.tensor(rows, device=DEV), last, block, window,
                                  kept_pos, ctx, block_tile=2, observed=(obs_bits.to(DEV), obs_nb.to(DEV)))
    indptr, kept_pos = indptr.cpu(), kept_pos.cpu()
    n_from_obs = 0
    for i, (row, n) in enumerate(zip(rows, lens)):
        nb = dense_start(n, block, window) // block - 1
        for h in range(hkv):
            want = []
            for j in range(1, nb + 1):
                m = obs_bits[row, j, h] if j <= obs_nb[row] else bits[r2t[row, (j + 1) * block - 1], h]
                n_from_obs += int(j <= obs_nb[row])
                want += [j * block + t for t in range(block) if unpack_bits(m, block)[t]]
            got = kept_pos[indptr[i * hkv + h]: indptr[i * hkv + h + 1]].tolist()
            assert got == want, (row, n, h)
    assert n_from_obs > 20 and indptr[-1] > 0
