#!/usr/bin/env bash
# Tile sweep of the TCA sparse attention kernel on the GPU (one device call, a few minutes):
#   source .gpu/env.sh && bash bench/tile_sweep.sh                      (prefill; carry [".gpu"])
#   source .gpu/env.sh && MODE=decode bash bench/tile_sweep.sh          (decode at batch sizes BS)
# Runs bench/kernel_bench.py (~30% kept, bf16, CUDA graphs; prefill: one request, all queries in one chunk; decode:
# BS requests, one query each) once per tile configuration BLOCK_M,BLOCK_N,num_warps,num_stages[,num_kv_splits]
# (the first is the kernel's default and is timed with the dense FlashInfer baseline; no splits field: the kernel's
# heuristic) and, after each configuration, rewrites $OUT/tile_sweep.json (every run's rows by configuration) and
# $OUT/tile_sweep.txt (a table: ms per layer call), so a call cut short still brings back what ran.
# Configurations still to run when SWEEP_S seconds have passed are skipped.
# kernel_tiles_h200.md's sweeps ran as bench/prefill_tile_sweep.sh, this script before MODE.
set -uo pipefail
export PYTHONPATH="$PWD:${PYTHONPATH:-}" OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
MODE=${MODE:-prefill}
if [ "$MODE" = decode ]; then
  CTX=${CTX:-4096 32768}
  BS=${BS:-1 16 64}
  CONFIGS=${CONFIGS:-"16,64,4,3 16,64,2,3 16,64,8,3 16,128,4,3 16,32,4,3 16,64,4,4 16,64,4,2 16,64,4,3,1 16,128,8,3"}
  cases=(--no-prefill --decode-bs $BS)
else
  CTX=${CTX:-4096 16384 32768 131072}
  CONFIGS=${CONFIGS:-"128,64,8,3 128,64,8,4 128,64,8,2 128,64,4,3 128,128,8,2 128,128,8,3 64,64,4,3 64,128,4,2 128,32,8,3"}
  cases=(--decode-bs)
fi
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/device.txt"
t0=$(date +%s)
first=1
for cfg in $CONFIGS; do
  if [ $(( $(date +%s) - t0 )) -gt "${SWEEP_S:-1000000000}" ]; then echo "skipping $cfg: SWEEP_S passed"; continue; fi
  IFS=, read -r bm bn nw ns sp <<< "$cfg"
  extra=(--no-dense); [ $first = 1 ] && extra=(); first=0
  [ -n "${sp:-}" ] && extra+=(--splits "$sp")
  # shellcheck disable=SC2086
  timeout 150 python3 bench/kernel_bench.py --ctx $CTX "${cases[@]}" --block-m "$bm" --block-n "$bn" \
    --num-warps "$nw" --num-stages "$ns" "${extra[@]}" --json "$OUT/tiles_${cfg//,/-}.json" \
    > "$OUT/log_$cfg.txt" 2>&1 || echo "config $cfg failed: $(tail -1 "$OUT/log_$cfg.txt")"
  rm -f "$OUT/log_$cfg.txt"
  python3 - "$OUT" <<'PY' > "$OUT/tile_sweep.txt"
import glob, json, sys
runs, device = {}, None
for f in sorted(glob.glob(f"{sys.argv[1]}/tiles_*.json")):
    d = json.load(open(f))
    runs[f.split("tiles_")[1][:-5]] = {(r["mode"], r["bs"], r["ctx"]): r for r in d["rows"]}
    device = d["device"]
json.dump(dict(device=device, configs={k: list(v.values()) for k, v in runs.items()}),
          open(f"{sys.argv[1]}/tile_sweep.json", "w"), indent=1)
cases = sorted({c for r in runs.values() for c in r})
name = lambda c: f"{c[2] // 1024}K" if c[0] == "prefill" else f"bs{c[1]} {c[2] // 1024}K"  # noqa: E731
print(f"{device}: ms per layer call\nBLOCK_M-BLOCK_N-warps-stages[-splits] | " + " | ".join(name(c) for c in cases))
for cfg, rows in runs.items():
    print(f"{cfg:28} | " + " | ".join(f"{rows[c]['tca_ms']:.4f}" if c in rows else "-" for c in cases))
for cfg, rows in runs.items():
    if any(r["dense"] != "-" for r in rows.values()):
        print("dense (" + next(iter(rows.values()))["dense"] + ") | " + " | ".join(
            f"{rows[c]['dense_ms']:.4f}" if c in rows else "-" for c in cases))
PY
done
cat "$OUT/tile_sweep.txt"
rm -f "$OUT"/tiles_*.json     # at most 8 files come back from a device call
