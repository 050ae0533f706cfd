"""sglang_tca.engine.Engine's argument checking and config hand-over (CPU: SGLang's Engine.__init__ is a stub that
records what reaches it and what the environment holds while it runs, i.e. while the real one spawns)."""
from __future__ import annotations

import hashlib
import os
import threading
import time

import pytest

from sglang_tca.budgets import BudgetsError
from sglang_tca.config import ENV_VAR, TCAConfig, TCAConfigError
from test_plugin_cli import SGLANG_FLAGS, TCA_FLAGS, make_model

PREVIOUS = TCAConfig(budgets="/somewhere/else.json").to_json()   # a value the caller had set before


class _Calls(list):
    fail = False   # set True: the stub raises, as SGLang's Engine does when a scheduler dies during start-up


@pytest.fixture
def parent(monkeypatch):
    """Replace SGLang's Engine.__init__: record its kwargs and the config in the environment during the call."""
    from sglang.srt.entrypoints.engine import Engine as SGLangEngine

    from sglang_tca import plugin

    plugin.register()
    calls = _Calls()

    def init(self, **kwargs):
        calls.append({"kwargs": kwargs, "env": os.environ.get(ENV_VAR)})
        if calls.fail:
            raise RuntimeError("scheduler died")

    monkeypatch.setattr(SGLangEngine, "__init__", init)
    monkeypatch.setenv(ENV_VAR, PREVIOUS)
    return calls


@pytest.fixture
def model(tmp_path):
    return make_model(tmp_path / "llama")


def _engine(**kwargs):
    from sglang_tca.engine import Engine

    return Engine(**kwargs)


def test_tca_implies_the_backend_and_the_config_is_pinned_while_spawning(parent, model):
    _engine(model_path=str(model), tca=TCAConfig(window=128, policy="random"))
    (call,) = parent
    assert call["kwargs"]["attention_backend"] == "tca"              # tca= implies it (it used to serve dense)
    assert call["kwargs"]["disable_prefill_cuda_graph"] is True
    cfg = TCAConfig.from_json(call["env"])
    budgets = model / "tca_budgets.json"
    assert (cfg.window, cfg.policy, cfg.budgets) == (128, "random", str(budgets.resolve()))
    assert cfg.budgets_sha256 == hashlib.sha256(budgets.read_bytes()).hexdigest()
    assert os.environ[ENV_VAR] == PREVIOUS                           # restored once the processes are started


def test_tca_with_another_backend_is_an_error(parent, model):
    with pytest.raises(TCAConfigError, match="tca= is given but attention_backend is 'triton'"):
        _engine(model_path=str(model), attention_backend="triton", tca=TCAConfig())
    assert parent == [] and os.environ[ENV_VAR] == PREVIOUS


def test_missing_model_path_is_a_clear_error(parent):
    for kwargs in ({"attention_backend": "tca"}, {"tca": TCAConfig()}, {"model_path": ""}):
        with pytest.raises(TypeError, match="Engine needs model_path="):
            _engine(**kwargs)
    assert parent == []


def test_backend_tca_without_tca_checks_the_default_config(parent, model, tmp_path):
    bare = make_model(tmp_path / "bare", budgets=False)
    with pytest.raises(TCAConfigError, match="no TCA budgets for"):
        _engine(model_path=str(bare), attention_backend="tca")
    assert parent == []
    _engine(model_path=str(model), attention_backend="tca")
    cfg = TCAConfig.from_json(parent[0]["env"])
    assert cfg == TCAConfig(budgets=str((model / "tca_budgets.json").resolve()), budgets_sha256=cfg.budgets_sha256)
    assert cfg.budgets_sha256 is not None


def test_bad_config_fails_before_spawning(parent, model, tmp_path):
    with pytest.raises(BudgetsError, match="budgets file not found"):
        _engine(model_path=str(model), tca=TCAConfig(budgets=str(tmp_path / "nope.json")))
    with pytest.raises(TCAConfigError, match="--tca-window 100 must be a positive multiple"):
        _engine(model_path=str(model), tca=TCAConfig(window=100))
    assert parent == [] and os.environ[ENV_VAR] == PREVIOUS


