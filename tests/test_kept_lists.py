"""Kept lists built in a Triton kernel from the slot-stored block masks equal the reference view."""
import torch

from sglang_tca.kernels.kept_lists import kept_lists_from_bits
from sglang_tca.slot_state import kept_positions
from test_slot_state import B, HKV, W, FakePool, rand_seq


def test_kept_lists_match_slot_view_for_a_batch():
    pool = FakePool(n_slots=3000, rows=4)
    lens = {0: 300, 2: 45, 3: 170}                                                   # one too short to compress
    for row, L in lens.items():
        q, k = rand_seq(L, seed=row)
        pool.extend(row, 0, q, k)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    rows = torch.tensor(list(lens), device=dev)
    last = torch.tensor(list(lens.values()), device=dev) - 1
    kept_pos = torch.full((sum(lens.values()) * HKV,), -1, dtype=torch.int32, device=dev)
    indptr = kept_lists_from_bits(pool.bits.to(dev), pool.req_to_token.to(dev), rows, last, B, W, kept_pos)
    indptr, kept_pos = indptr.cpu(), kept_pos.cpu()
    assert indptr[-1] > 0
    for i, (row, L) in enumerate(lens.items()):
        want = kept_positions(row, L, pool.req_to_token, pool.bits, B, W)
        for h in range(HKV):
            got = kept_pos[indptr[i * HKV + h]: indptr[i * HKV + h + 1]].long()
            assert torch.equal(got, want[h]), (row, h)
    assert (kept_pos[indptr[-1]:] == -1).all()                                       # nothing written past the end
