"""bench/kernel_bench.py --decode-breakdown builds what it claims and its TCA pieces compute the right thing (CPU:
Triton interpreter, tiny shapes; the GPU timing itself is not tested here)."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
import kernel_bench as kb  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def test_slot_bits_have_the_intended_kept_share_per_head():
    g = torch.Generator(device=DEV).manual_seed(0)
    bs, ctx, hkv, b = 2, 8192, 4, 64
    _, _, r2t = kb.make_kv(bs, ctx, hkv, 8, torch.float32, g)
    shares = kb.head_shares(0.25, hkv, DEV)
    bits = kb.make_slot_bits(r2t, bs, ctx, bs * ctx + 64, shares, b, g)[0]
    ends = torch.arange(2 * b - 1, ctx, b, device=DEV)
    slots = r2t[1:bs + 1][:, ends].long()
    got = kb.unpack_bits(bits[slots], b).float().mean(dim=(0, 1, 3))                 # ~16K bits per head
    assert torch.allclose(got, shares, atol=0.02), (got, shares)
    assert abs(shares.mean().item() - 0.25) < 1e-6 and shares.unique().numel() == hkv   # heads differ, mean = keep
    written = torch.zeros(bits.shape[0], dtype=torch.bool, device=DEV)
    written[slots.flatten()] = True
    assert (bits[~written] == 0).all()                                                # masks only at block ends


def test_decode_pieces_match_the_references():
    case = kb.DecodeCase(ctx=256, bs=2, hq=4, hkv=2, d=16, block=16, window=64, keep=0.4, dtype=torch.float32,
                         device=DEV, n_layers=2)
    res = case.smoke_checks()
    assert res["lists_match"]                       # b == selection.kept_positions
    assert res["a_none_writes_only_slot0"] and res["a_all_writes_block_ends"]
    assert res["step_err"] < 1e-5                   # d (select + lists + attention) == tca_sparse_attention_ref
    assert res["attention_err"] < 1e-5
    # KV read = sink + kept + window: 16 + ~0.4 * (dense_start - 16) + (256 - dense_start), dense_start = 192
    kept = (res["read_share"] * 256 - 16 - 64)
    assert 0.25 * 176 < kept < 0.55 * 176
