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
# What launch.py hands SGLang for a TCA run (it adds the last two); for tests that call prepare_server_args directly.
TCA_FLAGS = [*SGLANG_FLAGS, "--attention-backend", "tca", "--disable-prefill-cuda-graph", "--page-size", "64",
             "--radix-cache-backend", "tca"]


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

    from patches.server_args_post_init import hook

    n, fn = 0, ServerArgs.__dict__["__post_init__"]
    while fn is not None:
        n += sum(1 for c in (getattr(fn, "__closure__", None) or ()) if c.cell_contents is hook)
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

    sa = prepare_server_args(["--model-path", str(model), *TCA_FLAGS])
    assert sa.attention_backend == "tca" and sa.radix_cache_backend == "tca" and sa.page_size == 64


def test_register_leaves_sglangs_swa_switches_alone(sgl, monkeypatch):
    """A dense server started by launch.py (--no-tca, another backend, an SWA model) runs with SGLang's own values."""
    from sglang_tca.serving.memory import SCHEDULER_ENV

    for k in SCHEDULER_ENV:
        monkeypatch.delenv(k, raising=False)
    sgl._registered = False
    sgl.register()
    assert not [k for k in SCHEDULER_ENV if k in os.environ]


def test_scheduler_entry_registers_loads_config_and_calls_stock(sgl, model, monkeypatch):
    import pickle

    import sglang.srt.managers.scheduler as sched
    from sglang.srt.server_args import prepare_server_args

    calls = []
    monkeypatch.setattr(sched, "run_scheduler_process", lambda *a, **k: calls.append((a, k)) or "ran")
    TCAConfig(budgets=str(model / "tca_budgets.json"), window=128).to_env()
    sa = prepare_server_args(["--model-path", str(model), *TCA_FLAGS])
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
    ("tokenizer_worker_num", 2, "--tokenizer-worker-num 2"),
    ("enable_memory_saver", True, "--enable-memory-saver"),
    ("prefill_attention_backend", "triton", "--prefill-attention-backend"),
    ("decode_attention_backend", "flashinfer", "--decode-attention-backend"),
    ("kv_cache_dtype", "fp8_e4m3", "--kv-cache-dtype"),
    ("kv_cache_dtype", "fp8_e5m2", "--kv-cache-dtype"),
    ("kv_cache_dtype", "fp4_e2m1", "--kv-cache-dtype"),
    ("kv_cache_dtype", "nvfp4", "--kv-cache-dtype"),
    ("page_size", 16, "--page-size"),
    ("radix_cache_backend", "other", "--radix-cache-backend"),
    ("enable_pdmux", True, "--enable-pdmux"),
    ("pp_size", 2, "--pp-size 2"),
    ("dp_size", 2, "--dp-size 2"),
    ("enable_single_batch_overlap", True, "--enable-single-batch-overlap"),
    ("enable_torch_compile", True, "--enable-torch-compile"),
    ("chunked_prefill_size", -1, "--chunked-prefill-size -1"),
    ("chunked_prefill_size", 0, "--chunked-prefill-size 0"),
    ("enable_deterministic_inference", True, "--enable-deterministic-inference"),
    ("rl_on_policy_target", "fsdp", "--rl-on-policy-target"),
    ("enable_mis", True, "--enable-mis"),
    ("dllm_algorithm", "LowConfidence", "--dllm-algorithm"),
    ("is_embedding", True, "--is-embedding"),
    ("language_only", True, "--language-only"),
    ("enable_page_major_kv_layout", True, "--enable-page-major-kv-layout"),
    ("enable_unified_memory", True, "--enable-unified-memory"),
    ("dcp_size", 2, "--dcp-size"),
    ("attn_cp_size", 2, "--attn-cp-size"),
]


@pytest.fixture(scope="session")
def tca_server_args(sgl, tmp_path_factory):
    from sglang.srt.server_args import prepare_server_args

    m = make_model(tmp_path_factory.mktemp("m") / "llama")
    return prepare_server_args(["--model-path", str(m), *TCA_FLAGS])


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
    # the same on the raw values (what launch.py and the Engine check before SGLang resolves anything; launch.py has
    # added the page size and radix backend by then, and the model path lets the memory rules load TCA's config)
    import types

    raw = dict(attention_backend="tca", model_path=tca_server_args.model_path, page_size=64, radix_cache_backend="tca")
    sgl.validate_server_args(types.SimpleNamespace(**raw))
    with pytest.raises(TCAConfigError, match=flag):
        sgl.validate_server_args(types.SimpleNamespace(**{**raw, attr: value}))