@pytest.mark.parametrize("kwargs,match", [
    ({"enable_dp_attention": True, "dp_size": 2}, "--enable-dp-attention"),   # before SGLang's bare assert
    ({"enable_pdmux": True}, "--enable-pdmux"),
    ({"pp_size": 2}, "--pp-size 2"),
    ({"chunked_prefill_size": -1}, "--chunked-prefill-size -1"),
    ({"disable_prefill_cuda_graph": False}, "disable_prefill_cuda_graph=False"),
    ({"tp_size": 3}, "tp_size=3 is not a multiple of 2 KV heads"),
])
def test_refused_server_args_fail_before_spawning(parent, model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _engine(model_path=str(model), tca=TCAConfig(), **kwargs)
    assert parent == [] and os.environ[ENV_VAR] == PREVIOUS


def test_environment_restored_when_the_start_fails(parent, model, monkeypatch):
    parent.fail = True
    with pytest.raises(RuntimeError, match="scheduler died"):
        _engine(model_path=str(model), tca=TCAConfig())
    assert TCAConfig.from_json(parent[0]["env"]).budgets is not None and os.environ[ENV_VAR] == PREVIOUS
    monkeypatch.delenv(ENV_VAR)
    with pytest.raises(RuntimeError):
        _engine(model_path=str(model), tca=TCAConfig())
    assert ENV_VAR not in os.environ


def test_without_tca_the_variable_is_unset_while_spawning(parent, model):
    _engine(model_path=str(model), attention_backend="triton")
    assert parent[0]["env"] is None and parent[0]["kwargs"]["attention_backend"] == "triton"
    assert "disable_prefill_cuda_graph" not in parent[0]["kwargs"]                  # dense: SGLang's defaults
    assert os.environ[ENV_VAR] == PREVIOUS


def test_resolved_server_args_are_checked_too(parent, model, monkeypatch):
    from sglang.srt.server_args import prepare_server_args

    with monkeypatch.context() as m:   # resolved here as a user would, without a parent's config in the environment
        m.delenv(ENV_VAR)
        sa = prepare_server_args(["--model-path", str(model), *TCA_FLAGS])
    _engine(server_args=sa)
    assert parent[0]["kwargs"] == {"server_args": sa}
    assert TCAConfig.from_json(parent[0]["env"]).budgets == str((model / "tca_budgets.json").resolve())
    dense = prepare_server_args(["--model-path", str(model), *SGLANG_FLAGS, "--attention-backend", "triton"])
    with pytest.raises(TCAConfigError, match="attention_backend is 'triton'"):
        _engine(server_args=dense, tca=TCAConfig())


def test_two_engines_in_threads_each_spawn_with_their_own_config(parent, model, monkeypatch):
    """Without the spawn lock, the second engine's config would replace the first's while the first is still
    starting its processes."""
    from sglang.srt.entrypoints.engine import Engine as SGLangEngine

    seen = {}

    def slow_init(self, **kwargs):
        first = os.environ.get(ENV_VAR)
        time.sleep(0.3)                                   # the first engine is still spawning ...
        seen[kwargs["tag"]] = (first, os.environ.get(ENV_VAR))

    monkeypatch.setattr(SGLangEngine, "__init__", slow_init)
    errors = []

    def start(tag, window):
        try:
            _engine(model_path=str(model), tca=TCAConfig(window=window), tag=tag)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=start, args=(t, w)) for t, w in (("a", 128), ("b", 192))]
    for t in threads:
        t.start()
        time.sleep(0.05)                                  # ... when the second one starts
    for t in threads:
        t.join()
    assert not errors, errors
    for tag, window in (("a", 128), ("b", 192)):
        first, last = seen[tag]
        assert first == last and TCAConfig.from_json(first).window == window
    assert os.environ[ENV_VAR] == PREVIOUS
