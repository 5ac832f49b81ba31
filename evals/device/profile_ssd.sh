#!/usr/bin/env bash
# On a GPU machine with Nsight Compute: where the scan kernels' time goes (SSD by default;
# OP=selective_scan for the Mamba-1 scan, below). Writes $OUT/ncu.txt: the full ncu set for one
# launch of the kernel at L (default 16384), and prints its occupancy, issue and throughput
# lines. (XLA's --xla_dump_to does not hold the Triton kernel's PTX; the selective-scan branch
# gets the SASS from ncu instead.)
#   DURATIONS="segments=2,precompute_cb=False;" bash evals/device/profile_ssd.sh   # kernel times
#   GRAD=1 L=65536 bash evals/device/profile_ssd.sh   # forward + backward, time per kernel
#   GRAD=1 BWD_CONFIGS=";heads_per_program=1" ...       # one such run per SSDBackwardConfig
#   OP=selective_scan CONFIGS=";prefetch=False,fast_math=False" bash evals/device/profile_ssd.sh
#     # selective scan: per config (fields ; separated, empty = default) the ncu details page
#     # and the SASS with per-instruction counts and stall samples (CSV)
set -uo pipefail
cd "$(dirname "$0")/../.."
L="${L:-16384}"
source evals/device/env.sh

# Busy fraction of the pipes a scan can be bound by: XU (MUFU: ex2), FMA, the load/store unit.
PIPE_METRICS=sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active,\
sm__pipe_fma_cycles_active.avg.pct_of_peak_sustained_active,\
sm__inst_executed_pipe_lsu.avg.pct_of_peak_sustained_active

if [ "${GRAD:-0}" = 1 ] && command -v ncu >/dev/null; then
  # GRAD=1: forward + backward (the VJP) of OP at L, every kernel's device time summed by name
  # over the two calls (compile call + 1) and halved: where a training step's scan time goes.
  # BWD_CONFIGS="cfg1;cfg2": one run per SSDBackwardConfig (fields as in --backward-config).
  IFS=';' read -ra bcfgs <<< "${BWD_CONFIGS:-}"
  [ ${#bcfgs[@]} -eq 0 ] && bcfgs=("")
  for c in "${bcfgs[@]}"; do
  f="$OUT/ncu_grad_${OP:-ssd}_L${L}_$(echo "$c" | tr ',=' '__').csv"
  ncu --clock-control none --csv --metrics gpu__time_duration.sum \
    $PY evals/bench/profile_ssd.py --op "${OP:-ssd}" --grad --length "$L" --reps 1 \
    --backward-config "$c" > "$f" 2>&1
  echo "== ${OP:-ssd} forward + backward at L=$L, backward config '$c' (ncu exit code $?):"
  echo "   kernel, launches, us per call"
  $PY - "$f" <<'PYEOF'
import collections, csv, sys
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10 and r[-3] == "gpu__time_duration.sum"]
time, count = collections.Counter(), collections.Counter()
for r in rows:
    us = float(r[-1].replace(",", "")) / (1e3 if r[-2] in ("ns", "nsecond") else 1)
    time[r[4][:70]] += us / 2
    count[r[4][:70]] += 1
for name, us in time.most_common(25):
    print(f"  {name:70s} {count[name] // 2:4d} {us:10.1f}")
print(f"  total {sum(time.values()):.1f} us per call")
PYEOF
  done
elif [ "${OP:-ssd}" = selective_scan ] && command -v ncu >/dev/null; then
  IFS=';' read -ra cfgs <<< "${CONFIGS:-}"
  [ ${#cfgs[@]} -eq 0 ] && cfgs=("")  # CONFIGS unset or empty: the default config
  for c in "${cfgs[@]}"; do
    tag=$(echo "$c" | tr ',=' '__')
    # The second call's launches: the "lane" layout's two passes (states, then scan), or the
    # "tile" layout's one kernel (of the third call).
    ncu --clock-control none --kernel-name regex:selective_scan --launch-skip 2 \
      --launch-count 2 --set full --import-source no -f -o "$OUT/ss_$tag" \
      --metrics "$PIPE_METRICS" \
      $PY evals/bench/profile_ssd.py --op selective_scan --length "$L" --reps 2 --config "$c" \
      > "$OUT/ss_${tag}_run.txt" 2>&1
    echo "== $c (ncu exit code $?)"
    ncu -i "$OUT/ss_$tag.ncu-rep" --page details > "$OUT/ss_${tag}_details.txt" 2>&1
    grep -E "^  [a-z_]+.*\(|Duration|Warp Cycles Per Issued|Issue Slots Busy|Executed Ipc A|Achieved Occupancy|Registers Per|Local Memory|Memory Throughput|DRAM Throughput|Compute \(SM\)|Executed Instructions  |pipe_" \
      "$OUT/ss_${tag}_details.txt" | head -n 60
    ncu -i "$OUT/ss_$tag.ncu-rep" --page source --csv --print-source sass \
      > "$OUT/ss_${tag}_sass.csv" 2>&1 || echo "sass page failed: $(head -c 300 "$OUT/ss_${tag}_sass.csv")"
    rm -f "$OUT/ss_$tag.ncu-rep"
  done
elif [ -n "${DURATIONS:-}" ] && command -v ncu >/dev/null; then
  # DURATIONS="cfg1;cfg2": every kernel's device time in one call (compile call + 1) per
  # SSDPallasConfig (fields as in --config), e.g. the states pass, the fold and the scan apart.
  IFS=';' read -ra cfgs <<< "$DURATIONS"
  for c in "${cfgs[@]}"; do
    f="$OUT/ncu_durations_L${L}_$(echo "$c" | tr ',=' '__').csv"
    ncu --clock-control none --csv --metrics gpu__time_duration.sum \
      $PY evals/bench/profile_ssd.py --length "$L" --reps 1 --config "$c" > "$f" 2>&1
    echo "== $c (ncu exit code $?): kernel, grid, microseconds (last call)"
    $PY - "$f" <<'PYEOF'
import csv, sys
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10 and r[-3] == "gpu__time_duration.sum"]
scans = [i for i, r in enumerate(rows) if "ssd_chunk_scan" in r[4]]
last = rows[scans[-2] + 1:scans[-1] + 1] if len(scans) > 1 else rows  # the second call
total = 0.0
for r in last:
    us = float(r[-1].replace(",", "")) / (1e3 if r[-2] in ("ns", "nsecond") else 1)
    total += us
    print(f"  {r[4][:60]:60s} {r[8]:>16s} {us:9.1f}")
print(f"  total {total:.1f} us")
PYEOF
  done
elif command -v ncu >/dev/null; then
  ncu --clock-control none --kernel-name regex:ssd_chunk_scan --launch-skip 1 --launch-count 1 \
    --set full \
    $PY evals/bench/profile_ssd.py --length "$L" --reps 2 > "$OUT/ncu.txt" 2>&1
  echo "ncu exit code: $?"
  grep -E "Duration|Warp Cycles Per Issued|Issue Slots Busy|Stall|Achieved Occupancy|Registers Per|Shared Memory Config|Block Limit|Memory Throughput|DRAM Throughput|Compute \(SM\)" \
    "$OUT/ncu.txt" | head -n 60
else
  echo "ncu not found" | tee "$OUT/ncu.txt"
fi