def test_validation_checks_resolved_cuda_graph_backends_only(sgl, tca_server_args):
    """Prefill CUDA graphs: only `disabled` passes; decode graphs: full or disabled. Raw values carry no resolved
    graph config (SGLang fills the defaults in later), so they are not judged on it."""
    import types

    from sglang.srt.model_executor.cuda_graph_config import CudaGraphConfig, PhaseConfig

    def graphs(prefill, decode):
        return CudaGraphConfig(decode=PhaseConfig(backend=decode), prefill=PhaseConfig(backend=prefill))

    assert tca_server_args.cuda_graph_config.prefill.backend == "disabled"
    for decode in ("full", "disabled"):
        sgl.validate_server_args(_with(tca_server_args, cuda_graph_config=graphs("disabled", decode)))
    for prefill in ("breakable", "tc_piecewise", "full"):
        with pytest.raises(TCAConfigError, match=f"prefill CUDA graph backend {prefill}.*--disable-prefill-cuda-graph"):
            sgl.validate_server_args(_with(tca_server_args, cuda_graph_config=graphs(prefill, "full")))
    for decode in ("breakable", "tc_piecewise"):
        with pytest.raises(TCAConfigError, match=f"decode CUDA graph backend {decode}"):
            sgl.validate_server_args(_with(tca_server_args, cuda_graph_config=graphs("disabled", decode)))
    sgl.validate_server_args(types.SimpleNamespace(attention_backend="tca", cuda_graph_config=CudaGraphConfig()))


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
    # page 1: with TCA's page 64 SGLang's own check on NGRAM's top-k fires first inside __post_init__
    (["--speculative-algorithm", "NGRAM", "--page-size", "1"], "--speculative-algorithm NGRAM"),
    (["--radix-cache-backend", "lmcache"], "--radix-cache-backend lmcache"),
    (["--enable-pdmux"], "--enable-pdmux"),
    (["--pp-size", "2"], "--pp-size 2"),
    (["--enable-single-batch-overlap"], "--enable-single-batch-overlap"),
    (["--enable-torch-compile"], "--enable-torch-compile"),
    (["--tokenizer-worker-num", "4"], "--tokenizer-worker-num 4"),
    (["--enable-memory-saver"], "--enable-memory-saver"),
    (["--chunked-prefill-size", "-1"], "--chunked-prefill-size -1"),
    (["--cuda-graph-backend-prefill", "breakable"], "prefill CUDA graph backend breakable"),
    (["--cuda-graph-config", '{"prefill": {"backend": "full"}}'], "prefill CUDA graph backend full"),
    (["--cuda-graph-backend-decode", "breakable"], "decode CUDA graph backend breakable"),
])
def test_hook_rejects_in_prepare_server_args(sgl, model, extra, flag):
    """The AFTER hook on ServerArgs.__post_init__ is really installed: prepare_server_args raises."""
    from sglang.srt.server_args import prepare_server_args

    with pytest.raises(TCAConfigError, match=flag):
        prepare_server_args(["--model-path", str(model), *TCA_FLAGS, *extra])


def test_hook_refuses_sglang_default_prefill_graph(sgl, model):
    """`sglang serve --attention-backend tca` (the entry-point plugin, no launcher to add the flag) with SGLang's
    default prefill CUDA graph is refused with the remedy; an explicit `disabled` backend is accepted."""
    from sglang.srt.server_args import prepare_server_args

    base = ["--model-path", str(model), *SGLANG_FLAGS, "--attention-backend", "tca", "--page-size", "64",
            "--radix-cache-backend", "tca"]
    with pytest.raises(TCAConfigError, match="prefill CUDA graph backend .*use --disable-prefill-cuda-graph"):
        prepare_server_args(base)
    sa = prepare_server_args([*base, "--cuda-graph-backend-prefill", "disabled"])
    assert sa.cuda_graph_config.prefill.backend == "disabled"


