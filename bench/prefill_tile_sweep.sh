#!/usr/bin/env bash
# Prefill tile sweep of the TCA sparse attention kernel on the GPU (one device call, a few minutes):
#   source .gpu/env.sh && bash bench/prefill_tile_sweep.sh            (carry [".gpu"])
# Runs bench/kernel_bench.py (one request, all queries in one chunk, ~30% kept, bf16, CUDA graphs) once per tile
# configuration (BLOCK_M BLOCK_N num_warps num_stages; the first is the kernel's default, timed with the dense
# FlashInfer baseline) and writes $OUT/tile_sweep.json (every run's rows by configuration) and $OUT/tile_sweep.txt (a table: ms per layer
# call).
set -uo pipefail
export PYTHONPATH="$PWD:${PYTHONPATH:-}" OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
CTX=${CTX:-4096 16384 32768 131072}
CONFIGS=${CONFIGS:-"128,64,8,3 128,64,8,4 128,64,8,2 128,64,4,3 128,128,8,2 128,128,8,3 64,64,4,3 64,128,4,2 128,32,8,3"}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/device.txt"
first=1
for cfg in $CONFIGS; do
  IFS=, read -r bm bn nw ns <<< "$cfg"
  extra=(--no-dense); [ $first = 1 ] && extra=(); first=0
  # shellcheck disable=SC2086
  timeout 150 python3 bench/kernel_bench.py --ctx $CTX --decode-bs --block-m "$bm" --block-n "$bn" \
    --num-warps "$nw" --num-stages "$ns" "${extra[@]}" --json "$OUT/tiles_$bm-$bn-$nw-$ns.json" \
    > "$OUT/log_$cfg.txt" 2>&1 || echo "config $cfg failed: $(tail -1 "$OUT/log_$cfg.txt")"
done
python3 - "$OUT" <<'PY' | tee "$OUT/tile_sweep.txt"
import glob, json, sys
runs = {}
for f in sorted(glob.glob(f"{sys.argv[1]}/tiles_*.json")):
    d = json.load(open(f))
    runs[f.split("tiles_")[1][:-5]] = {r["ctx"]: r for r in d["rows"]}
    device = d["device"]
json.dump(dict(device=device, configs={k: list(v.values()) for k, v in runs.items()}),
          open(f"{sys.argv[1]}/tile_sweep.json", "w"), indent=1)
ctxs = sorted({c for r in runs.values() for c in r})
print("BLOCK_M-BLOCK_N-warps-stages | " + " | ".join(f"{c // 1024}K ms" for c in ctxs))
for cfg, rows in runs.items():
    print(f"{cfg:28} | " + " | ".join(f"{rows[c]['tca_ms']:.3f}" if c in rows else "-" for c in ctxs))
for cfg, rows in runs.items():
    if any(r["dense"] != "-" for r in rows.values()):
        print("dense (" + next(iter(rows.values()))["dense"] + ") | " + " | ".join(
            f"{rows[c]['dense_ms']:.3f}" if c in rows else "-" for c in ctxs))
PY
rm -f "$OUT"/log_*.txt "$OUT"/tiles_*.json     # at most 8 files come back from a device call
