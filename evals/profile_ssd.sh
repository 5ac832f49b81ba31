#!/usr/bin/env bash
# On the device machine: why the SSD kernel runs at ~3.6x its memory floor. Writes
# $OUT/ncu.txt: Nsight Compute, full set, one launch of the kernel at L (default 16384), and
# prints its occupancy, issue and throughput lines. (XLA's --xla_dump_to did not hold the
# Triton kernel's PTX in session 3, so there is no PTX here.)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out}"
L="${L:-16384}"
PY="${PY:-python3}"
mkdir -p "$OUT"
source evals/device_env.sh

if command -v ncu >/dev/null; then
  ncu --clock-control none --kernel-name regex:ssd_chunk_scan --launch-skip 1 --launch-count 1 \
    --set full \
    $PY evals/profile_ssd.py --length "$L" --reps 2 > "$OUT/ncu.txt" 2>&1
  echo "ncu exit code: $?"
  grep -E "Duration|Warp Cycles Per Issued|Issue Slots Busy|Stall|Achieved Occupancy|Registers Per|Shared Memory Config|Block Limit|Memory Throughput|DRAM Throughput|Compute \(SM\)" \
    "$OUT/ncu.txt" | head -n 60
else
  echo "ncu not found" | tee "$OUT/ncu.txt"
fi
