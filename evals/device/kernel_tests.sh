#!/usr/bin/env bash
# On a GPU machine: the test suite compiled on the GPU (the `gpu`-marked tests: the Pallas
# kernels compiled through Triton / Mosaic GPU, same shapes and tolerances as the CPU interpret
# run), then the scan benchmark. Logs and the benchmark JSON go under $OUT (or ./out).
#
#   bash evals/device/kernel_tests.sh                     # tests + benchmark
#   SWEEP=16384 bash evals/device/kernel_tests.sh         # also time block-size candidates first
#   PYTEST_MARK="" bash evals/device/kernel_tests.sh      # whole suite (interpret tests too)
#   TEST_FILES="tests/test_kernel_grads.py", WORKERS=8, TEST_TIMEOUT_S=420  # which tests, how
#   SKIP_TESTS=1 / SKIP_BENCH=1                           # only one of the two parts
#   MILLION=0, BENCH_ARGS="..."                           # no 1M-token run; more bench flags
#
# The benchmark also times the official kernels in the same run when their sources are unpacked
# in .official/ (git-ignored; see evals/bench/official.py; copy it to the GPU machine):
# mamba_ssm's Triton SSD, and its CUDA selective scan, whose extension is built first
# (evals/device/build_official.sh, ~40 s; BUILD_OFFICIAL=0 skips). Without them the official
# columns are skipped with the reason.
set -uo pipefail
cd "$(dirname "$0")/../.."
source evals/device/env.sh

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv \
  2>&1 | tee "$OUT/device.txt"
$PY -c "import jax, triton; print('jax', jax.__version__, jax.devices(), 'triton', triton.__version__)" \
  2>&1 | tee -a "$OUT/device.txt"

build_official_if_missing
rc=0
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  # several pytest workers share the GPU (compiling is what takes the time, and it runs on the
  # CPUs): no worker may preallocate the GPU's memory
  workers=()
  $PY -c "import xdist" 2>/dev/null && [ "${WORKERS:-8}" != 0 ] && workers=(-n "${WORKERS:-8}")
  XLA_PYTHON_CLIENT_PREALLOCATE=false timeout "${TEST_TIMEOUT_S:-420}" \
    $PY -m pytest ${TEST_FILES:-tests} -q -p no:cacheprovider -m "${PYTEST_MARK-gpu}" \
    -p no:benchmark -o addopts="-ra --strict-markers" "${workers[@]}" 2>&1 | tee "$OUT/pytest_gpu.log"
  rc=${PIPESTATUS[0]}
  echo "pytest exit code: $rc"
fi
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  extra=()
  [ -n "${SWEEP:-}" ] && extra+=(--sweep "$SWEEP")
  [ "${MILLION:-1}" = 1 ] && extra+=(--million)
  $PY evals/bench/scan.py --out "$OUT/scan.json" "${extra[@]}" ${BENCH_ARGS:-} \
    2>&1 | tee "$OUT/bench.log"
  brc=${PIPESTATUS[0]}
  echo "bench exit code: $brc"
  [ "$brc" != 0 ] && rc=$brc
fi
exit "$rc"