# ---------------------------------------------------------------------------------------------------------------------
# Config, model checks, budgets discovery, for_rank
# ---------------------------------------------------------------------------------------------------------------------
def test_config_env_roundtrip_and_errors():
    env: dict = {}
    c = TCAConfig(budgets="/x/b.json", window=512, block=64, policy="random", observe=32, observe_prefill="dense",
                  budgets_sha256="ab" * 32)
    c.to_env(env)
    assert TCAConfig.from_env(env) == c and TCAConfig.from_env({}) is None
    for bad in ("{", "[]", '{"windw": 3}', '{"version": 9}', '{"window": "big"}', '{"window": 0}', '{"block": 48}',
                '{"policy": "oracle"}', '{"observe": -1}', '{"observe_prefill": "full"}', '{"observe": 2.5}',
                '{"window": 256.0}', '{"budgets_sha256": "abc"}', '{"budgets_sha256": "' + "AB" * 32 + '"}',
                '{"budgets_sha256": 5}'):
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


def _converted_marker(d: Path, sha: str) -> Path:
    """A model folder as embedded_model_dir() leaves it: source.json names our converter and the GGUF's sha256."""
    (d / "source.json").write_text(json.dumps({"gguf": "x.gguf", "sha256": sha,
                                               "converted_by": "sglang_tca.embedded_model"}))
    return d


def test_embedded_model_detection(tmp_path):
    from sglang_tca.embedded_model import GGUF_SHA256

    emb = _converted_marker(make_model(tmp_path / "emb", budgets=False), GGUF_SHA256)
    other_gguf = _converted_marker(make_model(tmp_path / "other_gguf", budgets=False), "0" * 64)
    assert tca_config.is_embedded_model(emb) and tca_config.is_embedded_model(str(emb) + "/")
    assert tca_config.is_embedded_model(emb / "config.json")           # a file in the folder
    assert not tca_config.is_embedded_model(other_gguf)                # converted from another GGUF
    assert not tca_config.is_embedded_model(make_model(tmp_path / "plain", budgets=False))
    assert not tca_config.is_embedded_model(tmp_path / "missing")
    assert not tca_config.is_embedded_model("HuggingFaceTB/SmolLM2-135M-Instruct")


def test_model_without_budgets_errs_without_touching_the_embedded_model(sgl, tmp_path, capsys, monkeypatch):
    """--model of a model without budgets: the error comes at once; the embedded model is neither converted nor
    even located (that used to cost a 30 s conversion before the error)."""
    from sglang_tca import embedded_model

    touched = []
    for name in ("embedded_model_dir", "gguf_path", "convert_gguf", "file_sha256"):
        monkeypatch.setattr(embedded_model, name, lambda *a, _n=name, **k: touched.append(_n))
    bare = make_model(tmp_path / "bare", budgets=False)
    rc, err = _run_main(["--model", str(bare), *SGLANG_FLAGS], capsys, serve=lambda *a: None)
    assert rc == 2 and err.startswith("error: no TCA budgets for") and err.count("\n") == 1, err
    assert touched == []
    # the converted embedded model itself is recognised from its folder alone and gets the shipped budgets
    emb = _converted_marker(make_model(tmp_path / "emb", budgets=False), embedded_model.GGUF_SHA256)
    shipped = tmp_path / "smollm2_budgets.json"
    Budgets.uniform(ModelShape.from_hf_config(LLAMA_CFG), KEEP_ALL, window=128).save(shipped)
    monkeypatch.setattr(tca_config, "EMBEDDED_BUDGETS", shipped)
    assert TCAConfig().resolve(emb).budgets_path == str(shipped) and touched == []


def test_resolve_overrides(model):
    rt = TCAConfig().resolve(model)
    assert (rt.window, rt.block, rt.sink) == (256, 64, 64)
    assert (rt.observe, rt.observe_prefill) == (0, "sparse")
    assert TCAConfig(observe=32, observe_prefill="dense").resolve(model).observe_prefill == "dense"
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


@pytest.mark.parametrize("edit,match", [
    ({"block": 64.7}, "block must be an integer, got 64.7"),
    ({"block": 64.0}, "block must be an integer, got 64.0"),
    ({"block": True}, "block must be an integer, got True"),
    ({"window": 256.5}, "window must be an integer, got 256.5"),
    ({"sink": 64.2}, "sink must be an integer, got 64.2"),
    ({"sink": 32}, "sink .32. must equal block .64."),
    ({"model.num_layers": 2.0}, "model.num_layers must be an integer, got 2.0"),
    ({"model.head_dim": "64"}, "model.head_dim must be an integer, got '64'"),
    ({"eps": "0.05"}, "eps must be a number"),
    ({"window": 96}, "window .96. must be a positive multiple of block"),
    ({"block": 48, "sink": 48}, "block size must be a power of two, got 48"),
    ({"scoring": "middle"}, "unknown scoring 'middle'"),
])
def test_budgets_file_values_are_checked_not_coerced(tmp_path, edit, match):
    """Integers in a budgets file must be JSON integers (64.7 used to become block 64); every error names the file."""
    path = _budgets_file(tmp_path / "b.json", edit=edit)
    with pytest.raises(BudgetsError, match=match) as e:
        Budgets.load(path)
    assert str(path) in str(e.value)


