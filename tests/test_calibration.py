"""Calibration: candidates, the per-layer rule, consistency with the online selection, the CLI's errors."""
import json
import subprocess
import sys

import pytest
import torch

from calibration.calibrate import calibrate, candidates, layer_budget, sample_rows
from sglang_tca.algorithm import select, visible
from sglang_tca.params import TCAParams, dense_start
from sglang_tca.budgets import Budgets

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def test_candidates_sorted_and_normalised():
    P, rho = candidates(64)
    assert P.shape[1] == 7 and torch.allclose(P.sum(-1), torch.ones(len(P)))
    assert torch.all(rho.diff() >= 0) and rho[0] < 0.05 and rho[-1] == 1.0
    assert torch.equal(P[-1], torch.tensor([0, 0, 0, 0, 0, 0, 1.0]))   # keep-all is always available


def structured_qk(L=700, hq=4, hkv=2, d=16, seed=0):
    """Head 0 is a sink head (its queries put most mass on the first block: prunable); head 1 is diffuse with
    sharp in-block preferences (needs a larger budget)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(d, generator=g)
    q = torch.randn(hq, L, d, generator=g) * 0.3 + u
    k = torch.randn(hkv, L, d, generator=g)
    k[0] *= 0.3
    k[0, :8] += 2 * u
    k[1] *= 1.5
    return q, k


def dropped_mass_direct(q, k, p, thresholds, rows):
    """Independent check: dropped attention mass of the selection `select` makes at run time."""
    keep, _ = select(q, k, thresholds, p)
    L, g = k.shape[1], q.shape[0] // k.shape[0]
    vis = visible(keep, rows, L, p).repeat_interleave(g, 0)
    s = torch.einsum("hsd,htd->hst", q[:, rows], k.repeat_interleave(g, 0)) * q.shape[-1] ** -0.5
    s = s.masked_fill(torch.arange(L)[None, None] > rows[None, :, None], float("-inf"))
    A = s.softmax(-1)
    lost = 1 - (A * vis).sum(-1)                                 # [Hq, S]
    return lost.view(k.shape[0], g, -1).amax(1).mean(1)


@pytest.mark.parametrize("scoring", ["block_last", "window"])
def test_layer_budget_matches_runtime_selection(scoring):
    p = TCAParams(block=8, window=32, scoring=scoring)
    q, k = structured_qk()
    P, rho = candidates(8)
    choice, dropped, thr = layer_budget(q, k, p, P, eps=0.05, n_rows=64)
    rows = sample_rows(k.shape[1], p, 64)
    for h in range(2):
        # the error calibration reports for the chosen candidate is what the online selection really drops
        direct = dropped_mass_direct(q, k, p, thr[:, choice[h]], rows)[h]
        assert abs(float(direct) - float(dropped[h, choice[h]])) < 1e-4
        assert dropped[h, choice[h]] <= 0.05 or choice[h] == len(P) - 1
        # cheapest passing: every cheaper candidate fails the bound
        assert torch.all(dropped[h, : choice[h]] > 0.05)
    assert rho[choice[0]] < rho[choice[1]]                        # the concentrated head gets the smaller budget


def test_smaller_eps_never_cheaper():
    p = TCAParams(block=8, window=32)
    q, k = structured_qk(seed=1)
    P, rho = candidates(8)
    r = [rho[layer_budget(q, k, p, P, eps=e, n_rows=64)[0]] for e in (0.2, 0.05, 0.01)]
    assert torch.all(r[0] <= r[1]) and torch.all(r[1] <= r[2])


def test_too_short_text_is_a_clear_error():
    with pytest.raises(ValueError, match="too short"):
        sample_rows(40, TCAParams(block=8, window=32), 10)


def test_calibrate_one_forward_pass_writes_valid_budgets(tiny_llama, tmp_path):
    import sglang_tca.hf_attention  # noqa: F401

    calls = []
    ids = torch.randint(0, 128, (1, 400), generator=torch.Generator().manual_seed(0))
    b = calibrate(tiny_llama, ids, eps=0.1, block=8, window=32, scoring="block_last", n_rows=32,
                  progress=calls.append)
    assert calls == [0, 1]                                         # one pass, every layer once
    out = tmp_path / "b.json"
    b.save(out)
    again = Budgets.load(out)
    assert again.model.num_layers == 2 and again.model.num_kv_heads == 2 and again.block == 8
    torch.testing.assert_close(again.p, b.p)
    assert len(again.calibration["dropped_mass"]) == 2


def test_one_pass_gives_eps_sweep_and_uniform_twin(tiny_llama):
    """`measure` once: budgets for several eps (smaller eps never cheaper, same as `calibrate`), and a uniform twin
    whose heads all share one distribution with about the same mean kept share."""
    import sglang_tca.hf_attention  # noqa: F401
    from calibration.calibrate import measure

    ids = torch.randint(0, 128, (1, 400), generator=torch.Generator().manual_seed(0))
    cal = measure(tiny_llama, ids, block=8, window=32, scoring="block_last", n_rows=32)
    loose, tight = cal.budgets(0.2), cal.budgets(0.02)
    assert (tight.rho >= loose.rho - 1e-6).all() and float(tight.rho.mean()) > float(loose.rho.mean())
    direct = calibrate(tiny_llama, ids, eps=0.2, block=8, window=32, scoring="block_last", n_rows=32)
    torch.testing.assert_close(direct.p, loose.p)
    torch.testing.assert_close(direct.thresholds, loose.thresholds)
    uni = cal.uniform(loose)
    uni.validate()
    assert (uni.p == uni.p[0, 0]).all() and not (loose.p == loose.p[0, 0]).all()
    assert abs(float(uni.rho.mean()) - float(loose.rho.mean())) < 0.1
    assert uni.calibration["uniform_of_eps"] == 0.2


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "calibration", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("setup,needle", [
    ("missing", "not found"),
    ("no_config", "config.json"),
    ("unsupported", "GPT2LMHeadModel"),
    ("mla", "MLA"),
])
def test_cli_errors_are_one_line(tmp_path, setup, needle):
    model = tmp_path / "m"
    if setup != "missing":
        model.mkdir()
    cfg = {"unsupported": {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "num_hidden_layers": 2,
                           "num_attention_heads": 2, "hidden_size": 8},
           "mla": {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "kv_lora_rank": 512,
                   "num_hidden_layers": 2, "num_attention_heads": 2, "hidden_size": 8}}.get(setup)
    if cfg:
        (model / "config.json").write_text(json.dumps(cfg))
    r = run_cli("--model", str(model), "--out", str(tmp_path / "b.json"))
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    err = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and needle in err[0], r.stderr


def test_cli_rejects_bad_eps_and_out_dir(tmp_path):
    r = run_cli("--eps", "0", "--out", str(tmp_path / "b.json"))
    assert r.returncode == 2 and "--eps" in r.stderr
    r = run_cli("--out", str(tmp_path / "nope" / "b.json"))
    assert r.returncode == 2 and "output folder" in r.stderr
