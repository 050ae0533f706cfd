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
    assert s["waits_top"] == [("?", 3.0)]                                              # no Python frames traced
    with pytest.raises(RuntimeError, match="no profiler trace"):
        kernel_summary(tmp_path / "none", prompts=1)


def test_waits_name_the_innermost_sglang_frames(tmp_path):
    """With --with-stack the synchronising calls are charged to the innermost sglang / sglang_tca frames around them
    on their own thread (not to frames of another thread, nor to ones that ended before)."""
    py = lambda ts, dur, name, tid=1: {"ph": "X", "cat": "python_function", "ts": ts, "dur": dur, "name": name,  # noqa: E731
                                       "pid": 7, "tid": tid}
    ev = [py(0, 100, "sglang/srt/managers/scheduler.py(1): event_loop"),
          py(10, 50, "sglang_tca/serving/store.py(171): end_forward"),
          py(12, 5, "torch/cuda/__init__.py(9): synchronize"),
          py(30, 5, "sglang_tca/serving/store.py(99): settle"),                       # ended before the call
          py(0, 100, "sglang_tca/other_thread.py(1): f", tid=2),
          {"ph": "X", "cat": "cuda_runtime", "name": "cudaDeviceSynchronize", "ts": 40, "dur": 4, "pid": 7, "tid": 1},
          {"ph": "X", "cat": "cuda_runtime", "name": "cudaMemcpyAsync", "ts": 70, "dur": 2, "pid": 7, "tid": 1},
          {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 41, "dur": 1, "pid": 7, "tid": 1}]
    (tmp_path / "t.json").write_text(json.dumps({"traceEvents": ev}))
    waits = dict(kernel_summary(tmp_path, prompts=1)["waits_top"])
    assert waits == {"sglang_tca/serving/store.py(171): end_forward < sglang/srt/managers/scheduler.py(1): event_loop":
                     pytest.approx(0.004), "sglang/srt/managers/scheduler.py(1): event_loop": pytest.approx(0.002)}
