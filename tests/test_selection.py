"""Server-side block selection (the Triton kernel sglang_tca.kernels.selection, with sglang_tca.serving.selection's
host side) writes, into the compressed store's mask table [logical pages, layers, Hkv], the keep masks
`algorithm.select` gives, across prefill chunks, batches of several requests, decode steps (every row runs; rows that
end no block write nothing), policies and layers. On CPU the kernel runs under the Triton interpreter (fp32)."""
import math

import pytest
import torch

from sglang_tca.algorithm import select
from sglang_tca.params import TCAParams, dense_start
from sglang_tca.kernels.selection import select_blocks
from sglang_tca.serving.selection import block_end_rows, decode_block_ends, pack_bits, unpack_bits

HQ, HKV, D, B, W, LAYERS = 6, 2, 16, 8, 32, 4
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def thresholds():
    kn = int(math.log2(B)) + 1
    return torch.stack([torch.linspace(1.2, 6.0, kn - 1), torch.linspace(1.05, 2.5, kn - 1)])


class Pool:
    """SGLang's tables as the TCA server has them: req_to_token rows of logical ids (one logical page per block, pages
    shuffled; page 0 is the padding page), the logical -> dense map (dense slots shuffled per token), this layer's
    dense K buffer [slots, Hkv, D] (NaN where no key was saved) and the store's mask table."""

    def __init__(self, rows=4, ctx=600, block=B, n_pages=400, n_dense=3000, seed=0, heads=(0, 1)):
        g = torch.Generator().manual_seed(seed)
        self.block = block
        self.free_pages = (torch.randperm(n_pages - 1, generator=g) + 1).tolist()
        self.free_dense = (torch.randperm(n_dense, generator=g) + block).tolist()    # dense page 0: padding
        self.r2t = torch.zeros(rows, ctx, dtype=torch.int32)
        self.l2d = torch.zeros(n_pages * block, dtype=torch.int64)
        self.k = torch.full((n_dense + block, HKV, D), float("nan"))
        self.mask = torch.zeros(n_pages, LAYERS, HKV, dtype=torch.int64)
        self.len = [0] * rows
        self.heads = torch.tensor(heads)

    def _alloc(self, row, n):
        b = self.block
        for t in range(self.len[row], self.len[row] + n):
            if t % b == 0:
                self.page = self.free_pages.pop()
                self.r2t[row, t:t + b] = torch.arange(self.page * b, (self.page + 1) * b)
            self.l2d[int(self.r2t[row, t])] = self.free_dense.pop()

    def _save(self, chunks):
        """Allocate and save K of [(row, q [T, Hq, D], k [T, Hkv, D])]; packed (q, positions, logical ids)."""
        starts = [self.len[r] for r, _, _ in chunks]
        for (r, q, k), s in zip(chunks, starts):
            self._alloc(r, k.shape[0])
            lid = self.r2t[r, s:s + k.shape[0]].long()
            self.k[self.l2d[lid]] = k                                        # the backend saves K/V first
            self.len[r] += k.shape[0]
        q = torch.cat([q for _, q, _ in chunks])
        pos = torch.cat([torch.arange(s, s + k.shape[0]) for (_, _, k), s in zip(chunks, starts)])
        loc = torch.cat([self.r2t[r, s:s + k.shape[0]].long() for (r, _, k), s in zip(chunks, starts)])
        return q, pos, loc, starts

    def extend(self, chunks, policy="tca", layer=0):
        """One extend forward, as the backend runs it: the host finds the block-end rows, they select."""
        q, pos, loc, starts = self._save(chunks)
        rows, positions = block_end_rows(starts, [k.shape[0] for _, _, k in chunks], self.block)
        sel = torch.tensor(rows, dtype=torch.long)
        assert pos[sel].tolist() == positions
        self._select(q[sel], pos[sel], loc[sel] // self.block, policy, layer, check_pos=False)
        return len(rows)

    def decode(self, steps, policy="tca", layer=0):
        """One decode forward [(row, q [1, Hq, D], k [1, Hkv, D])]: every row runs, those that end no block return."""
        q, pos, loc, _ = self._save(steps)
        before = self.mask.clone()
        self._select(q, pos, loc // self.block, policy, layer, check_pos=True)
        ends = (pos + 1) % self.block == 0
        written = (self.mask != before).any(-1).any(-1).nonzero().flatten()
        assert set(written.tolist()) <= set((loc[ends] // self.block).tolist())   # no other page written
        return int(ends.sum())

    def _select(self, q, pos, page, policy, layer, check_pos):
        """The kernel on DEV (compiled on a GPU, interpreted on CPU); the mask table stays a CPU tensor here."""
        mask = self.mask.to(DEV)
        select_blocks(q.to(DEV), pos.to(DEV), page.to(DEV), self.l2d.to(DEV), self.k.to(DEV), thresholds().to(DEV),
                      mask, self.block, layer, D ** -0.5, policy, self.heads, check_pos=check_pos)
        self.mask.copy_(mask.cpu())

    def view(self, row, layer=0):
        """keep [Hkv, complete blocks * b] read from the masks of the request's block records."""
        b = self.block
        pages = self.r2t[row, 0:(self.len[row] // b) * b:b].long() // b
        return unpack_bits(self.mask[pages, layer], b).permute(1, 0, 2).reshape(HKV, -1)


def reference_keep(q, k, policy="tca", layer=0, block=B):
    """algorithm.select's keep [Hkv, complete blocks * b] (heads = global ids 0..Hkv-1)."""
    p = TCAParams(block, max(W, 2 * block), policy=policy)
    keep, _ = select(q.transpose(0, 1), k.transpose(0, 1), thresholds(), p, layer)
    return keep[:, : (k.shape[0] // block) * block]


def rand_seq(L, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(L, HQ, D, generator=g), torch.randn(L, HKV, D, generator=g) * 2


def test_pack_roundtrip_including_sign_bit():
    keep = torch.rand(50, 64, generator=torch.Generator().manual_seed(0)) < 0.5
    keep[0, 63] = True
    keep[1] = True
    bits = pack_bits(keep)
    assert bits[0] < 0 and bits[1] == -1
    assert torch.equal(unpack_bits(bits, 64), keep)
    small = keep[:, :8]
    assert torch.equal(unpack_bits(pack_bits(small), 8), small) and (pack_bits(small) < 256).all()


@pytest.mark.parametrize("policy", ["tca", "random", "streaming"])
@pytest.mark.parametrize("chunks", [[300], [100, 77, 123], [250] + [1] * 50])
def test_chunked_prefill_and_decode_match_reference(chunks, policy):
    """Two requests side by side: prefill chunks in the same forwards (the second one shorter and offset), then
    decode steps, at layer 3. The masks of every complete block equal algorithm.select's; the sink keeps all."""
    layer = 3
    seqs = [rand_seq(sum(chunks), seed=1), rand_seq(sum(chunks) + 5, seed=2)]
    pool = Pool()
    rows = (2, 0)
    pool.extend([(rows[1], seqs[1][0][:5], seqs[1][1][:5])], policy, layer)        # offsets the second request
    done = [0, 5]
    n_sel = 0
    for c in chunks:
        step = []
        for i, row in enumerate(rows):
            q, k = seqs[i]
            step.append((row, q[done[i]:done[i] + c], k[done[i]:done[i] + c]))
            done[i] += c
        n_sel += pool.decode(step, policy, layer) if c == 1 else pool.extend(step, policy, layer)
    assert n_sel == sum(n // B for n in done) - 5 // B
    for i, row in enumerate(rows):
        want = reference_keep(*seqs[i], policy, layer)
        assert torch.equal(pool.view(row, layer), want), (row, policy)
        assert pool.view(row, layer)[:, :B].all()                                   # the sink keeps everything
        for other in set(range(LAYERS)) - {layer}:                                   # one layer's masks only
            assert not pool.view(row, other).any()
    ds = dense_start(done[0], B, W)
    kept = pool.view(rows[0], layer)[:, B:ds].sum(-1)
    if policy == "streaming":
        assert (kept == 0).all()                                                    # no compressed token kept
    else:
        assert (kept < ds - B).any() and (kept > 0).all()                            # something was pruned


def test_decode_rows_that_end_no_block_write_only_the_padding_page():
    q, k = rand_seq(40, seed=3)
    pool = Pool()
    pool.extend([(1, q[:30], k[:30])])
    pool.extend([(3, q[:13], k[:13])])
    before = pool.mask.clone()
    n = pool.decode([(1, q[30:31], k[30:31]), (3, q[13:14], k[13:14])])            # positions 30, 13: no block end
    assert n == 0
    changed = (pool.mask != before).any(-1).any(-1).nonzero().flatten().tolist()
    assert set(changed) <= {0}
    n = pool.decode([(1, q[31:32], k[31:32]), (3, q[14:15], k[14:15])])            # position 31 ends block 3
    changed = (pool.mask[1:] != before[1:]).any(-1).any(-1).nonzero().flatten() + 1
    assert n == 1 and changed.tolist() == [int(pool.r2t[1, 31]) // B]
    assert torch.equal(pool.view(1), reference_keep(q[:32], k[:32]))


def test_block_64_uses_the_sign_bit():
    q, k = rand_seq(64 * 4 + 10, seed=4)
    pool = Pool(block=64, ctx=64 * 6, n_pages=16, n_dense=64 * 6)
    pool.extend([(0, q[:100], k[:100])])
    pool.extend([(0, q[100:], k[100:])])
    pages = pool.r2t[0, 0:256:64].long() // 64
    assert (pool.mask[pages[0], 0] == -1).all()                                     # the sink: all 64 bits
    assert torch.equal(pool.view(0), reference_keep(q, k, block=64))


def test_random_policy_draws_by_global_head_id():
    """A tensor-parallel rank passes its global KV head ids: the same keys under other global ids draw differently,
    under the same ids identically."""
    q, k = rand_seq(300, seed=5)
    views = []
    for heads in ((2, 3), (2, 3), (0, 1)):
        pool = Pool(heads=heads)
        pool.extend([(0, q, k)], "random")
        views.append(pool.view(0))
    assert torch.equal(views[0], views[1])
    assert not torch.equal(views[0], views[2])
    assert torch.equal(views[2], reference_keep(q, k, "random"))
    assert torch.equal(views[0].sum(-1), views[2].sum(-1))                         # TCA's counts, other tokens


def test_block_end_rows_are_the_selecting_tokens():
    """The host-side (rows, positions) of an extend batch are exactly the tokens that end a block (the sink's end
    at position b - 1 included), for prefixes and chunks at and around block edges."""
    cases = [([0], [300]), ([0, 5, 63, 64, 127, 130], [1, 200, 1, 64, 2, 7]), ([2 * B - 1, 0], [1, 2 * B - 1]),
             ([], []), ([40], [0]), ([0, 0], [B - 1, B]), ([B - 2], [1]), ([B - 1], [1])]
    for prefix, ext in cases:
        pos = torch.cat([torch.arange(p, p + e) for p, e in zip(prefix, ext)] or [torch.zeros(0, dtype=torch.long)])
        want = torch.nonzero((pos + 1) % B == 0).flatten()
        rows, positions = block_end_rows(prefix, ext, B)
        assert rows == want.tolist(), (prefix, ext)
        assert positions == pos[want].tolist(), (prefix, ext)
    assert block_end_rows([0], [B], B) == ([B - 1], [B - 1])                       # block 0 ends at b - 1
    assert block_end_rows([0, 3], [B, B], B) == ([B - 1, B + B - 4], [B - 1, B - 1])


def test_decode_block_ends_agree_with_the_extend_rule():
    """A decode step is an extend of one token at position n - 1: its rows that end a block are the ones
    block_end_rows finds for that one-token extend (the sink's end at length b included, nothing at length 0)."""
    lens = [0, 1, B - 1, B, B + 1, 2 * B, 3 * B - 1, 5 * B]
    want = [i for i, n in enumerate(lens) if n and block_end_rows([n - 1], [1], B)[0]]
    assert decode_block_ends(lens, B) == want == [3, 5, 7]
