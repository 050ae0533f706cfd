"""Server-side selection stored at KV slots equals the reference, across chunks, decode steps and shared prefixes."""
import math

import pytest
import torch

from sglang_tca.algorithm import select
from sglang_tca.params import TCAParams, dense_start
from sglang_tca.serving.selection import kept_positions, pack_bits, select_at_slots, unpack_bits

HQ, HKV, D, B, W = 6, 2, 16, 8, 32


def thresholds():
    kn = int(math.log2(B)) + 1
    return torch.stack([torch.linspace(1.2, 6.0, kn - 1), torch.linspace(1.05, 2.5, kn - 1)])


class FakePool:
    """req_to_token + a K buffer with shuffled slot ids, like SGLang's pools (slot 0 is the padding slot)."""

    def __init__(self, n_slots=2000, rows=4, ctx=600, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.free = (torch.randperm(n_slots - 1, generator=g) + 1).tolist()
        self.req_to_token = torch.zeros(rows, ctx, dtype=torch.int32)
        self.k = torch.zeros(n_slots, HKV, D)
        self.bits = torch.zeros(n_slots, HKV, dtype=torch.int64)

    def extend(self, row, start, q, k, policy="tca", layer=0, heads=(0, 1)):
        """Process tokens [start, start+T) of request `row` (q [T, Hq, D], k [T, Hkv, D]) as one forward chunk."""
        T = k.shape[0]
        slots = torch.tensor([self.free.pop() for _ in range(T)], dtype=torch.int32)
        self.req_to_token[row, start:start + T] = slots
        self.k[slots.long()] = k                                                     # the backend saves K/V first
        pos = torch.arange(start, start + T)
        select_at_slots(q, pos, slots.long(), torch.full((T,), row), self.req_to_token, self.k, thresholds(),
                        self.bits, B, D ** -0.5, policy, torch.tensor(heads), layer)


def reference_kept(q, k, L, policy="tca", layer=0):
    p = TCAParams(B, W, policy=policy)
    keep, _ = select(q.transpose(0, 1), k.transpose(0, 1), thresholds(), p, layer)
    ds = dense_start(L, B, W)
    return [torch.nonzero(keep[h, B:ds]).flatten() + B for h in range(HKV)]


def rand_seq(L, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(L, HQ, D, generator=g), torch.randn(L, HKV, D, generator=g) * 2


def test_pack_roundtrip_including_sign_bit():
    keep = torch.rand(50, 64, generator=torch.Generator().manual_seed(0)) < 0.5
    keep[0, 63] = True
    assert torch.equal(unpack_bits(pack_bits(keep), 64), keep)


@pytest.mark.parametrize("policy", ["tca", "random"])
@pytest.mark.parametrize("chunks", [[300], [100, 77, 123], [250] + [1] * 50])
def test_chunked_prefill_and_decode_match_reference(chunks, policy):
    L = sum(chunks)
    q, k = rand_seq(L, seed=1)
    pool = FakePool()
    start = 0
    for c in chunks:                                                                 # prefill chunks, then decode
        pool.extend(0, start, q[start:start + c], k[start:start + c], policy, layer=3)
        start += c
    got = kept_positions(0, L, pool.req_to_token, pool.bits, B, W)
    want = reference_kept(q, k, L, policy, layer=3)
    assert any(len(w) < (dense_start(L, B, W) - B) for w in want)                     # something was pruned
    for h in range(HKV):
        assert torch.equal(got[h], want[h])


def test_streaming_policy_keeps_no_compressed_token():
    q, k = rand_seq(300, seed=4)
    pool = FakePool()
    pool.extend(0, 0, q, k, "streaming")
    assert all(len(h) == 0 for h in kept_positions(0, 300, pool.req_to_token, pool.bits, B, W))


def test_random_policy_draws_by_global_head_id():
    """A tensor-parallel rank passes its global KV head ids: the same keys under other global ids draw differently,
    under the same ids identically."""
    q, k = rand_seq(300, seed=5)
    views = []
    for heads in ((2, 3), (2, 3), (0, 1)):
        pool = FakePool()
        pool.extend(0, 0, q, k, "random", heads=heads)
        views.append(kept_positions(0, 300, pool.req_to_token, pool.bits, B, W))
    assert all(torch.equal(a, b) for a, b in zip(views[0], views[1]))
    assert not all(torch.equal(a, b) for a, b in zip(views[0], views[2]))


def test_block_end_rows_are_the_selecting_tokens():
    """The host-side rows the server selects in an extend batch are exactly the tokens select_at_slots would store
    a mask for (positions ending a block j >= 1), for prefixes and chunks at and around block edges."""
    from sglang_tca.serving.selection import block_end_rows

    cases = [([0], [300]), ([0, 5, 63, 64, 127, 130], [1, 200, 1, 64, 2, 7]), ([2 * B - 1, 0], [1, 2 * B - 1]),
             ([], []), ([40], [0])]
    for prefix, ext in cases:
        pos = torch.cat([torch.arange(p, p + e) for p, e in zip(prefix, ext)] or [torch.zeros(0, dtype=torch.long)])
        want = torch.nonzero(((pos + 1) % B == 0) & (pos >= 2 * B - 1)).flatten().tolist()
        assert block_end_rows(prefix, ext, B) == want, (prefix, ext)
