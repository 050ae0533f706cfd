#!/usr/bin/env bash
# Device-machine command for the memory benchmark (Llama-3.1-8B shape, dummy weights), one call:
#   source .gpu/env.sh && bash bench/gpu_memory.sh PART [PART ...]      (carry [".gpu", ".tok", ".client"])
# runs the GPU kernel tests first (SKIP_GPU_TESTS=1 skips them), then `bench/memory_bench.py run --parts PART...`
# within the call's 10 minutes; $OUT gets memory_runs.jsonl, the kernel test summary and logs.tgz (server logs).
set -uo pipefail
export PYTHONPATH="$PWD:${PYTHONPATH:-}" OUT="${OUT:-/tmp/out}" PYTHONUNBUFFERED=1
mkdir -p "$OUT" /tmp/memlogs
t0=$(date +%s)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
[ -n "${SKIP_GPU_TESTS:-}" ] || timeout 240 python3 -m pytest -q -x tests/test_kernels.py tests/test_kept_lists.py tests/test_selection.py \
  2>&1 | tail -15 | tee "$OUT/gpu_kernel_tests.txt"
left=$(( ${DEADLINE_S:-560} - ($(date +%s) - t0) ))
timeout "$left" python3 bench/memory_bench.py run --parts "$@" --deadline-s $(( left - 20 )) --out /tmp/memlogs
cp /tmp/memlogs/memory_runs.jsonl "$OUT/" 2>/dev/null
tar czf "$OUT/logs.tgz" -C /tmp/memlogs --exclude='*.jsonl' . 2>/dev/null
for f in /tmp/memlogs/server_tca_*.log; do echo "== $f"; grep -E "TCA|tca|Error|error|Traceback" "$f" | grep -v "server_args=" | cut -c1-300 | tail -25; done
