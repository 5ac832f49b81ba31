#!/usr/bin/env bash
# On a GPU machine: evals/bench/model.py on the mamba2-1.3b- and mamba-1.4b-shaped random models
# (the decode-step kernel checked against its reference, decode b=1/8 for each decode
# implementation with the per-step kernel census, the official mamba_ssm stack on the same
# shapes in the same run when its sources are in .official/, prefill 4K/16K/64K vanilla vs
# LongMamba, the 1,048,576-token chunked prefill and chunked == one-shot at 128K), then the
# table. Everything lands under $OUT: model.json (rewritten after every section), bench.log,
# device.txt, decode_hlo.tar.gz (optimized decode HLO of every decode variant).
#
#   OUT=out bash evals/device/model_bench.sh
# Knobs (environment): BUDGET_S (the benchmark's own time budget, default 500), SECTIONS (default
# ceilings,stepcheck,decode:mamba2,mamba_ssm,prefill:mamba2,longprompt,decode:mamba1,prefill:mamba1;
# add "flags" for the XLA flag variants), BENCH_ARGS (more flags), PY.
set -uo pipefail
cd "$(dirname "$0")/../.."
BUDGET_S="${BUDGET_S:-500}"
source evals/device/env.sh
mkdir -p "$OUT/hlo"

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv \
  2>&1 | tee "$OUT/device.txt"
$PY -c "import jax; print('jax', jax.__version__, jax.devices())" 2>&1 | tee -a "$OUT/device.txt"
build_official_if_missing
$PY -c "from longmamba_evals.bench.official import import_mamba_ssm, has_causal_conv1d as h; import torch; m = import_mamba_ssm('.official'); print('mamba_ssm', m.__version__, 'torch', torch.__version__, 'causal_conv1d', h())" \
  >> "$OUT/device.txt" 2>&1 || echo "mamba_ssm: not importable" >> "$OUT/device.txt"

timeout $((BUDGET_S + 60)) $PY evals/bench/model.py --out "$OUT/model.json" \
  --budget-s "$BUDGET_S" --hlo-stats --dump-dir "$OUT/hlo" \
  --sections "${SECTIONS:-ceilings,stepcheck,decode:mamba2,mamba_ssm,prefill:mamba2,longprompt,decode:mamba1,prefill:mamba1}" \
  ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
rc=${PIPESTATUS[0]}
tar czf "$OUT/decode_hlo.tar.gz" -C "$OUT" hlo 2>/dev/null && rm -rf "$OUT/hlo"
echo "bench exit code: $rc"
exit "$rc"
