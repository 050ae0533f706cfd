"""Plugin registration, ServerArgs validation, TCA config and the launch.py CLI (CPU only).

SGLang is imported once per session (~10 s on CPU); everything else is fast.
"""
from __future__ import annotations

import copy
import json
import multiprocessing as mp
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sglang_tca import config as tca_config
from sglang_tca.budgets import Budgets, BudgetsError, ModelShape
from sglang_tca.config import ENV_VAR, TCAConfig, TCAConfigError

ROOT = Path(__file__).resolve().parents[1]
LLAMA_CFG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256, "intermediate_size": 512,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 1000,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "torch_dtype": "float16", "rope_theta": 10000.0,
}
KEEP_ALL = [0, 0, 0, 0, 0, 0, 1]  # block 64: keep counts 1..64
SGLANG_FLAGS = ["--load-format", "dummy", "--skip-tokenizer-init", "--device", "cpu"]


def make_model(d: Path, cfg: dict = LLAMA_CFG, budgets: bool = True) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg))
    if budgets:
        Budgets.uniform(ModelShape.from_hf_config(cfg), KEEP_ALL, block=64, window=256).save(d / "tca_budgets.json")
    return d


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.delenv("SGLANG_TCA_DEBUG", raising=False)


@pytest.fixture
def model(tmp_path) -> Path:
    return make_model(tmp_path / "llama")


@pytest.fixture(scope="session")
def sgl():
    """Import SGLang once and register TCA (idempotent)."""
    from sglang_tca import plugin

    plugin.register()
    return plugin


# ---------------------------------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------------------------------
def _hook_count() -> int:
    from sglang.srt.server_args import ServerArgs

    from sglang_tca.plugin import _after_post_init

    n, fn = 0, ServerArgs.__dict__["__post_init__"]
    while fn is not None:
        n += sum(1 for c in (getattr(fn, "__closure__", None) or ()) if c.cell_contents is _after_post_init)
        fn = getattr(fn, "__wrapped__", None)
    return n


def test_register_is_idempotent_and_makes_tca_a_valid_choice(sgl, model):
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
    from sglang.srt.server_args import ATTENTION_BACKEND_CHOICES, prepare_server_args

    sgl.register()
    sgl.register()
    sgl._registered = False  # force the full path again: must not duplicate anything
    sgl.register()
    assert ATTENTION_BACKEND_CHOICES.count("tca") == 1
    assert ATTENTION_BACKENDS["tca"] is sgl._create_tca_backend
    assert _hook_count() == 1

    sa = prepare_server_args(["--model-path", str(model), *SGLANG_FLAGS,
                              "--attention-backend", "tca"])
    assert sa.attention_backend == "tca" and sa.radix_cache_backend is None and sa.page_size == 1


def test_scheduler_entry_registers_loads_config_and_calls_stock(sgl, model, monkeypatch):
    import pickle

    import sglang.srt.managers.scheduler as sched
    from sglang.srt.server_args import prepare_server_args

    calls = []
    monkeypatch.setattr(sched, "run_scheduler_process", lambda *a, **k: calls.append((a, k)) or "ran")
    TCAConfig(budgets=str(model / "tca_budgets.json"), window=128).to_env()
    sa = prepare_server_args(["--model-path", str(model), *SGLANG_FLAGS, "--attention-backend", "tca"])
    assert sgl.run_scheduler_process(sa, "port_args", 0, 0, 0, 0, 0, 0, None, "writer") == "ran"
    assert calls[0][0][0] is sa and calls[0][0][-1] == "writer"
    rt = tca_config.load_runtime(sa.model_path)
    assert rt.window == 128 and rt.block == 64
    # pickled by reference, so spawned children import sglang_tca.plugin
    assert pickle.loads(pickle.dumps(sgl.run_scheduler_process)) is sgl.run_scheduler_process


