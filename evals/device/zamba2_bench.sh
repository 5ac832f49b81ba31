#!/usr/bin/env bash
# On a GPU machine: evals/bench/zamba2.py on the Zamba2-1.2B-shaped random model (prefill
# 4K/16K/64K, decode batch 1 and 8), longmamba_jax against transformers' torch Zamba2 in the
# same run. Results under $OUT: zamba2.json, zamba2.log, device.txt.
#
#   OUT=out bash evals/device/zamba2_bench.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
source evals/device/env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/device.txt"
$PY -c "import jax, torch, transformers; print('jax', jax.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)" \
  2>&1 | tee -a "$OUT/device.txt"
$PY evals/bench/zamba2.py --out "$OUT/zamba2.json" 2>&1 | tee "$OUT/zamba2.log"
exit "${PIPESTATUS[0]}"
