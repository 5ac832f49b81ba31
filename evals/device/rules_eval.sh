#!/usr/bin/env bash
# On a GPU machine: LongMamba's token-selection rules on the bundled demo model (L_train = 512):
# passkey accuracy by depth at 8x, 16x, 32x and 64x L_train, perplexity at 1x and 32x, every rule
# against vanilla; then each rule's prefill time against vanilla on the 1.3B-shaped random models
# (evals/bench/rules.py). Results under $OUT: passkey/, perplexity/ (JSON, markdown, plots),
# rules.json, eval.log.
#
#   OUT=out bash evals/device/rules_eval.sh
# Knobs: SAMPLES (keys per length and depth, default 2), SKIP_BENCH=1.
set -uo pipefail
cd "$(dirname "$0")/../.."
source evals/device/env.sh
$PY -c "import jax; print('jax', jax.__version__, jax.devices())" 2>&1 | tee "$OUT/device.txt"
rules="vanilla,longmamba,longmamba-channelwise_topk,longmamba-all_topk,longmamba-alpha"
rules="$rules,longmamba-offline,longmamba-bound,longmamba-norm,longmamba-budget"
$PY -m longmamba_evals.tasks.cli passkey --model demo --tokenizer bytes --method "$rules" \
  --lengths 4096,8192,16384,32768 --depths 0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1 \
  --samples "${SAMPLES:-2}" --no-progress --out "$OUT/passkey" 2>&1 | tee "$OUT/eval.log"
$PY -m longmamba_evals.tasks.cli perplexity --model demo --tokenizer bytes \
  --method vanilla,longmamba,longmamba-alpha,longmamba-budget --lengths 512,16384 --windows 10 \
  --no-progress --out "$OUT/perplexity" 2>&1 | tee -a "$OUT/eval.log"
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  $PY evals/bench/rules.py --out "$OUT/rules.json" 2>&1 | tee -a "$OUT/eval.log"
fi
