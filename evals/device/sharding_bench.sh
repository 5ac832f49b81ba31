#!/usr/bin/env bash
# On a machine with several GPUs (8 for the full table): the sharding tests on the GPUs (the
# 8-device checks of tests/test_sharding*.py: sharded == one-device forward, decode, generate,
# gradients and context-parallel prefill), then evals/bench/sharding.py on the mamba2-1.3b- and
# mamba-1.4b-shaped random models: data-, tensor- and context-parallel prefill on 1, 2, 4, 8
# GPUs and the 10,000,000-token context-parallel prefill. Results under $OUT: sharding.json,
# bench.log, pytest_sharding.log, device.txt.
#
#   OUT=out bash evals/device/sharding_bench.sh
# Knobs: SKIP_TESTS=1, DEVICES (default 1,2,4,8), LONG (default 10000000; 0 skips),
# BENCH_ARGS (more flags), PY.
set -uo pipefail
cd "$(dirname "$0")/../.."
source evals/device/env.sh

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/device.txt"
nvidia-smi topo -m >> "$OUT/device.txt" 2>&1
$PY -c "import jax; print('jax', jax.__version__, jax.devices())" 2>&1 | tee -a "$OUT/device.txt"

rc=0
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  # The child modules themselves (LMJ_SHARDING_CHILD=1) run on the 8 GPUs, slow tests included.
  LMJ_SHARDING_CHILD=1 $PY -m pytest tests/test_sharding.py tests/test_sharding_context.py -q \
    -p no:cacheprovider -o addopts="-ra --strict-markers" 2>&1 | tee "$OUT/pytest_sharding.log"
  rc=${PIPESTATUS[0]}
fi
$PY evals/bench/sharding.py --out "$OUT/sharding.json" --devices "${DEVICES:-1,2,4,8}" \
  --long "${LONG:-10000000}" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
exit $(( rc || PIPESTATUS[0] ))