# ---------------------------------------------------------------------------------------------------------------------
# ServerArgs validation
# ---------------------------------------------------------------------------------------------------------------------
UNSUPPORTED = [  # (attribute, value, text the message must contain)
    ("speculative_algorithm", "EAGLE", "--speculative-algorithm"),
    ("enable_dp_attention", True, "--enable-dp-attention"),
    ("disaggregation_mode", "prefill", "--disaggregation-mode"),
    ("disaggregation_mode", "decode", "--disaggregation-mode"),
    ("enable_hierarchical_cache", True, "--enable-hierarchical-cache"),
    ("enable_hisparse", True, "--enable-hisparse"),
    ("enable_two_batch_overlap", True, "--enable-two-batch-overlap"),
    ("enable_mixed_chunk", True, "--enable-mixed-chunk"),
    ("prefill_attention_backend", "triton", "--prefill-attention-backend"),
    ("decode_attention_backend", "flashinfer", "--decode-attention-backend"),
    ("kv_cache_dtype", "fp8_e4m3", "--kv-cache-dtype"),
    ("kv_cache_dtype", "fp8_e5m2", "--kv-cache-dtype"),
    ("kv_cache_dtype", "fp4_e2m1", "--kv-cache-dtype"),
    ("kv_cache_dtype", "nvfp4", "--kv-cache-dtype"),
    ("page_size", 16, "--page-size"),
    ("radix_cache_backend", "other", "--radix-cache-backend"),
]


@pytest.fixture(scope="session")
def tca_server_args(sgl, tmp_path_factory):
    from sglang.srt.server_args import prepare_server_args

    m = make_model(tmp_path_factory.mktemp("m") / "llama", budgets=False)
    return prepare_server_args(["--model-path", str(m), *SGLANG_FLAGS, "--attention-backend", "tca"])


def _with(sa, **changes):
    """A copy of resolved (read-only) ServerArgs with some fields changed."""
    sa = copy.copy(sa)
    for k, v in changes.items():
        object.__setattr__(sa, k, v)
    return sa


@pytest.mark.parametrize("attr,value,flag", UNSUPPORTED)
def test_validation_names_each_unsupported_flag(sgl, tca_server_args, attr, value, flag):
    sgl.validate_server_args(tca_server_args)  # the resolved defaults are fine
    sa = _with(tca_server_args, **{attr: value})
    with pytest.raises(TCAConfigError, match=flag):
        sgl.validate_server_args(sa)


def test_validation_ignores_other_backends_and_lists_all_problems(sgl, tca_server_args):
    sa = _with(tca_server_args, attention_backend="triton", enable_mixed_chunk=True, page_size=16)
    sgl.validate_server_args(sa)  # not TCA: nothing to say
    sa = _with(sa, decode_attention_backend="tca")
    with pytest.raises(TCAConfigError, match="--decode-attention-backend tca"):
        sgl.validate_server_args(sa)
    sa = _with(tca_server_args, enable_mixed_chunk=True, page_size=16)
    with pytest.raises(TCAConfigError, match="--enable-mixed-chunk.*--page-size 16"):
        sgl.validate_server_args(sa)


@pytest.mark.parametrize("extra,flag", [
    (["--enable-mixed-chunk"], "--enable-mixed-chunk"),
    (["--kv-cache-dtype", "fp8_e5m2"], "--kv-cache-dtype fp8_e5m2"),
    (["--page-size", "16"], "--page-size 16"),
    (["--prefill-attention-backend", "triton"], "--prefill-attention-backend triton"),
    (["--enable-hierarchical-cache"], "--enable-hierarchical-cache"),
    (["--disaggregation-mode", "prefill"], "--disaggregation-mode prefill"),
    (["--speculative-algorithm", "NGRAM"], "--speculative-algorithm NGRAM"),
    (["--radix-cache-backend", "lmcache"], "--radix-cache-backend lmcache"),
])
def test_hook_rejects_in_prepare_server_args(sgl, model, extra, flag):
    """The AFTER hook on ServerArgs.__post_init__ is really installed: prepare_server_args raises."""
    from sglang.srt.server_args import prepare_server_args

    with pytest.raises(TCAConfigError, match=flag):
        prepare_server_args(["--model-path", str(model), *SGLANG_FLAGS, "--attention-backend", "tca", *extra])


# ---------------------------------------------------------------------------------------------------------------------
# Config, model checks, budgets discovery, for_rank
# ---------------------------------------------------------------------------------------------------------------------
def test_config_env_roundtrip_and_errors():
    env: dict = {}
    c = TCAConfig(budgets="/x/b.json", window=512, block=64, policy="random", observe=32)
    c.to_env(env)
    assert TCAConfig.from_env(env) == c and TCAConfig.from_env({}) is None
    for bad in ("{", "[]", '{"windw": 3}', '{"version": 9}', '{"window": "big"}', '{"window": 0}', '{"block": 48}',
                '{"policy": "oracle"}', '{"observe": -1}', '{"observe": 2.5}'):
        with pytest.raises(TCAConfigError):
            TCAConfig.from_json(bad)


