#!/usr/bin/env bash
# Device-machine command for the Llama-3.1-8B-shaped benchmarks (dummy weights):
#   source .gpu/env.sh && bash bench/gpu_llama8b.sh SCRIPT PART [PART ...]      (carry [".gpu", ".tok", ".client"])
# SCRIPT is bench/memory_bench.py or bench/speed_bench.py. Runs the GPU kernel tests first (SKIP_GPU_TESTS=1 skips
# them), then `SCRIPT run --parts PART... --deadline-s ...` until DEADLINE_S (default 560 s, one call; longer jobs
# through bench/gpu_detached.sh); $OUT gets the script's *_runs.jsonl, the kernel test summary and logs.tgz (server
# logs, bench_serving output).
set -uo pipefail
[ $# -ge 2 ] || { echo "usage: $0 SCRIPT PART [PART ...]" >&2; exit 2; }
script=$1; shift
export PYTHONPATH="$PWD:${PYTHONPATH:-}" OUT="${OUT:-/tmp/out}" PYTHONUNBUFFERED=1
logs=/tmp/llama8b_logs
mkdir -p "$OUT" "$logs"
t0=$(date +%s)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
[ -n "${SKIP_GPU_TESTS:-}" ] || timeout 240 python3 -m pytest -q -x tests/test_kernels.py tests/test_kept_lists.py tests/test_selection.py \
  2>&1 | tail -15 | tee "$OUT/gpu_kernel_tests.txt"
left=$(( ${DEADLINE_S:-560} - ($(date +%s) - t0) ))
timeout "$left" python3 "$script" run --parts "$@" --deadline-s $(( left - 20 )) --out "$logs"
cp "$logs"/*_runs.jsonl "$OUT/" 2>/dev/null
tar czf "$OUT/logs.tgz" -C "$logs" --exclude='*.jsonl' . 2>/dev/null
for f in "$logs"/server_tca_*.log; do [ -e "$f" ] || continue; echo "== $f"
  grep -E "TCA|tca|Error|error|Traceback" "$f" | grep -v "server_args=" | cut -c1-300 | tail -25; done
