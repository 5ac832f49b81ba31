#!/usr/bin/env bash
# Issue 7 in one device call (≤ 9.5 min): evals/bench_model.py on the mamba2-1.3b- and
# mamba-1.4b-shaped random models — prefill 4K/16K/64K vanilla vs LongMamba, decode b=1/8 for
# each decode implementation, the 1,048,576-token chunked prefill and chunked == one-shot at
# 128K, decode under XLA flag variants, mamba_ssm if importable — then the table.
# Everything lands under $OUT: model_h100.json (rewritten after every section), bench.log,
# device.txt, hlo/ (optimized decode HLO, gzipped).
#
#   OUT=... bash evals/run_gpu_model_bench.sh           # from the repo root, on the device
# Knobs (environment): BUDGET_S (bench's own budget, default 500), BENCH_ARGS (extra flags),
# PY.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out}"
PY="${PY:-python3}"
BUDGET_S="${BUDGET_S:-500}"
mkdir -p "$OUT/hlo" /tmp/pp
# The package is not installed there: expose the repo directories under their import names.
ln -sfn "$PWD/kernels" /tmp/pp/longmamba_kernels
ln -sfn "$PWD/evals" /tmp/pp/longmamba_evals
export PYTHONPATH="/tmp/pp:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv \
  2>&1 | tee "$OUT/device.txt"
$PY -c "import jax; print('jax', jax.__version__, jax.devices())" 2>&1 | tee -a "$OUT/device.txt"
$PY -c "import mamba_ssm, torch; print('mamba_ssm', mamba_ssm.__version__, 'torch', torch.__version__)" \
  >> "$OUT/device.txt" 2>&1 || echo "mamba_ssm: not importable" >> "$OUT/device.txt"

timeout $((BUDGET_S + 60)) $PY evals/bench_model.py --out "$OUT/model_h100.json" \
  --budget-s "$BUDGET_S" --compare-mamba-ssm --hlo-stats --dump-dir "$OUT/hlo" \
  ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
rc=${PIPESTATUS[0]}
gzip -f "$OUT"/hlo/*.txt 2>/dev/null
echo "bench exit code: $rc"
exit "$rc"