@pytest.mark.parametrize("patch,match", [
    ({"kv_lora_rank": 512, "architectures": ["DeepseekV3ForCausalLM"]}, "MLA"),
    ({"model_type": "deepseek_v2"}, "MLA"),
    ({"sliding_window": 1024}, "sliding-window"),
    ({"layer_types": ["full_attention", "sliding_attention"]}, "sliding_attention"),
    ({"layer_types": ["full_attention", "linear_attention"]}, "linear_attention"),
    ({"model_type": "gemma2"}, "hybrid"),
    ({"hybrid_override_pattern": "M-M*"}, "hybrid"),
    ({"attention_chunk_size": 8192}, "attention_chunk_size"),
])
def test_unsupported_models_refused(patch, match):
    with pytest.raises(TCAConfigError, match=match):
        tca_config.check_model_supported({**LLAMA_CFG, **patch})


@pytest.mark.parametrize("patch", [
    {},
    {"sliding_window": 4096, "use_sliding_window": False, "model_type": "qwen2"},  # Qwen2: present but unused
    {"sliding_window": None},
    {"sliding_window": 4096},  # window >= context: never slides
    {"layer_types": ["full_attention", "full_attention"]},
])
def test_supported_models_accepted(patch):
    tca_config.check_model_supported({**LLAMA_CFG, **patch})


def test_budgets_discovery_order(tmp_path, monkeypatch):
    model = make_model(tmp_path / "m", budgets=False)
    shipped = tmp_path / "pkg" / "smollm2_budgets.json"
    monkeypatch.setattr(tca_config, "EMBEDDED_BUDGETS", shipped)
    with pytest.raises(TCAConfigError, match="python -m calibration --model PATH --out FILE"):
        tca_config.discover_budgets(model, is_embedded=True)  # nothing shipped yet
    shipped.parent.mkdir()
    shipped.write_text("{}")
    assert tca_config.discover_budgets(model, is_embedded=True) == shipped
    with pytest.raises(TCAConfigError, match="no TCA budgets"):
        tca_config.discover_budgets(model, is_embedded=False)  # shipped budgets are for the embedded model only
    (model / "tca_budgets.json").write_text("{}")
    assert tca_config.discover_budgets(model, is_embedded=True) == model / "tca_budgets.json"
    assert tca_config.discover_budgets(model, tmp_path / "x.json", is_embedded=True) == tmp_path / "x.json"


def test_embedded_model_detection(tmp_path, monkeypatch):
    import types

    emb = make_model(tmp_path / "emb", budgets=False)
    monkeypatch.setitem(sys.modules, "sglang_tca.embedded_model",
                        types.SimpleNamespace(embedded_model_dir=lambda: emb))
    assert tca_config.is_embedded_model(emb) and tca_config.is_embedded_model(str(emb) + "/")
    assert not tca_config.is_embedded_model(tmp_path / "other")
    monkeypatch.setitem(sys.modules, "sglang_tca.embedded_model", None)  # import fails -> not embedded
    assert not tca_config.is_embedded_model(emb)


def test_resolve_overrides(model):
    rt = TCAConfig().resolve(model)
    assert (rt.window, rt.block, rt.sink) == (256, 64, 64)
    with pytest.raises(TCAConfigError, match="--tca-block 32"):
        TCAConfig(block=32).resolve(model)
    with pytest.raises(TCAConfigError, match="multiple of the block"):
        TCAConfig(window=100).resolve(model)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_for_rank_slices_heads(tmp_path, tp):
    shape = ModelShape("LlamaForCausalLM", num_layers=3, num_q_heads=32, num_kv_heads=8, head_dim=128)
    b = Budgets.uniform(shape, KEEP_ALL)
    kn = b.p.shape[-1]
    b.p = torch.nn.functional.one_hot(torch.arange(8) % kn, kn).float().expand(3, 8, kn).clone()  # head-distinct
    b.thresholds = torch.arange(kn - 1, dtype=torch.float32).expand(3, 8, kn - 1).clone()
    b.save(tmp_path / "b.json")
    b = Budgets.load(tmp_path / "b.json")
    per = 8 // tp
    parts = [b.for_rank(r, tp) for r in range(tp)]
    for r, part in enumerate(parts):
        assert part.p.shape == (3, per, kn)
        assert torch.equal(part.p, b.p[:, r * per:(r + 1) * per])
        assert torch.equal(part.thresholds, b.thresholds[:, r * per:(r + 1) * per])
    assert torch.equal(torch.cat([p.p for p in parts], 1), b.p)


