"""TCA run-time configuration: what `launch.py` decides and every spawned SGLang process reads.

`TCAConfig` is small and JSON-serialisable. The launcher resolves it, checks it against the model, pins it to the
budgets file it checked (`TCARuntime.handoff`: the resolved path and the sha256 of the file's bytes) and puts it in the
environment variable `SGLANG_TCA_CONFIG` (JSON); spawned scheduler processes (SGLang starts them with *spawn*) inherit
the environment and call `load_runtime(model_path)`, which loads the budgets file, refuses it if its content changed
since, checks the model again, and caches the result for the process. Without the variable (e.g.
`sglang serve --attention-backend tca` with the entry-point plugin) the defaults apply and the budgets file is
discovered next to the model.

Fields (None means "default"):
  budgets         budgets file (see `sglang_tca.budgets`). Default: discovery, see `discover_budgets`.
  window          dense local window w in tokens. Default: the budgets file's `window`. An override must be a positive
                  multiple of the block size (a block leaves the window whole).
  block           block size b. Default and only accepted value: the budgets file's `block` (the keep distributions
                  p[l, h, k] are over k in {1, 2, ..., b}, so another b needs another calibration).
  policy          token selection: "tca" (default) or an evaluation baseline, "random" (TCA's per-block counts,
                  random tokens) or "streaming" (sink + window only); see `sglang_tca.algorithm.apply_policy`.
  observe         question-aware end of prompt: the last N queries of a prompt re-choose, per KV head and with the
                  same number of tokens, which compressed tokens they and the decode see (`algorithm.observe_keep`).
                  0 = off; at most the window. In the server such a prompt stays dense until its end
                  (`sglang_tca.serving.observe`).
  observe_prefill what an observing prompt's own queries see: "sparse" (default: TCA's prefix-pure selection, the
                  last N queries the choice) or "dense" (the whole prompt, SnapKV's way; only the decode reads the
                  choice). Needs observe > 0.
  dense_tokens    slots of the dense KV pool (sinks, windows, prefill chunks in flight); the rest of SGLang's KV
                  budget holds the compressed store. Default: see `sglang_tca.serving.sizing.plan_memory`.
  budgets_sha256  sha256 (hex) the budgets file's bytes must have; set by the launcher (`TCARuntime.handoff`) so
                  that every tensor-parallel rank serves the very file the launcher checked. Default: not checked.
Sequences shorter than w + 2b have nothing compressed: TCA is exactly dense there, and the backend runs SGLang's
dense kernels for batches of such sequences.

This module imports neither sglang nor torch at module level (the launcher imports it before deciding anything).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Mapping, MutableMapping

from sglang_tca.params import OBSERVE_PREFILLS, POLICIES

ENV_VAR = "SGLANG_TCA_CONFIG"
STATS_ENV = "SGLANG_TCA_STATS"   # evaluation only: file the backend appends per-request KV-kept shares to
CONFIG_VERSION = 1
BUDGETS_FILENAME = "tca_budgets.json"            # looked for in the model directory
PACKAGE_DATA_DIR = Path(__file__).resolve().parent / "data"
EMBEDDED_BUDGETS = PACKAGE_DATA_DIR / "smollm2_budgets.json"   # shipped budgets for the embedded model
CALIBRATE_HINT = "calibrate it: python -m calibration --model PATH --out FILE"

_HF_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class TCAConfigError(ValueError):
    """A setting, flag combination or model that TCA cannot serve. The message names the culprit."""


# ---------------------------------------------------------------------------------------------------------------------
# The config object
# ---------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TCAConfig:
    budgets: str | None = None
    window: int | None = None
    block: int | None = None
    policy: str | None = None
    observe: int | None = None
    observe_prefill: str | None = None
    dense_tokens: int | None = None
    budgets_sha256: str | None = None

    def __post_init__(self):
        for name in ("window", "block", "observe", "dense_tokens"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
                raise TCAConfigError(f"TCA {name} must be an integer, got {v!r}")
        if self.window is not None and self.window <= 0:
            raise TCAConfigError(f"--tca-window must be positive, got {self.window}")
        if self.block is not None and (self.block <= 0 or self.block & (self.block - 1)):
            raise TCAConfigError(f"--tca-block must be a positive power of two, got {self.block}")
        if self.dense_tokens is not None and self.dense_tokens <= 0:
            raise TCAConfigError(f"--tca-dense-tokens must be positive, got {self.dense_tokens}")
        if self.observe is not None and self.observe < 0:
            raise TCAConfigError(f"--tca-observe must be >= 0 (0 = off), got {self.observe}")
        if self.observe_prefill is not None and self.observe_prefill not in OBSERVE_PREFILLS:
            raise TCAConfigError(f"--tca-observe-prefill must be one of {', '.join(OBSERVE_PREFILLS)}, "
                                 f"got {self.observe_prefill!r}")
        if self.policy is not None and self.policy not in POLICIES:
            raise TCAConfigError(f"--tca-policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if self.budgets is not None and not isinstance(self.budgets, str):
            raise TCAConfigError(f"TCA budgets must be a path string, got {self.budgets!r}")
        if self.budgets_sha256 is not None and not (isinstance(self.budgets_sha256, str)
                                                    and _SHA256.match(self.budgets_sha256)):
            raise TCAConfigError(f"TCA budgets_sha256 must be 64 lowercase hex digits, got {self.budgets_sha256!r}")

    # ---- (de)serialisation through the environment ------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps({"version": CONFIG_VERSION, **asdict(self)}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "TCAConfig":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise TCAConfigError(f"{ENV_VAR} is not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise TCAConfigError(f"{ENV_VAR} must be a JSON object, got {type(d).__name__}")
        if d.pop("version", CONFIG_VERSION) != CONFIG_VERSION:
            raise TCAConfigError(f"{ENV_VAR} has an unknown version (this build reads {CONFIG_VERSION})")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise TCAConfigError(f"{ENV_VAR} has unknown keys {unknown}; known: {sorted(known)}")
        return cls(**d)

    def to_env(self, environ: MutableMapping[str, str] | None = None) -> None:
        (os.environ if environ is None else environ)[ENV_VAR] = self.to_json()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "TCAConfig | None":
        text = (os.environ if environ is None else environ).get(ENV_VAR)
        return None if not text else cls.from_json(text)

    # ---- resolution -------------------------------------------------------------------------------------------------
    def resolve(self, model_path: str | os.PathLike, *, is_embedded: bool | None = None,
                hf_config: dict | None = None) -> "TCARuntime":
        """Find and load the budgets, read the model's config.json, refuse unsupported models, budgets made for
        another shape, budgets the server cannot serve, and a budgets file whose content is not `budgets_sha256`;
        apply the overrides. Raises TCAConfigError / BudgetsError (both ValueError) on bad input."""
        from sglang_tca.budgets import Budgets

        cfg = read_model_config(model_path) if hf_config is None else hf_config
        check_model_supported(cfg, source=str(model_path))
        shape = model_shape(cfg, source=str(model_path))
        path = discover_budgets(model_path, self.budgets, is_embedded=is_embedded)
        budgets = Budgets.load(path, sha256=self.budgets_sha256)
        budgets.check_servable()
        budgets.check_model(shape, source=f"the model at {model_path}")
        block = budgets.block
        if self.block is not None and self.block != block:
            raise TCAConfigError(f"--tca-block {self.block} does not match the block size {block} the budgets file "
                                 f"{path} was calibrated with; recalibrate with that block size "
                                 f"(python -m calibration --model PATH --out FILE)")
        window = budgets.window if self.window is None else self.window
        if window < block or window % block:
            raise TCAConfigError(f"--tca-window {window} must be a positive multiple of the block size {block}")
        observe = self.observe or 0
        if observe > window:
            raise TCAConfigError(f"--tca-observe {observe} must not exceed the window ({window} tokens)")
        if self.observe_prefill is not None and observe == 0:
            raise TCAConfigError(f"--tca-observe-prefill {self.observe_prefill} needs --tca-observe N > 0 (it says "
                                 f"what an observing prompt's queries see)")
        return TCARuntime(config=self, model_path=str(model_path), budgets_path=str(path), budgets=budgets,
                          shape=shape, window=window, block=block, policy=self.policy or "tca", observe=observe,
                          observe_prefill=self.observe_prefill or "sparse")


@dataclass(frozen=True)
class TCARuntime:
    """A resolved, checked TCA configuration: what the attention backend uses."""
    config: TCAConfig
    model_path: str
    budgets_path: str
    budgets: Any            # sglang_tca.budgets.Budgets, global heads
    shape: Any              # sglang_tca.budgets.ModelShape
    window: int
    block: int
    policy: str
    observe: int = 0
    observe_prefill: str = "sparse"

    @property
    def sink(self) -> int:
        return self.block

    def handoff(self) -> TCAConfig:
        """The config to hand to the serving processes: pinned to the budgets file this resolution read, by its
        resolved path and the sha256 of its bytes (a rank that finds other content there refuses to start)."""
        return replace(self.config, budgets=str(Path(self.budgets_path).resolve()), budgets_sha256=self.budgets.sha256)

    def for_rank(self, tp_rank: int, tp_size: int):
        """The budgets of the KV heads this tensor-parallel rank owns."""
        return self.budgets.for_rank(tp_rank, tp_size)


_RUNTIME_CACHE: dict[tuple, TCARuntime] = {}


def load_runtime(model_path: str | os.PathLike, environ: Mapping[str, str] | None = None) -> TCARuntime:
    """In a serving process: the TCA config from `SGLANG_TCA_CONFIG` (defaults when unset), resolved against the
    served model. Cached per process and config."""
    cfg = TCAConfig.from_env(environ) or TCAConfig()
    key = (cfg, str(model_path))
    if key not in _RUNTIME_CACHE:
        _RUNTIME_CACHE[key] = cfg.resolve(model_path)
    return _RUNTIME_CACHE[key]


# ---------------------------------------------------------------------------------------------------------------------
# Model path, config.json, budgets discovery
# ---------------------------------------------------------------------------------------------------------------------
def looks_like_hf_repo_id(model_path: str) -> bool:
    return bool(_HF_REPO_ID.match(model_path)) and not model_path.startswith((".", "~"))


def check_model_path(model_path: str) -> None:
    """A model path that is neither an existing file/directory nor shaped like a Hugging Face repo id is an error."""
    if not model_path:
        raise TCAConfigError("empty model path")
    if os.path.exists(os.path.expanduser(model_path)):
        return
    if not looks_like_hf_repo_id(model_path):
        raise TCAConfigError(f"model path not found: {model_path}")


def model_dir(model_path: str | os.PathLike) -> Path:
    """The directory that holds the model (the path itself, or the folder of a single-file model such as a GGUF)."""
    p = Path(model_path).expanduser()
    return p if p.is_dir() else p.parent


def read_model_config(model_path: str | os.PathLike) -> dict:
    """The model's Hugging Face config as a dict: config.json of a local directory, the metadata of a GGUF file
    (or a config.json next to it), or config.json fetched from the Hub for a repo id."""
    p = Path(model_path).expanduser()
    if p.is_dir():
        cj = p / "config.json"
        if cj.is_file():
            return _read_json(cj)
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return _gguf_config(ggufs[0])
        raise TCAConfigError(f"no config.json in the model directory {p}")
    if p.is_file():
        if (p.parent / "config.json").is_file():
            return _read_json(p.parent / "config.json")
        if p.suffix == ".gguf":
            return _gguf_config(p)
        raise TCAConfigError(f"cannot read a model config from the file {p}")
    check_model_path(str(model_path))  # raises for a local-looking path that does not exist
    return _hub_config(str(model_path))


def _read_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TCAConfigError(f"cannot read the model config {path}: {e}") from None
    if not isinstance(d, dict):
        raise TCAConfigError(f"model config {path} is not a JSON object")
    return d


def _gguf_config(path: Path) -> dict:
    try:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:  # noqa: BLE001 - any failure here is "cannot read this model"
        raise TCAConfigError(f"cannot read the model config from the GGUF file {path}: {type(e).__name__}: {e}") from None
    return cfg.to_dict()


def _hub_config(repo_id: str) -> dict:
    try:
        from huggingface_hub import hf_hub_download

        return _read_json(Path(hf_hub_download(repo_id, "config.json")))
    except TCAConfigError:
        raise
    except Exception as e:  # noqa: BLE001
        raise TCAConfigError(f"model path not found locally and config.json of the Hugging Face repo {repo_id!r} "
                             f"could not be fetched: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def hub_model_dir(repo_id: str) -> Path | None:
    """The local snapshot folder of a Hub model, if its config.json is cached (for budgets discovery)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        p = try_to_load_from_cache(repo_id, "config.json")
        return Path(p).parent if isinstance(p, str) else None
    except Exception:  # noqa: BLE001
        return None


