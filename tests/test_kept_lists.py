"""Kept lists built in a Triton kernel from the compressed store's records (kernels.kept_lists) equal a plain-Python
view of those records: for request row `row` and layer l, block j is record P = req_to_token[row, j*b] // b, its
kept positions are the set bits of mask[P, l, h] (j*b + t for bit t), stored from virtual row off[P, l, h] on,
virtual row v at arena row page_table[P, v // R] * R + v % R. Listed blocks: the sink (block 0) once complete, then
blocks 1..nb, nb = max((n - window) // b, 1) - 1, n = last_pos + 1."""
import math

import pytest
import torch

from sglang_tca.kernels.kept_lists import kept_lists, n_block_tiles
from sglang_tca.params import dense_start
from sglang_tca.serving.sizing import MemoryPlan, ModelDims
from sglang_tca.serving.store import CompressedStore, record_kept

DEV = "cuda" if torch.cuda.is_available() else "cpu"
POISON = -7


def full_mask(block):
    return -1 if block == 64 else (1 << block) - 1


class Records:
    """A store whose records were written as the compaction writes them (per record: layer-major, then KV head, the
    kept rows of each (layer, head) consecutive from off[P, l, h]; the record's pages from the shuffled free list),
    with random masks (some heads keep nothing, some everything; the sink keeps everything), and req_to_token rows
    of logical ids (one logical page per block, shuffled; rows may share a prefix of pages, as radix-cache hits)."""

    def __init__(self, lens, rows, block, window, hkv, layers=3, page_rows=8, ctx=None, shared=(), seed=0):
        g = torch.Generator().manual_seed(seed)
        self.block, self.window, self.hkv, self.layers = block, window, hkv, layers
        ctx = ctx or max(lens) + 2 * block
        n_blocks = sum(-(-n // block) for n in lens)
        rec_pages = math.ceil(layers * hkv * block / page_rows)
        n_lp = n_blocks + 4
        plan = MemoryPlan(ModelDims(layers, hkv, 16, 16, 2), block, window, 4 * block, n_blocks * rec_pages + 8,
                          n_lp * block, max_pages_per_record=rec_pages, block_reserve_pages=rec_pages,
                          expected_share=0.5, decode_kept_rows=0, reservation_rows=4, budget_bytes=0,
                          page_rows=page_rows)
        self.store = CompressedStore(plan, "cpu", chunk_tokens=64)
        free_pages = (torch.randperm(plan.heap_pages - 1, generator=g) + 1).tolist()     # page 0 is the trash page
        free_lp = (torch.randperm(n_lp, generator=g) + 1).tolist()                       # logical page 0: padding
        self.r2t = torch.zeros(max(rows) + 2, ctx, dtype=torch.int32)
        mask, off, pt = self.store.mask, self.store.off, self.store.page_table
        shared = dict(shared)                                    # dst row -> (src row, blocks shared)
        for row, n in sorted(zip(rows, lens), key=lambda x: x[0] in shared):
            src, m = shared.get(row, (None, 0))
            for j in range(-(-n // block)):
                if j < m:                                        # the cached prefix: the same logical pages
                    self.r2t[row, j * block:(j + 1) * block] = self.r2t[src, j * block:(j + 1) * block]
                    continue
                p = free_lp.pop()
                self.r2t[row, j * block:(j + 1) * block] = torch.arange(p * block, (p + 1) * block)
                if (j + 1) * block > n:
                    continue                                     # an open block has no record yet
                bits = torch.randint(-2 ** 63, 2 ** 63 - 1, (layers, hkv), generator=g, dtype=torch.int64)
                if block < 64:
                    bits &= (1 << block) - 1
                bits[torch.rand(layers, hkv, generator=g) < 0.1] = 0
                bits[torch.rand(layers, hkv, generator=g) < 0.1] = full_mask(block)
                if j == 0:
                    bits[:] = full_mask(block)
                mask[p] = bits
                cursor = 0
                for l in range(layers):
                    for h in range(hkv):
                        off[p, l, h] = cursor
                        cursor += popcount(int(bits[l, h]), block)
                used = -(-cursor // page_rows)
                pt[p, :used] = torch.tensor([free_pages.pop() for _ in range(used)], dtype=torch.int32)
                self.store.cursor[p] = cursor
        self.store.mask, self.store.off, self.store.page_table = mask.to(DEV), off.to(DEV), pt.to(DEV)

    def view(self, row, n, layer):
        """[(positions, rows)] per KV head of request row `row` whose last query is at n - 1 (plain Python)."""
        b, R = self.block, self.store.plan.page_rows
        mask, off, pt = self.store.mask.cpu(), self.store.off.cpu(), self.store.page_table.cpu()
        nb = max((n - self.window) // b, 1) - 1 if n >= b else -1
        assert nb + 1 == (dense_start(n, b, self.window) // b if n >= b else 0)
        out = []
        for h in range(self.hkv):
            pos, rows = [], []
            for j in range(nb + 1):
                for t, r in record_kept(mask, off, pt, int(self.r2t[row, j * b]) // b, layer, h, b, R):
                    pos.append(j * b + t)
                    rows.append(r)
            out.append((pos, rows))
        return out


def popcount(bits: int, block: int) -> int:
    return bin(bits & ((1 << block) - 1)).count("1")


def run(rec, rows, lens, layer, max_len, block_tile=16, with_pos=True, programs=None):
    last = torch.tensor(lens, device=DEV) - 1
    cap = max(sum(lens), 1) * rec.hkv
    kept_row = torch.full((cap,), POISON, dtype=torch.int32, device=DEV)
    kept_pos = torch.full((cap,), POISON, dtype=torch.int32, device=DEV) if with_pos else None
    indptr = kept_lists(rec.store, layer, rec.r2t.to(DEV), torch.tensor(rows, device=DEV), last, rec.window,
                        kept_row, max_len, kept_pos, block_tile=block_tile, programs=programs)
    return indptr.cpu(), kept_row.cpu(), None if kept_pos is None else kept_pos.cpu()


def check(rec, rows, lens, layer, indptr, kept_row, kept_pos):
    """The CSR triple equals the records' view in (request, head) order; nothing is written past the total."""
    hkv = rec.hkv
    assert indptr.dtype == torch.int32 and indptr.shape == (len(rows) * hkv + 1,)
    want_ptr = [0]
    for i, (row, n) in enumerate(zip(rows, lens)):
        for h, (pos, rws) in enumerate(rec.view(row, n, layer)):
            want_ptr.append(want_ptr[-1] + len(pos))
            lo, hi = int(indptr[i * hkv + h]), int(indptr[i * hkv + h + 1])
            assert kept_row[lo:hi].tolist() == rws, (i, row, n, h)
            if kept_pos is not None:
                assert kept_pos[lo:hi].tolist() == pos, (i, row, n, h)
    assert indptr.tolist() == want_ptr
    assert (kept_row[want_ptr[-1]:] == POISON).all()                                  # nothing past the total
    if kept_pos is not None:
        assert (kept_pos[want_ptr[-1]:] == POISON).all()


# block 8, window 16: the sink is listed from n = 8 on, block 1 from n = 32 (= w + 2b) on.
B, W, HKV = 8, 16, 2
LENS = [1, 200, 31, 32, 40, 8 * 13, 8 * 13 + 7, 8 * 14, 41, 7, 8, 9, 23]   # < b, [b, w + 2b), long
ROWS = [5, 0, 8, 2, 7, 1, 3, 6, 4, 12, 9, 10, 11]                          # out of order
SHARED = {6: (0, 10), 11: (0, 2)}              # rows 6 and 11 start with row 0's first 10 / 2 blocks (cached prefix)


@pytest.mark.parametrize("block_tile,extra,programs", [(16, 0, None), (2, 0, None), (4, 37, None), (2, 10 ** 9, None),
                                                       (2, 0, 1), (2, 37, 3), (4, 10 ** 9, 2)])
def test_kept_lists_match_the_records(block_tile, extra, programs):
    """Lengths from one token to many tiles per request (nb at, before and after tile edges), in every range,
    rows out of order, shared prefixes, Hkv = 2; a max_len past the longest request (longer, clamped) adds tiles that
    are empty for every request, and one past req_to_token's width is clamped to it. programs < tiles: each program
    loops over several tiles (one program for all, 3 with the last tile not on program 0, 2)."""
    rec = Records(LENS, ROWS, B, W, HKV, shared=SHARED, seed=block_tile + extra % 7)
    assert n_block_tiles(max(LENS), B, W, block_tile) >= (6 if block_tile == 2 else 1)   # many tiles
    for layer in (0, 2):
        indptr, kept_row, kept_pos = run(rec, ROWS, LENS, layer, max(LENS) + extra, block_tile, programs=programs)
        check(rec, ROWS, LENS, layer, indptr, kept_row, kept_pos)
        sizes = indptr.diff().view(len(LENS), HKV).sum(1)
        assert sizes[[0, 9]].sum() == 0                                 # shorter than a block: nothing listed
        assert (sizes[[2, 10, 11, 12]] == B * HKV).all()                 # the sink alone
        assert (sizes[[1, 5, 7]] > B * HKV).all()                        # compressed blocks
    assert not torch.equal(run(rec, ROWS, LENS, 1, max(LENS))[1], kept_row)       # layers differ


def test_kept_pos_none_writes_only_rows():
    rec = Records(LENS, ROWS, B, W, HKV, seed=3)
    want = run(rec, ROWS, LENS, 1, max(LENS), block_tile=4)
    indptr, kept_row, _ = run(rec, ROWS, LENS, 1, max(LENS), block_tile=4, with_pos=False)
    assert torch.equal(indptr, want[0]) and torch.equal(kept_row, want[1])         # rows, not positions
    check(rec, ROWS, LENS, 1, indptr, kept_row, None)


def test_block_pages_table_replaces_req_to_token():
    """With block_pages [bs, blocks] (decode under CUDA graphs: the backend copies each request's blocks' logical
    pages before a replay) the kernel reads the table, not req_to_token: zeroed shared rows change nothing."""
    rec = Records(LENS, ROWS, B, W, HKV, shared=SHARED, seed=8)
    r2t = rec.r2t.to(DEV)
    pages = (r2t[torch.tensor(ROWS, device=DEV)][:, 0:r2t.shape[1]:B] // B).int()
    last = torch.tensor(LENS, device=DEV) - 1
    cap = sum(LENS) * HKV
    kept_row = torch.full((cap,), POISON, dtype=torch.int32, device=DEV)
    kept_pos = torch.full_like(kept_row, POISON)
    indptr = kept_lists(rec.store, 1, torch.zeros_like(r2t), torch.tensor(ROWS, device=DEV), last, W, kept_row,
                        r2t.shape[1], kept_pos, block_tile=4, block_pages=pages)
    check(rec, ROWS, LENS, 1, indptr.cpu(), kept_row.cpu(), kept_pos.cpu())


def test_full_width_masks_and_one_head():
    """block 64 (bit 63 = the int64 sign bit), Hkv = 1, records spanning pages of 16 rows, several tiles."""
    block, window = 64, 96
    lens, rows = [64 * 14, 64 * 5 + 3, 64], [1, 0, 2]
    rec = Records(lens, rows, block, window, 1, layers=2, page_rows=16, seed=4)
    assert (rec.store.mask < 0).any()
    indptr, kept_row, kept_pos = run(rec, rows, lens, 1, 64 * 14, block_tile=4)
    check(rec, rows, lens, 1, indptr, kept_row, kept_pos)


def test_nothing_listed_and_empty_batch():
    rec = Records([5, 7, 40], [2, 0, 1], B, W, HKV, seed=5)
    indptr, kept_row, kept_pos = run(rec, [2, 0], [5, 7], 0, 64, block_tile=2)    # max_len spans tiles, all empty
    assert indptr.tolist() == [0] * 5 and (kept_row == POISON).all() and (kept_pos == POISON).all()
    buf = torch.full((8,), POISON, dtype=torch.int32, device=DEV)
    indptr = kept_lists(rec.store, 0, rec.r2t.to(DEV), torch.zeros(0, dtype=torch.long, device=DEV),
                        torch.zeros(0, dtype=torch.long, device=DEV), W, buf, 64, buf)
    assert indptr.tolist() == [0] and (buf == POISON).all()


@pytest.mark.parametrize("max_len", [0, -5, 3.0, None, "64", True])
def test_max_len_must_be_a_positive_int(max_len):
    rec = Records([40], [0], B, W, 1, seed=6)
    with pytest.raises(ValueError, match="max_len"):
        kept_lists(rec.store, 0, rec.r2t.to(DEV), torch.zeros(1, dtype=torch.long, device=DEV),
                   torch.full((1,), 39, device=DEV), W, torch.empty(64, dtype=torch.int32, device=DEV), max_len)


@pytest.mark.parametrize("block_tile", [0, 3, -4])
def test_block_tile_must_be_a_power_of_two(block_tile):
    rec = Records([40], [0], B, W, 1, seed=7)
    with pytest.raises(ValueError, match="block_tile"):
        kept_lists(rec.store, 0, rec.r2t.to(DEV), torch.zeros(1, dtype=torch.long, device=DEV),
                   torch.full((1,), 39, device=DEV), W, torch.empty(64, dtype=torch.int32, device=DEV), 40,
                   block_tile=block_tile)
