#!/usr/bin/env bash
# On a GPU machine (about 5 minutes): evals/bench/packing.py. Sections (SECTIONS, in order):
#   layer  one layer's scan kernel (mamba2-1.3b's SSD, mamba-1.4b's selective scan) at 16K and
#          64K without and with segment_ids (documents of 1K), interleaved;
#   calls  64 documents of 1K prefilled packed in one call, one call per document, and as a
#          batch, on the 130m and 1.3B shapes of both architectures;
#   model  prefill of TOTAL tokens as one document, as DOCS packed documents and as a batch, on
#          the 1.3B shapes.
# Results under $OUT: packing.json, packing.log, device.txt.
#
#   OUT=out bash evals/device/packing_bench.sh
#   SECTIONS=model TOTAL=16K DOCS=16 bash evals/device/packing_bench.sh
# Knobs (environment): SECTIONS (default layer,calls,model), TOTAL (16K), DOCS (16), ROUNDS
# (9), BUDGET_S (330: the timeout of the whole benchmark), PY.
set -uo pipefail
cd "$(dirname "$0")/../.."
source evals/device/env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/device.txt"
$PY -c "import jax; print('jax', jax.__version__, jax.devices())" 2>&1 | tee -a "$OUT/device.txt"
timeout "${BUDGET_S:-330}" $PY evals/bench/packing.py --out "$OUT/packing.json" \
  --sections "${SECTIONS:-layer,calls,model}" --total "${TOTAL:-16K}" --docs "${DOCS:-16}" \
  --rounds "${ROUNDS:-9}" 2>&1 | tee "$OUT/packing.log"
rc=${PIPESTATUS[0]}
echo "bench exit code: $rc"
exit "$rc"
