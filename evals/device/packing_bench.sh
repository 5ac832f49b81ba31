#!/usr/bin/env bash
# On a GPU machine (about 3 minutes): evals/bench/packing.py on the mamba2-1.3b- and
# mamba-1.4b-shaped random models: prefill of 16K tokens as one document, as 16 packed documents
# of 1K (segment_ids) and as a batch [16, 1K], interleaved. Results under $OUT: packing.json,
# packing.log, device.txt.
#
#   OUT=out bash evals/device/packing_bench.sh
# Knobs (environment): TOTAL (default 16K), DOCS (default 16), ROUNDS (default 9), PY.
set -uo pipefail
cd "$(dirname "$0")/../.."
source evals/device/env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/device.txt"
$PY -c "import jax; print('jax', jax.__version__, jax.devices())" 2>&1 | tee -a "$OUT/device.txt"
timeout 170 $PY evals/bench/packing.py --out "$OUT/packing.json" --total "${TOTAL:-16K}" \
  --docs "${DOCS:-16}" --rounds "${ROUNDS:-9}" 2>&1 | tee "$OUT/packing.log"
rc=${PIPESTATUS[0]}
echo "bench exit code: $rc"
exit "$rc"