def discover_budgets(model_path: str | os.PathLike, explicit: str | os.PathLike | None = None, *,
                     is_embedded: bool | None = None) -> Path:
    """Budgets file to use, in this order:
      1. `explicit` (--tca-budgets), which must exist (Budgets.load reports a missing file);
      2. `tca_budgets.json` in the model directory;
      3. the budgets shipped in the package (`sglang_tca/data/smollm2_budgets.json`), only for the embedded model
         (`is_embedded`; None = compare the path with `sglang_tca.embedded_model.embedded_model_dir()`).
    Raises TCAConfigError telling how to calibrate when none is found."""
    if explicit is not None:
        return Path(explicit).expanduser()
    mp = str(model_path)
    mdir = model_dir(mp) if os.path.exists(os.path.expanduser(mp)) else hub_model_dir(mp)
    if mdir is not None and (mdir / BUDGETS_FILENAME).is_file():
        return mdir / BUDGETS_FILENAME
    if is_embedded is None:
        is_embedded = is_embedded_model(mp)
    if is_embedded and EMBEDDED_BUDGETS.is_file():
        return EMBEDDED_BUDGETS
    where = f"{mdir / BUDGETS_FILENAME}" if mdir is not None else f"{BUDGETS_FILENAME} next to the model"
    raise TCAConfigError(f"no TCA budgets for {mp}: pass --tca-budgets FILE or put {where}; to make one, "
                         f"{CALIBRATE_HINT} (or serve dense with --no-tca)")


