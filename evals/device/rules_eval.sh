#!/usr/bin/env bash
# On a GPU machine: LongMamba's token-selection rules on one model (default: the bundled demo
# model, L_train = 512): passkey accuracy by depth at 8x, 16x, 32x and 64x L_train, perplexity at
# 1x and 32x, every rule against vanilla; then each rule's prefill time against vanilla on the
# 1.3B-shaped random models (evals/bench/rules.py). Results under $OUT: passkey/, perplexity/
# (JSON, markdown, plots), rules.json, eval.log. Each method's results are written as it
# finishes, so a run cut short keeps the methods it did.
#
#   OUT=out bash evals/device/rules_eval.sh
#   OUT=out MODEL=run/seed0/model CALIBRATION=run/seed0/calibration.npz SKIP_BENCH=1 \
#     bash evals/device/rules_eval.sh
# Knobs: MODEL (a checkpoint directory, or demo), CALIBRATION (its LongMamba calibration; the
# demo's own by default), SAMPLES (keys per length and depth, default 2), LENGTHS (passkey),
# PPL_LENGTHS (perplexity), RULES and PPL_RULES (the methods of each task, comma lists; empty:
# skip the task), BACKEND (default auto), BATCH (prompts a batch, default 50), SKIP_BENCH=1.
set -uo pipefail
cd "$(dirname "$0")/../.."
source evals/device/env.sh
MODEL=${MODEL:-demo}
CAL=()
[ -n "${CALIBRATION:-}" ] && CAL=(--calibration "$CALIBRATION")
COMMON=(--model "$MODEL" --tokenizer bytes "${CAL[@]}" --backend "${BACKEND:-auto}"
        --batch-size "${BATCH:-50}" --no-progress)
$PY -c "import jax; print('jax', jax.__version__, jax.devices())" 2>&1 | tee "$OUT/device.txt"
: > "$OUT/eval.log"
rules="vanilla,longmamba,longmamba-channelwise_topk,longmamba-all_topk,longmamba-alpha"
rules="$rules,longmamba-offline,longmamba-bound,longmamba-norm,longmamba-budget"
RULES=${RULES:-$rules}
PPL_RULES=${PPL_RULES-vanilla,longmamba,longmamba-alpha,longmamba-budget}
if [ -n "$RULES" ]; then
  $PY -m longmamba_evals.tasks.cli passkey "${COMMON[@]}" --method "$RULES" \
    --lengths "${LENGTHS:-4096,8192,16384,32768}" --depths 0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1 \
    --samples "${SAMPLES:-2}" --out "$OUT/passkey" 2>&1 | tee -a "$OUT/eval.log"
fi
if [ -n "$PPL_RULES" ]; then
  $PY -m longmamba_evals.tasks.cli perplexity "${COMMON[@]}" --method "$PPL_RULES" \
    --lengths "${PPL_LENGTHS:-512,16384}" --windows 10 --out "$OUT/perplexity" 2>&1 \
    | tee -a "$OUT/eval.log"
fi
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  $PY evals/bench/rules.py --out "$OUT/rules.json" 2>&1 | tee -a "$OUT/eval.log"
fi
