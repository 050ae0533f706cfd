#!/usr/bin/env bash
# Device-machine command for bench/serve_check.py after the two GGUF parts were stashed (see bench/gguf_parts.py):
#   source .gpu/env.sh && bash bench/gpu_serve_check.sh
set -uo pipefail
export PYTHONPATH="$PWD:${PYTHONPATH:-}" OUT="${OUT:-/tmp/out}" SGLANG_TCA_ESSAYS="$PWD/.data/PaulGrahamEssays.json"
mkdir -p "$OUT"
[ -f /tmp/smollm2/config.json ] || python3 bench/gguf_parts.py join /tmp/smollm2 2>&1 | tail -2
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -m pytest -q -x tests/test_kernels.py tests/test_kept_lists.py 2>&1 | tail -3 | tee "$OUT/gpu_kernel_tests.txt"
python3 bench/serve_check.py --model /tmp/smollm2 --budgets sglang_tca/data/smollm2_budgets.json --out "$OUT" 2>&1 \
  | tee "$OUT/serve_check.log" | grep -v -E "^\s*$" | tail -40
