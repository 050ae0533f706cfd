"""bench/profile_prefill.py's trace summary, on a synthetic torch-profiler trace: kernel time and count per prompt,
the GPU's busy time as the union of overlapping kernels, and the host's CUDA runtime calls."""
import gzip
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from profile_prefill import kernel_summary  # noqa: E402


def test_kernel_summary_per_prompt(tmp_path):
    ev = [{"ph": "X", "cat": "kernel", "name": "gemm", "ts": 0, "dur": 3000},
          {"ph": "X", "cat": "kernel", "name": "attn", "ts": 1000, "dur": 4000},      # overlaps gemm: busy 5 ms
          {"ph": "X", "cat": "kernel", "name": "gemm", "ts": 10000, "dur": 1000},
          {"ph": "X", "cat": "cuda_runtime", "name": "cudaStreamSynchronize", "ts": 0, "dur": 6000},
          {"ph": "i", "cat": "kernel", "name": "marker", "ts": 0}]                   # not a duration event
    with gzip.open(tmp_path / "t.trace.json.gz", "wt") as f:
        json.dump({"traceEvents": ev}, f)
    s = kernel_summary(tmp_path, prompts=2)
    assert s["gpu_ms_per_prompt"] == pytest.approx(4.0) and s["gpu_busy_ms_per_prompt"] == pytest.approx(3.0)
    assert s["kernels_per_prompt"] == 1.5
    assert s["top"] == [("attn", 2.0), ("gemm", 2.0)] or s["top"] == [("gemm", 2.0), ("attn", 2.0)]
    assert s["runtime_top"] == [("cudaStreamSynchronize", 3.0)]
    with pytest.raises(RuntimeError, match="no profiler trace"):
        kernel_summary(tmp_path / "none", prompts=1)