def is_embedded_model(model_path: str | os.PathLike) -> bool:
    """Whether the model is the embedded SmolLM2 as `embedded_model_dir()` converts it: its folder's source.json names
    our converter and the shipped GGUF's sha256. Reads that one small file; never converts (a model that is not the
    embedded one must get its error at once, not after a 30 s conversion)."""
    try:
        from sglang_tca import embedded_model
    except ImportError:
        return False
    if not os.path.exists(os.path.expanduser(str(model_path))):
        return False
    try:
        src = json.loads((model_dir(model_path) / "source.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return (isinstance(src, dict) and src.get("converted_by") == embedded_model.__name__
            and src.get("sha256") == embedded_model.GGUF_SHA256)


# ---------------------------------------------------------------------------------------------------------------------
# Model checks
# ---------------------------------------------------------------------------------------------------------------------
# model_type values of families TCA cannot serve (MLA, sliding-window/hybrid attention, SSM/linear-attention hybrids).
_UNSUPPORTED_MODEL_TYPES = {
    "deepseek_v2": "MLA", "deepseek_v3": "MLA", "deepseek_v32": "MLA", "kimi_k2": "MLA", "minicpm3": "MLA",
    "gemma2": "sliding-window/global hybrid", "gemma3": "sliding-window/global hybrid",
    "gemma3_text": "sliding-window/global hybrid", "gemma4": "sliding-window/global hybrid",
    "gpt_oss": "sliding-window/global hybrid", "llama4": "chunked/global hybrid", "llama4_text": "chunked/global hybrid",
    "cohere2": "sliding-window/global hybrid", "mimo_v2": "sliding-window/global hybrid",
    "mamba": "SSM", "mamba2": "SSM", "jamba": "SSM hybrid", "falcon_h1": "SSM hybrid", "nemotron_h": "SSM hybrid",
    "zamba2": "SSM hybrid", "granitemoehybrid": "SSM hybrid", "lfm2": "conv hybrid", "qwen3_next": "linear-attention hybrid",
    "kimi_linear": "linear-attention hybrid", "minimax": "linear-attention hybrid", "minimax_m1": "linear-attention hybrid",
}
# Config keys that only hybrid (non-full-attention) models carry.
_HYBRID_KEYS = ("layers_block_type", "hybrid_override_pattern", "attn_type_list", "full_attention_interval",
                "linear_num_value_heads", "linear_attn_config", "mamba_d_state", "ssm_state_size",
                "sliding_window_pattern", "attention_chunk_size")
_FULL_LAYER_TYPES = {"full_attention", "attention", "full", "global"}


def text_config(cfg: dict) -> dict:
    """The language-model part of a config (multimodal configs nest it under text_config)."""
    tc = cfg.get("text_config")
    if isinstance(tc, dict):
        merged = dict(tc)
        merged.setdefault("architectures", cfg.get("architectures"))
        return merged
    return cfg


def check_model_supported(cfg: dict, source: str = "the model") -> None:
    """Refuse models whose attention TCA cannot serve: MLA, sliding-window / chunked attention, and hybrids
    (layers that are not full attention)."""
    tc = text_config(cfg)
    arch = (tc.get("architectures") or cfg.get("architectures") or ["unknown"])[0]
    what = f"{source} ({arch})"
    mt = str(tc.get("model_type") or cfg.get("model_type") or "")
    if tc.get("kv_lora_rank") is not None or tc.get("use_mla"):
        raise TCAConfigError(f"{what} uses multi-head latent attention (MLA, kv_lora_rank); "
                             f"TCA needs per-KV-head attention (MHA/GQA)")
    if mt in _UNSUPPORTED_MODEL_TYPES:
        raise TCAConfigError(f"{what} is a {_UNSUPPORTED_MODEL_TYPES[mt]} model (model_type={mt}); "
                             f"TCA serves only models whose layers are all full attention")
    layer_types = tc.get("layer_types")
    if isinstance(layer_types, list):
        other = sorted({str(t) for t in layer_types} - _FULL_LAYER_TYPES)
        if other:
            raise TCAConfigError(f"{what} has non-full-attention layers (layer_types has {other}); "
                                 f"TCA serves only models whose layers are all full attention")
    if tc.get("is_hybrid_swa"):
        raise TCAConfigError(f"{what} is a hybrid sliding-window model (is_hybrid_swa); not supported by TCA")
    for key in _HYBRID_KEYS:
        if tc.get(key) not in (None, [], {}, 0, False):
            raise TCAConfigError(f"{what} is a hybrid / local-attention model ({key}={tc.get(key)!r}); "
                                 f"TCA serves only models whose layers are all full attention")
    sw = tc.get("sliding_window")
    if isinstance(sw, int) and not isinstance(sw, bool) and sw > 0 and tc.get("use_sliding_window", True) is not False:
        max_pos = tc.get("max_position_embeddings")
        if not (isinstance(max_pos, int) and sw >= max_pos):
            raise TCAConfigError(f"{what} uses sliding-window attention (sliding_window={sw}); not supported by TCA")
    head_dim = tc.get("head_dim")
    v_head_dim = tc.get("v_head_dim")
    if v_head_dim is not None and head_dim is not None and v_head_dim != head_dim:
        raise TCAConfigError(f"{what} has v_head_dim={v_head_dim} != head_dim={head_dim}; not supported by TCA")


def model_shape(cfg: dict, source: str = "the model"):
    """ModelShape of the language model, with a clear error when the config lacks the attention sizes."""
    from sglang_tca.budgets import ModelShape

    tc = text_config(cfg)
    missing = [k for k in ("num_hidden_layers", "num_attention_heads") if not isinstance(tc.get(k), int)]
    if not missing and tc.get("head_dim") is None and not isinstance(tc.get("hidden_size"), int):
        missing.append("hidden_size or head_dim")
    if missing:
        raise TCAConfigError(f"cannot read the attention shape of {source}: config lacks {', '.join(missing)}")
    try:
        return ModelShape.from_hf_config(tc)
    except (TypeError, ValueError, ZeroDivisionError) as e:
        raise TCAConfigError(f"cannot read the attention shape of {source}: {e}") from None
