#!/usr/bin/env bash
# On a GPU machine: evals/bench/quantize.py on the mamba2-1.3b- and mamba-1.4b-shaped random
# models: decode after a 1,024-token prompt, 128 new tokens, batch 1 and 8, bf16 weights against
# weight-only int8 (`longmamba_jax.quantize`), the `fused` decode implementation, interleaved
# timing rounds, the kernels per step of each. Under ~4 minutes on one GPU (the benchmark
# starts no row after BUDGET_S). Everything lands under $OUT: quantize.json (rewritten after
# every row), quantize.md (the table), quantize.log, device.txt.
#
#   OUT=out bash evals/device/quantize_bench.sh
# Knobs (environment): BUDGET_S (default 170), SECTIONS (default sizes,decode:mamba2,decode:mamba1),
# IMPLS (default fused; e.g. scan,fused), BENCH_ARGS (more flags), PY.
set -uo pipefail
cd "$(dirname "$0")/../.."
BUDGET_S="${BUDGET_S:-170}"
source evals/device/env.sh

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv \
  2>&1 | tee "$OUT/device.txt"
$PY -c "import jax; print('jax', jax.__version__, jax.devices())" 2>&1 | tee -a "$OUT/device.txt"

timeout $((BUDGET_S + 90)) $PY evals/bench/quantize.py --out "$OUT/quantize.json" \
  --budget-s "$BUDGET_S" --sections "${SECTIONS:-sizes,decode:mamba2,decode:mamba1}" \
  --impls "${IMPLS:-fused}" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/quantize.log"
rc=${PIPESTATUS[0]}
echo "bench exit code: $rc"
exit "$rc"
