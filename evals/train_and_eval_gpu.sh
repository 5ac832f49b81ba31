#!/usr/bin/env bash
# Issue 9 in one device call: train a byte-level model at L_train, export it (mamba_ssm native
# torch layout, bf16), calibrate LongMamba on training-format text, then passkey retrieval at
# 1x..32x L_train for vanilla / LongMamba / DeciMamba. Everything worth keeping lands in $OUT:
#
#   $OUT/model/{config.json,model.safetensors}  the exported checkpoint
#   $OUT/calibration.npz                        LongMamba calibration
#   $OUT/train_log.txt                          training + eval log (stdout/stderr)
#   $OUT/passkey.md                             the comparison table
#   $OUT/results.tar.gz                         eval JSON/markdown/plot, train_log.jsonl, config,
#                                               needle_deltas.json (Δ of key vs filler)
#
# Results are saved after each method, so a run cut short still returns what finished.
# On the device machine (package not installed), from the repo root:
#   OUT=... bash evals/train_and_eval_gpu.sh
# Knobs (environment): TRAIN_ARGS, TRAIN_LEN, LENGTHS, SAMPLES (per depth), BATCH, BACKEND,
# METHODS, PY, RUN.
set -uo pipefail
OUT=${OUT:?set OUT to the output directory}
RUN=${RUN:-/tmp/lm_run}
PY=${PY:-python3}
TRAIN_LEN=${TRAIN_LEN:-512}
TRAIN_ARGS=${TRAIN_ARGS:-"--arch mamba2 --steps 8000 --time-budget-s 210 --val-every 500 --ckpt-every 100000"}
LENGTHS=${LENGTHS:-$((TRAIN_LEN)),$((2*TRAIN_LEN)),$((4*TRAIN_LEN)),$((8*TRAIN_LEN)),$((16*TRAIN_LEN)),$((32*TRAIN_LEN))}
SAMPLES=${SAMPLES:-10}
BATCH=${BATCH:-50}
BACKEND=${BACKEND:-associative}
METHODS=${METHODS:-"vanilla longmamba decimamba"}

mkdir -p /tmp/pp "$OUT"
ln -sfn "$PWD/kernels" /tmp/pp/longmamba_kernels
ln -sfn "$PWD/evals" /tmp/pp/longmamba_evals
ln -sfn "$PWD/convert" /tmp/pp/longmamba_convert
export PYTHONPATH=/tmp/pp:$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
# The eval processes share compiled code (decode loops) through JAX's persistent cache.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jax_cache}
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT/train_log.txt"; }

(command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
 $PY -c "import jax; print('jax', jax.__version__, jax.devices())") 2>&1 | tee "$OUT/train_log.txt"
stamp "train: $TRAIN_ARGS --train-len $TRAIN_LEN"
# shellcheck disable=SC2086
$PY -m longmamba_evals.train $TRAIN_ARGS --train-len "$TRAIN_LEN" --out "$RUN" 2>&1 \
    | tee -a "$OUT/train_log.txt"
[ -f "$RUN/calibration.npz" ] || { stamp "training failed"; exit 1; }
mkdir -p "$OUT/model"
cp "$RUN/model/config.json" "$RUN/model/model.safetensors" "$OUT/model/"
cp "$RUN/calibration.npz" "$OUT/"
pack() { tar czf "$OUT/results.tar.gz" -C "$RUN" eval train_log.jsonl train_config.json \
             $(cd "$RUN" && ls needle_deltas.json 2>/dev/null)
         [ -f "$RUN/eval/passkey.md" ] && cp "$RUN/eval/passkey.md" "$OUT/"; true; }
mkdir -p "$RUN/eval"
for m in $METHODS; do
    stamp "passkey $m: lengths $LENGTHS, $SAMPLES per depth"
    $PY -m longmamba_evals passkey --model "$RUN/model" --tokenizer bytes --method "$m" \
        --calibration "$RUN/calibration.npz" --lengths "$LENGTHS" --samples "$SAMPLES" \
        --batch-size "$BATCH" --backend "$BACKEND" --decimamba-L-base "$TRAIN_LEN" \
        --out "$RUN/eval" --no-progress > "$RUN/eval/$m.log" 2>&1
    tail -n 12 "$RUN/eval/$m.log" | tee -a "$OUT/train_log.txt"
    pack
done
stamp "diagnose: Δ of key vs filler per global channel"
$PY -m longmamba_evals.train --diagnose --out "$RUN" > "$RUN/needle_deltas.txt" 2>&1; pack
tail -n 40 "$RUN/needle_deltas.txt"
stamp "done"
[ -f "$OUT/passkey.md" ] && cat "$OUT/passkey.md"