def test_for_rank_replicates_when_tp_exceeds_heads():
    shape = ModelShape("X", num_layers=2, num_q_heads=8, num_kv_heads=2, head_dim=64)
    b = Budgets.uniform(shape, KEEP_ALL)
    b.p[:, 1] = torch.tensor([0, 0, 0, 0, 0, 1.0, 0])
    for tp in (4, 8):
        for r in range(tp):
            part = b.for_rank(r, tp)
            assert part.p.shape == (2, 1, 7) and torch.equal(part.p[:, 0], b.p[:, r // (tp // 2)])
    with pytest.raises(BudgetsError):
        b.for_rank(0, 3)


def test_config_reaches_spawned_process(model, monkeypatch):
    """SGLang starts schedulers with spawn: the env var must carry the config there."""
    TCAConfig(budgets=str(model / "tca_budgets.json"), window=192).to_env()
    with mp.get_context("spawn").Pool(1) as pool:
        rt = pool.apply(tca_config.load_runtime, (str(model),))
    assert rt.window == 192 and rt.budgets_path == str(model / "tca_budgets.json")


# ---------------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------------
def _run_main(argv, capsys, **kw):
    from sglang_tca import cli

    rc = cli.main(argv, **kw)
    return rc, capsys.readouterr().err


def _corrupt(tmp_path):
    p = tmp_path / "corrupt.json"
    p.write_text('{"format": "sglang-tca-budgets", "version": 1, "model": ')
    return p


def _other_shape(tmp_path):
    p = tmp_path / "other.json"
    Budgets.uniform(ModelShape("LlamaForCausalLM", 32, 32, 8, 128), KEEP_ALL).save(p)
    return p


@pytest.mark.parametrize("case,match", [
    ("missing", "budgets file not found"),
    ("corrupt", "not valid JSON"),
    ("other_shape", "budgets file was made for a model with num_layers=32"),
    ("no_model", "model path not found: /nonexistent/model"),
    ("no_budgets", "no TCA budgets"),
    ("bad_int", "argument --tca-window: invalid int value"),
    ("bad_window", "--tca-window 100 must be a positive multiple"),
    ("bad_policy", "argument --tca-policy: invalid choice: 'oracle'"),
    ("negative_observe", "--tca-observe must be >= 0"),
    ("observe_past_window", "--tca-observe 200 must not exceed the window (128 tokens)"),
])
def test_cli_bad_input_is_one_line(model, tmp_path, capsys, case, match):
    argv = {
        "missing": ["--model", str(model), "--tca-budgets", str(tmp_path / "nope.json")],
        "corrupt": ["--model", str(model), "--tca-budgets", str(_corrupt(tmp_path))],
        "other_shape": ["--model", str(model), "--tca-budgets", str(_other_shape(tmp_path))],
        "no_model": ["--model", "/nonexistent/model"],
        "no_budgets": ["--model", str(make_model(tmp_path / "bare", budgets=False))],
        "bad_int": ["--model", str(model), "--tca-window", "big"],
        "bad_window": ["--model", str(model), "--tca-window", "100"],
        "bad_policy": ["--model", str(model), "--tca-policy", "oracle"],
        "negative_observe": ["--model", str(model), "--tca-observe", "-3"],
        "observe_past_window": ["--model", str(model), "--tca-window", "128", "--tca-observe", "200"],
    }[case]
    served = []
    rc, err = _run_main(argv, capsys, serve=lambda *a: served.append(a))
    assert rc != 0 and not served
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], err
    assert "Traceback" not in err


def test_launch_py_subprocess_one_line_error(model, tmp_path):
    for argv in (["--model", str(model), "--tca-budgets", str(_corrupt(tmp_path))], ["--model", "/nonexistent/x"]):
        r = subprocess.run([sys.executable, str(ROOT / "launch.py"), *argv], cwd=tmp_path, capture_output=True,
                           text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert r.returncode != 0
        assert "Traceback" not in r.stderr
        assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: "), r.stderr


@pytest.mark.parametrize("extra,match", [
    (["--enable-mixed-chunk"], "--enable-mixed-chunk"),
    (["--tp-size", "3"], "tp_size=3"),
    (["--bogus-flag"], "unrecognized arguments: --bogus-flag"),
    (["--no-tca", "--attention-backend", "tca"], "--no-tca contradicts"),
])
def test_cli_unsupported_flag_is_one_line(sgl, model, capsys, extra, match):
    rc, err = _run_main(["--model", str(model), *SGLANG_FLAGS, *extra], capsys, serve=lambda *a: None)
    assert rc != 0 and "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and match in lines[0], err
    assert "usage:" not in err


def test_cli_launches_with_tca_scheduler(sgl, model, capsys, monkeypatch):
    """Happy path through the real launch code, with SGLang's launch_server replaced by a recorder."""
    import inspect

    import sglang.srt.entrypoints.http_server as http_server
    import sglang.srt.utils as sgl_utils

    assert "run_scheduler_process_func" in inspect.signature(http_server.launch_server).parameters
    launched = {}
    monkeypatch.setattr(http_server, "launch_server", lambda sa, **kw: launched.update(sa=sa, **kw))
    monkeypatch.setattr(sgl_utils, "kill_process_tree", lambda *a, **k: None)
    rc, err = _run_main(["--model", str(model), "--tca-window", "128", "--tca-policy", "streaming",
                         "--tca-observe", "32", *SGLANG_FLAGS], capsys)
    assert rc == 0, err
    assert launched["sa"].attention_backend == "tca"
    assert launched["run_scheduler_process_func"] is sgl.run_scheduler_process
    cfg = TCAConfig.from_env()
    assert cfg.window == 128 and cfg.budgets == str((model / "tca_budgets.json").resolve())
    assert cfg.policy == "streaming" and tca_config.load_runtime(str(model)).policy == "streaming"
    assert cfg.observe == 32 and tca_config.load_runtime(str(model)).observe == 32


def test_offline_engine_checks_tca_config_before_starting(sgl, model, tmp_path, monkeypatch):
    """sglang_tca.engine.Engine: a bad budgets file is a clear error before SGLang starts anything; a good config
    reaches the environment its scheduler processes inherit."""
    from sglang.srt.entrypoints.engine import Engine as SGLangEngine

    from sglang_tca.engine import Engine

    started = []
    monkeypatch.setattr(SGLangEngine, "__init__", lambda self, **kw: started.append(kw))
    with pytest.raises(BudgetsError, match="budgets file not found"):
        Engine(model_path=str(model), attention_backend="tca", tca=TCAConfig(budgets=str(tmp_path / "nope.json")))
    assert not started
    Engine(model_path=str(model), attention_backend="tca", tca=TCAConfig(window=128, policy="random"))
    assert started[0]["attention_backend"] == "tca" and TCAConfig.from_env().policy == "random"
    assert Engine.run_scheduler_process_func is sgl.run_scheduler_process


def test_cli_no_tca_and_other_backend(sgl, model, tmp_path, capsys, monkeypatch):
    got = []
    bare = make_model(tmp_path / "bare", budgets=False)  # no budgets needed without TCA
    rc, err = _run_main(["--model", str(bare), "--no-tca", "--tca-window", "128", *SGLANG_FLAGS], capsys,
                        serve=lambda sa, tca: got.append((sa.attention_backend, tca)))
    assert rc == 0 and got[-1][1] is False and got[-1][0] != "tca" and "ignoring --tca-window" in err
    assert ENV_VAR not in os.environ
    rc, _ = _run_main(["--model", str(bare), "--attention-backend", "triton", *SGLANG_FLAGS], capsys,
                      serve=lambda sa, tca: got.append((sa.attention_backend, tca)))
    assert rc == 0 and got[-1] == ("triton", False)


def test_cli_default_model_is_embedded(sgl, tmp_path, capsys, monkeypatch):
    import types

    emb = make_model(tmp_path / "emb", budgets=False)
    shipped = tmp_path / "smollm2_budgets.json"
    Budgets.uniform(ModelShape.from_hf_config(LLAMA_CFG), KEEP_ALL, window=128).save(shipped)
    monkeypatch.setattr(tca_config, "EMBEDDED_BUDGETS", shipped)
    monkeypatch.setitem(sys.modules, "sglang_tca.embedded_model",
                        types.SimpleNamespace(embedded_model_dir=lambda: emb))
    got = []
    rc, err = _run_main([*SGLANG_FLAGS], capsys, serve=lambda sa, tca: got.append(sa))
    assert rc == 0, err
    assert got[0].model_path == str(emb) and got[0].attention_backend == "tca"
    assert TCAConfig.from_env().budgets == str(shipped)

    monkeypatch.setitem(sys.modules, "sglang_tca.embedded_model", None)
    rc, err = _run_main([*SGLANG_FLAGS], capsys, serve=lambda *a: None)
    assert rc != 0 and err.startswith("error: no --model given")