def test_budgets_errors_name_the_file(tmp_path):
    path = _budgets_file(tmp_path / "b.json", edit={"p": [[[0.5] * 7] * 2] * 2})   # rows sum to 3.5
    with pytest.raises(BudgetsError, match=f"budgets file {path}: p must be finite"):
        Budgets.load(path)
    b = Budgets.load(_budgets_file(tmp_path / "ok.json"))
    with pytest.raises(BudgetsError, match=f"budgets file {tmp_path / 'ok.json'}: tp_size=3 is not a multiple"):
        b.for_rank(0, 3)
    with pytest.raises(BudgetsError, match=f"budgets file {tmp_path / 'ok.json'} was made for a model with "):
        b.check_model(ModelShape("LlamaForCausalLM", 32, 32, 8, 128))
    part = b.for_rank(1, 2)
    assert part.source == b.source and part.p.shape[1] == 1


def test_budgets_sha256_pins_the_content(tmp_path):
    import hashlib

    path = _budgets_file(tmp_path / "b.json")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert Budgets.load(path).sha256 == digest and Budgets.load(path, sha256=digest).sha256 == digest
    with pytest.raises(BudgetsError, match=f"budgets file {path} changed after the launcher checked it"):
        Budgets.load(path, sha256="0" * 64)


def test_unservable_budgets_refused_by_resolve_and_load_runtime(model, tmp_path):
    """Budgets the server cannot serve fail at resolution (launcher, Engine, every scheduler), naming the file, not
    in the scheduler after the weights are loaded."""
    for path, match in ((_budgets_file(tmp_path / "w.json", scoring="window"), "scoring 'window'"),
                        (_budgets_file(tmp_path / "b128.json", block=128), "block 128")):
        Budgets.load(path)   # a valid file (the reference implementation reads it) ...
        with pytest.raises(BudgetsError, match=f"budgets file {path} cannot be served: it uses {match}"):
            TCAConfig(budgets=str(path)).resolve(model)   # ... that the server cannot serve
        with pytest.raises(BudgetsError, match="cannot be served"):
            tca_config.load_runtime(model, environ={ENV_VAR: TCAConfig(budgets=str(path)).to_json()})


def test_scheduler_refuses_budgets_changed_after_launch(sgl, model, capsys, monkeypatch):
    """The launcher hands over the budgets' sha256; a rank that later reads other bytes at that path refuses,
    naming the path."""
    import hashlib

    path = model / "tca_budgets.json"
    rc, err = _run_main(["--model", str(model), *SGLANG_FLAGS], capsys, serve=lambda *a: None)
    assert rc == 0, err
    cfg = TCAConfig.from_env()
    assert cfg.budgets == str(path.resolve()) and cfg.budgets_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert tca_config.load_runtime(str(model)).budgets.sha256 == cfg.budgets_sha256
    Budgets.uniform(ModelShape.from_hf_config(LLAMA_CFG), KEEP_ALL, block=64, window=128).save(path)  # edited
    monkeypatch.setattr(tca_config, "_RUNTIME_CACHE", {})   # as in a freshly spawned rank
    with pytest.raises(BudgetsError, match=f"budgets file {path.resolve()} changed after the launcher checked it"):
        tca_config.load_runtime(str(model))


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


def _budgets_file(path: Path, *, block=64, scoring="block_last", edit=None) -> Path:
    """Keep-all budgets for LLAMA_CFG, saved, then with `edit` applied to the JSON (to write what save() refuses)."""
    kn = block.bit_length()
    Budgets.uniform(ModelShape.from_hf_config(LLAMA_CFG), [0] * (kn - 1) + [1], block=block, window=256,
                    scoring=scoring).save(path)
    if edit:
        d = json.loads(path.read_text())
        for key, value in edit.items():
            obj, *rest = key.split(".")
            (d[obj] if rest else d)[rest[0] if rest else obj] = value
        path.write_text(json.dumps(d))
    return path


def _other_shape(tmp_path):
    p = tmp_path / "other.json"
    Budgets.uniform(ModelShape("LlamaForCausalLM", 32, 32, 8, 128), KEEP_ALL).save(p)
    return p


