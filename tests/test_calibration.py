"""Calibration: candidates, the per-layer rule, consistency with the online selection, the CLI's errors (one line,
exit 2, before the model loads)."""
import json
import os
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


# ---------------------------------------------------------------------------------------------------------------------
# The CLI's input checks: one `error:` line, exit 2, before the model loads
# ---------------------------------------------------------------------------------------------------------------------
class _ModelLoaded(Exception):
    """Raised by the stubbed model load: the run got past every check."""


@pytest.fixture
def model_loads(monkeypatch):
    """Calibration's model load, replaced by a recorder that stops the run there."""
    from transformers import AutoModelForCausalLM

    loads = []

    def load(*args, **kwargs):
        loads.append(args)
        raise _ModelLoaded

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", load)
    return loads


@pytest.fixture
def essays_cache():
    """The essays text is cached per process; tests that point SGLANG_TCA_ESSAYS elsewhere start and end afresh."""
    from sglang_tca import essays

    for f in (essays.paul_graham_text, essays.split_offsets):
        f.cache_clear()
    yield
    for f in (essays.paul_graham_text, essays.split_offsets):
        f.cache_clear()


@pytest.fixture
def bare_model(tmp_path):
    """A Llama folder with a config.json only: enough for every check; loading it would fail differently."""
    d = tmp_path / "bare"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096}))
    return d


def one_error_line(capsys, argv) -> str:
    from calibration.__main__ import main

    rc = main(argv)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize("args,needle", [
    (["--tokens", "-1"], "--tokens must be at least 1, got -1"),
    (["--tokens", "0"], "--tokens must be at least 1, got 0"),
    (["--rows", "0"], "--rows must be at least 1, got 0"),
    (["--rows", "-5"], "--rows must be at least 1, got -5"),
    (["--eps", "0"], "--eps must be in (0, 1), got 0.0"),
    (["--eps", "1"], "--eps must be in (0, 1), got 1.0"),
    (["--eps", "nan"], "--eps must be in (0, 1), got nan"),
    (["--block", "48"], "--block must be a positive power of two, got 48"),
    (["--block", "0"], "--block must be a positive power of two, got 0"),
    (["--block", "-64"], "--block must be a positive power of two, got -64"),
    (["--window", "100"], "--window (100) must be a positive multiple of --block (64)"),
    (["--window", "-1024"], "--window (-1024) must be a positive multiple of --block (64)"),
    (["--scoring", "window"], "the server cannot serve budgets with scoring 'window'"),
    (["--block", "128"], "the server cannot serve budgets with block 128"),
    (["--tokens", "abc"], "argument --tokens: invalid int value: 'abc'"),
    (["--scoring", "middle"], "argument --scoring: invalid choice: 'middle'"),
])
def test_cli_bad_arguments(capsys, model_loads, bare_model, tmp_path, args, needle):
    line = one_error_line(capsys, ["--model", str(bare_model), "--out", str(tmp_path / "b.json"), *args])
    assert needle in line and model_loads == []
    if "cannot serve" in needle:
        assert "--allow-unservable" in line


def test_cli_out_must_be_a_writable_file(capsys, model_loads, bare_model, tmp_path, monkeypatch):
    base = ["--model", str(bare_model)]
    assert "--out " + str(tmp_path) + " is a folder" in one_error_line(capsys, [*base, "--out", str(tmp_path)])
    assert "output folder does not exist" in one_error_line(capsys, [*base, "--out", str(tmp_path / "no" / "b.json")])
    assert "required: --out" in one_error_line(capsys, base)
    import calibration.__main__ as cal_main

    monkeypatch.setattr(cal_main.os, "access", lambda path, mode: False)   # a read-only folder (tests may run as root)
    line = one_error_line(capsys, [*base, "--out", str(tmp_path / "b.json")])
    assert f"output folder is not writable: {tmp_path}" in line
    assert model_loads == []


@pytest.mark.parametrize("content,needle", [
    ('{"txt": "essays"}', 'must be a JSON object whose "text"'),
    ('["essays"]', 'must be a JSON object whose "text"'),
    ('{"text": 5}', 'must be a JSON object whose "text"'),
    ('{"text": "x"', "is not valid JSON"),
    (None, "No such file or directory"),
])
def test_cli_bad_essays_file(capsys, model_loads, essays_cache, bare_model, tmp_path, monkeypatch, content, needle):
    essays = tmp_path / "essays.json"
    if content is not None:
        essays.write_text(content)
    monkeypatch.setenv("SGLANG_TCA_ESSAYS", str(essays))
    line = one_error_line(capsys, ["--model", str(bare_model), "--out", str(tmp_path / "b.json")])
    assert needle in line and str(essays) in line and model_loads == []


def test_cli_too_few_tokens_before_the_model_loads(capsys, model_loads, smollm2_dir, tmp_path):
    line = one_error_line(capsys, ["--model", str(smollm2_dir), "--out", str(tmp_path / "b.json"), "--tokens", "1000"])
    assert "calibration text of 1000 tokens is too short for window 1024 and block 64" in line
    assert model_loads == []


def test_cli_allow_unservable_warns_and_proceeds(capsys, model_loads, smollm2_dir, tmp_path):
    from calibration.__main__ import main

    with pytest.raises(_ModelLoaded):   # past every check: it would calibrate
        main(["--model", str(smollm2_dir), "--out", str(tmp_path / "b.json"), "--scoring", "window",
              "--allow-unservable"])
    err = capsys.readouterr().err
    assert "warning: the server cannot serve these budgets (scoring 'window'" in err and len(model_loads) == 1


def test_cli_subprocess_exit_code_and_no_traceback(tmp_path, bare_model):
    """The same checks in a real process: exit code 2, one line, no traceback."""
    (tmp_path / "essays.json").write_text('{"txt": "essays"}')
    for args, env in ((["--rows", "-5"], {}), ([], {"SGLANG_TCA_ESSAYS": str(tmp_path / "essays.json")})):
        r = subprocess.run([sys.executable, "-m", "calibration", "--model", str(bare_model), "--out",
                            str(tmp_path / "b.json"), *args], cwd=ROOT, capture_output=True, text=True, timeout=120,
                           env={**os.environ, **env})
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error: "), r.stderr
