"""bench/kernel_bench.py builds what it claims and its TCA pieces compute the right thing (CPU: Triton interpreter,
tiny shapes; the GPU timing itself is not tested here): the decode breakdown's store (records, kept share, pages),
its pieces through the command line's smoke mode (selection, compaction, kept lists and attention against
references, on an arena whose unread rows are NaN), and the default mode's arena against the reference attention."""
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
import kernel_bench as kb  # noqa: E402

from sglang_tca.kernels import tca_sparse_attention, tca_sparse_attention_ref  # noqa: E402
from sglang_tca.params import dense_start  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def test_records_have_the_intended_kept_share_per_head():
    bs, ctx, hkv, b, layers = 2, 8192, 4, 64, 2
    case = kb.DecodeCase(ctx, bs, 8, hkv, 8, b, 1024, 0.25, torch.float32, DEV, layers)
    st, shares = case.store, case.shares
    assert torch.allclose(case.built_share, shares, atol=0.02), (case.built_share, shares)   # ~16K bits per head
    assert abs(shares.mean().item() - 0.25) < 1e-6 and shares.unique().numel() == hkv          # heads differ
    P = case.record_pages                                          # blocks 0 .. jl - 1 of every request
    assert P.shape == (bs, ctx // b - 1)
    assert (st.mask[P[:, 0]] == -1).all()                           # the sink keeps all 64 bits
    written = torch.zeros(st.mask.shape[0], dtype=torch.bool, device=DEV)
    written[P.flatten()] = True
    assert (st.mask[~written] == 0).all()                           # masks only in completed blocks' records
    # offsets, cursor and pages as the compaction writes them: layer-major, then head; pages owned once
    cnt = kb.unpack_bits(st.mask[P], b).sum(-1).flatten(2)         # [bs, jl, layers * Hkv]
    assert torch.equal(st.off[P].flatten(2).long(), cnt.cumsum(-1) - cnt)
    assert torch.equal(st.cursor[P].long(), cnt.sum(-1))
    pages = st.page_table[P]
    used = -(-cnt.sum(-1) // case.plan.page_rows)
    assert torch.equal((pages > 0).sum(-1), used)
    owned = torch.cat([pages[pages > 0], st.res_pages[:bs].flatten()])
    assert owned.unique().numel() == owned.numel() and owned.max() < case.plan.heap_pages
    # the step's blocks: no record yet, worst-case pages reserved
    assert (st.mask[case.page] == 0).all() and case.page.tolist() == case.pages[:, ctx // b - 1].tolist()
    assert st.res_pages.shape[1] == layers * hkv * b // case.plan.page_rows


def test_decode_breakdown_smoke_from_the_command_line(tmp_path, capsys):
    """--decode-breakdown --smoke (CPU: fp32 under the interpreter; GPU: bf16, timed): one case whose step ends no
    block (ctx 200) and one whose step ends one (ctx 256); every check of DecodeCase.smoke_checks holds and the
    table lists every piece."""
    out = tmp_path / "smoke.json"
    kb.main(["--decode-breakdown", "--device", DEV, "--smoke", "--no-dense", "--ctx", "200", "256", "--decode-bs",
             "2", "--json", str(out)])
    tol = 1e-5 if DEV == "cpu" else 5e-2                            # the GPU smoke runs bf16
    table = capsys.readouterr().out
    for key, name in kb.PIECES:
        assert f"{key}: {name}" in table
    rows = json.loads(out.read_text())["rows"]
    assert [(r["ctx"], r["bs"]) for r in rows] == [(200, 2), (256, 2)]
    for r in rows:
        res = r["smoke"]
        assert res["lists_match"]                   # c == the plain-Python view of the store's records
        assert res["a_none_writes_nothing"] and res["a_all_writes_block_ends"]
        assert res["b_none_writes_nothing"] and res["b_all_compacts_block_ends"]
        assert res["step_err"] < tol                # e (select + compact + lists + attention) == the reference
        assert res["attention_err"] < tol and r["attention_err_req0"] < tol
        assert max(abs(x - y) for x, y in zip(res["mask_share"], res["target_share"])) < 0.1
        # KV read = sink + kept + window: 16 + ~0.4 * (dense_start - 16) + (ctx - dense_start)
        ds = dense_start(r["ctx"], 16, 64)
        kept = res["read_share"] * r["ctx"] - 16 - (r["ctx"] - ds)
        assert 0.25 * (ds - 16) < kept < 0.55 * (ds - 16)


@pytest.mark.parametrize("q_len", [1, 160])
def test_default_mode_pool_matches_the_reference(q_len):
    """make_pool (the default mode's arena, NaN in every row nothing should read off the GPU): the sparse and the
    keep-all lists give the reference's outputs, decode without positions as the server runs it."""
    bs, ctx = (2, 160) if q_len == 1 else (1, 160)
    common, sparse, full, read = kb.make_pool(bs, ctx, q_len, 4, 2, 16, 16, 64, 0.4, torch.float32, seed=3,
                                              device=DEV)
    assert 0 < read < 1
    assert full["kept_row"].numel() == bs * 2 * dense_start(ctx, 16, 64) > sparse["kept_row"].numel()
    outs = []
    for lists in (sparse, full):
        want = tca_sparse_attention_ref(**common, **lists)
        run = {**lists, "kept_pos": None} if q_len == 1 else lists
        got = tca_sparse_attention(**common, **run, max_q_len=q_len)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
        outs.append(got)
    assert (outs[0] - outs[1]).abs().max() > 1e-3                  # the sparse lists leave tokens out