@pytest.mark.parametrize("case,match", [
    ("missing", "budgets file not found"),
    ("corrupt", "not valid JSON"),
    ("other_shape", "other.json was made for a model with num_layers=32"),
    ("window_scoring", "window.json cannot be served: it uses scoring 'window'"),
    ("block_128", "b128.json cannot be served: it uses block 128"),
    ("float_block", "float_block.json is corrupt: TypeError: block must be an integer, got 64.7"),
    ("no_model", "model path not found: /nonexistent/model"),
    ("no_budgets", "no TCA budgets"),
    ("bad_int", "argument --tca-window: invalid int value"),
    ("bad_window", "--tca-window 100 must be a positive multiple"),
    ("bad_policy", "argument --tca-policy: invalid choice: 'oracle'"),
    ("negative_observe", "--tca-observe must be >= 0"),
    ("observe_past_window", "--tca-observe 200 must not exceed the window (128 tokens)"),
    ("observe_chunk", "--chunked-prefill-size 64 with --tca-observe 32 (a prompt's last chunk holds its last N "
                      "queries: at least N + block = 96)"),
    ("observe_streaming", "--tca-policy streaming with --tca-observe (streaming keeps no compressed token"),
    ("observe_prefill_alone", "--tca-observe-prefill dense needs --tca-observe N > 0"),
    ("bad_observe_prefill", "argument --tca-observe-prefill: invalid choice: 'full'"),
])
def test_cli_bad_input_is_one_line(model, tmp_path, capsys, case, match):
    argv = {
        "missing": ["--model", str(model), "--tca-budgets", str(tmp_path / "nope.json")],
        "corrupt": ["--model", str(model), "--tca-budgets", str(_corrupt(tmp_path))],
        "other_shape": ["--model", str(model), "--tca-budgets", str(_other_shape(tmp_path))],
        "window_scoring": ["--model", str(model), "--tca-budgets", str(_budgets_file(tmp_path / "window.json",
                                                                                      scoring="window"))],
        "block_128": ["--model", str(model), "--tca-budgets", str(_budgets_file(tmp_path / "b128.json", block=128))],
        "float_block": ["--model", str(model), "--tca-budgets", str(_budgets_file(tmp_path / "float_block.json",
                                                                                   edit={"block": 64.7}))],
        "no_model": ["--model", "/nonexistent/model"],
        "no_budgets": ["--model", str(make_model(tmp_path / "bare", budgets=False))],
        "bad_int": ["--model", str(model), "--tca-window", "big"],
        "bad_window": ["--model", str(model), "--tca-window", "100"],
        "bad_policy": ["--model", str(model), "--tca-policy", "oracle"],
        "negative_observe": ["--model", str(model), "--tca-observe", "-3"],
        "observe_past_window": ["--model", str(model), "--tca-window", "128", "--tca-observe", "200"],
        "observe_chunk": ["--model", str(model), "--tca-observe", "32", "--chunked-prefill-size", "64",
                          *SGLANG_FLAGS],
        "observe_streaming": ["--model", str(model), "--tca-observe", "32", "--tca-policy", "streaming",
                              *SGLANG_FLAGS],
        "observe_prefill_alone": ["--model", str(model), "--tca-observe-prefill", "dense"],
        "bad_observe_prefill": ["--model", str(model), "--tca-observe", "32", "--tca-observe-prefill", "full"],
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
    (["--enable-pdmux"], "--enable-pdmux (PD multiplexing"),
    (["--pp-size", "2"], "--pp-size 2 (pipeline parallelism)"),
    (["--enable-two-batch-overlap"], "--enable-two-batch-overlap (two-batch overlap)"),
    (["--enable-single-batch-overlap"], "--enable-single-batch-overlap"),
    (["--enable-torch-compile"], "--enable-torch-compile"),
    (["--tokenizer-worker-num", "4"], "--tokenizer-worker-num 4 (several tokenizer workers"),
    (["--enable-memory-saver"], "--enable-memory-saver (releasing and resuming GPU memory"),
    (["--chunked-prefill-size", "-1"], "--chunked-prefill-size -1"),
    (["--cuda-graph-backend-prefill", "breakable"], "prefill CUDA graph backend breakable"),
    (["--enable-deterministic-inference"], "--enable-deterministic-inference"),
    # refused by us before SGLang's own bare `assert self.tp_size % self.dp_size == 0` ("AssertionError: ")
    (["--enable-dp-attention", "--dp", "2"], "--enable-dp-attention (DP attention); --dp-size 2"),
    # SGLang's assertions, without TCA: the condition and the flags, not "AssertionError: AssertionError"
    (["--no-tca", "--enable-dp-attention", "--dp", "2"],
     "SGLang rejected the server arguments: it requires tp_size % dp_size == 0 (--tp-size 1, --dp-size 2; "
     "server_args.py:"),
    # ... also those of check_server_args, which SGLang only runs inside launch_server (a traceback there)
    (["--no-tca", "--enable-pdmux"],
     "SGLang rejected the server arguments: PD-Multiplexing is not compatible with chunked prefill."),
])
def test_cli_unsupported_flag_is_one_line(sgl, model, capsys, extra, match):
    served = []
    rc, err = _run_main(["--model", str(model), *SGLANG_FLAGS, *extra], capsys, serve=lambda *a: served.append(a))
    assert rc == 2 and not served and "Traceback" not in err and "AssertionError" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and match in lines[0], err
    assert "usage:" not in err


