#!/usr/bin/env bash
# Runs the kernel test suite compiled on the GPU (the `gpu`-marked tests: the Pallas kernels
# compiled through Triton, same shapes and tolerances as the CPU interpret run) and then the scan
# benchmark, on the device machine. Logs and the benchmark JSON go under $OUT (or ./out).
#
#   bash evals/run_gpu_kernel_tests.sh            # tests + benchmark
#   SWEEP=16384 bash evals/run_gpu_kernel_tests.sh   # also time block-size candidates first
#   PYTEST_MARK="" bash evals/run_gpu_kernel_tests.sh  # whole suite (interpret tests too)
#   SKIP_TESTS=1 / SKIP_BENCH=1                      # only one of the two parts
#
# The benchmark also times the official kernels in the same run when their sources are unpacked
# in .official/ (git-ignored; see evals/official_mamba.py; name `.official` in the device tool's
# `carry`): mamba_ssm's Triton SSD, and its CUDA selective scan, whose extension is built first
# (evals/build_official_extensions.sh, ~40 s; BUILD_OFFICIAL=0 skips). Without them the official
# columns are skipped with the reason.
set -uo pipefail
cd "$(dirname "$0")/.."
source evals/device_env.sh

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv \
  2>&1 | tee "$OUT/device.txt"
$PY -c "import jax, triton; print('jax', jax.__version__, jax.devices(), 'triton', triton.__version__)" \
  2>&1 | tee -a "$OUT/device.txt"

build_official_if_missing
rc=0
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  $PY -m pytest tests/test_kernels.py -q -p no:cacheprovider -m "${PYTEST_MARK-gpu}" \
    -o addopts="-ra --strict-markers" 2>&1 | tee "$OUT/pytest_gpu.log"
  rc=${PIPESTATUS[0]}
  echo "pytest exit code: $rc"
fi
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  extra=()
  [ -n "${SWEEP:-}" ] && extra+=(--sweep "$SWEEP")
  [ "${MILLION:-1}" = 1 ] && extra+=(--million)
  $PY evals/bench_scan.py --out "$OUT/scan_h100.json" "${extra[@]}" ${BENCH_ARGS:-} \
    2>&1 | tee "$OUT/bench.log"
  brc=${PIPESTATUS[0]}
  echo "bench exit code: $brc"
  [ "$brc" != 0 ] && rc=$brc
fi
exit "$rc"