def test_cli_turns_prefill_cuda_graph_off_for_tca_only(sgl, model, tmp_path, capsys):
    """SGLang's default prefill CUDA graph is off whenever TCA is on (every GPU check ran so); an explicit
    `disabled` is fine, any other prefill backend is refused (test above); without TCA nothing is changed."""
    got = []
    for extra in ([], ["--disable-prefill-cuda-graph"], ["--cuda-graph-backend-prefill", "disabled"]):
        rc, err = _run_main(["--model", str(model), *SGLANG_FLAGS, *extra], capsys,
                            serve=lambda sa, tca: got.append((sa, tca)))
        assert rc == 0, err
        sa, tca = got[-1]
        assert tca and sa.disable_prefill_cuda_graph and sa.cuda_graph_config.prefill.backend == "disabled"
        assert sa.cuda_graph_config.decode.backend == "full"       # decode graphs stay on
    bare = make_model(tmp_path / "bare", budgets=False)
    rc, err = _run_main(["--model", str(bare), "--no-tca", *SGLANG_FLAGS], capsys,
                        serve=lambda sa, tca: got.append((sa, tca)))
    assert rc == 0 and got[-1][1] is False and not got[-1][0].disable_prefill_cuda_graph, err


def test_launch_py_help_lists_tca_backend(tmp_path):
    """In a fresh process (registration must happen before SGLang builds its parser)."""
    r = subprocess.run([sys.executable, str(ROOT / "launch.py"), "--help"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    import re

    choices = re.search(r"--attention-backend \{([^}]*)\}", r.stdout)
    assert choices and "tca" in choices.group(1).split(","), r.stdout[:2000]
    assert "--disable-prefill-cuda-graph is added" in " ".join(r.stdout.split())


def test_cli_launches_with_tca_scheduler(sgl, model, capsys, monkeypatch):
    """Happy path through the real launch code, with SGLang's launch_server replaced by a recorder."""
    import inspect

    import sglang.srt.entrypoints.http_server as http_server
    import sglang.srt.utils as sgl_utils

    assert "run_scheduler_process_func" in inspect.signature(http_server.launch_server).parameters
    launched = {}
    monkeypatch.setattr(http_server, "launch_server", lambda sa, **kw: launched.update(sa=sa, **kw))
    monkeypatch.setattr(sgl_utils, "kill_process_tree", lambda *a, **k: None)
    rc, err = _run_main(["--model", str(model), "--tca-window", "128", "--tca-policy", "streaming", *SGLANG_FLAGS],
                        capsys)
    assert rc == 0, err
    assert launched["sa"].page_size == 64 and launched["sa"].radix_cache_backend == "tca"  # added by launch.py
    assert launched["sa"].attention_backend == "tca"
    assert launched["run_scheduler_process_func"] is sgl.run_scheduler_process
    from patches.http_server_app import JSONObjectBody
    assert sum(m.cls is JSONObjectBody for m in http_server.app.user_middleware) == 1   # a non-object body: 400
    cfg = TCAConfig.from_env()
    assert cfg.window == 128 and cfg.budgets == str((model / "tca_budgets.json").resolve())
    assert cfg.policy == "streaming" and tca_config.load_runtime(str(model)).policy == "streaming"
    assert cfg.observe is None and tca_config.load_runtime(str(model)).observe == 0   # the default: none


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
