#!/usr/bin/env bash
# On a GPU machine: train several seeds of one architecture together (one process, `vmap` over
# seeds), export each (mamba_ssm native torch layout, bf16), calibrate LongMamba on
# training-format text, then evaluate every seed, one process per seed in parallel
# (`longmamba_evals.short_train.evaluate`: passkey at 1x..32x L_train for vanilla / LongMamba /
# DeciMamba, the LongMamba diagnostics, perplexity vs context on held-out text, optional LongMamba
# levers). What is worth keeping lands in $OUT, re-packed every 20 s, so a run cut short keeps
# what finished:
#
#   $OUT/log.txt                       the whole run's log
#   $OUT/results.tar.gz                per seed (seed{S}/): eval/, levers/, needle_deltas.json,
#                                      train_log.jsonl, train_config.json, calibration.npz,
#                                      model/config.json, eval logs
#   $OUT/model_seed{S}.safetensors     each seed's exported weights (bf16)
#
#   OUT=out ARCH=mamba2 SEEDS=0,1,2 bash evals/device/train_and_eval.sh
# Knobs (environment): ARCH, SEEDS, TRAIN_ARGS, RECALIBRATE, TRAIN_LEN, CALL_LIMIT, SAMPLES,
# MULTIPLES, BATCH, BACKEND, LEVERS, EXTRA_EVAL, DATA_WORKERS, TRAIN_MEM_FRACTION, PY, RUN, EVAL,
# RUNS_FROM, EVAL_JOBS, RULES_1, RULES_2, PPL_RULES.
# Training and evaluation may be two runs (training alone can fill a time limit):
#   EVAL=0 ...                    train, export, calibrate; no evaluation
#   RUNS_FROM=dir ...             no training: evaluate dir/seed{S} for S in SEEDS, each holding
#                                 model/ (config.json, model.safetensors), calibration.npz and
#                                 train_config.json (what EVAL=0 brings back, unpacked)
#   RECALIBRATE=exact ...         calibrate every run again before evaluating, with that storage
#                                 (exact: what the 'alpha' and 'offline' rules need)
#   EVAL=rules ...                LongMamba's token-selection rules instead of the standard
#                                 evaluation: evals/device/rules_eval.sh on every seed in parallel
#                                 (SAMPLES keys per length and depth, BATCH, BACKEND; the methods
#                                 of its two processes a seed: RULES_1, RULES_2 and PPL_RULES), in
#                                 results.tar.gz under seed{S}/rules1/ and rules2/
set -uo pipefail
OUT=${OUT:?set OUT to the output directory}
ARCH=${ARCH:-mamba2}
RUN=${RUN:-/tmp/lm_runs_$ARCH}  # a machine may still hold an earlier run's directories
PY=${PY:-python3}
SEEDS=${SEEDS:-0,1,2}
TRAIN_LEN=${TRAIN_LEN:-512}
TRAIN_ARGS=${TRAIN_ARGS:-"--steps 1569 --time-budget-s 360 --val-every 500 --ckpt-every 100000"}
CALL_LIMIT=${CALL_LIMIT:-570}  # seconds this script may take in all (evals stop starting jobs
                               # 30 s before, and are killed 12 s before)
SAMPLES=${SAMPLES:-20}         # keys per (length, depth): x 5 depths = 100 prompts per length
MULTIPLES=${MULTIPLES:-1,2,4,8,16,32}  # passkey / perplexity lengths, x L_train
BATCH=${BATCH:-50}
BACKEND=${BACKEND:-associative}
LEVERS=${LEVERS:-}            # e.g. "c0.5:c=0.5;b0.5:b=0.5;rho0.2:rho=0.2" (evaluate --levers)
EXTRA_EVAL=${EXTRA_EVAL:-}    # other model dirs (model/ + calibration.npz) to evaluate beside,
                              # passkey only (e.g. longmamba_jax/data/demo)
DATA_WORKERS=${DATA_WORKERS:-6}
EVAL=${EVAL:-1}
RUNS_FROM=${RUNS_FROM:-}
EVAL_JOBS=${EVAL_JOBS:-3}      # evaluation processes at once (each needs ~15 GB at BATCH=50)

T0=$(date +%s)
mkdir -p "$OUT" "$RUN"
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jax_cache}
LOG="$OUT/log.txt"
stamp() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }
pack() {  # atomically, so a kill mid-way leaves the previous archive
    # (an exact calibration of a Mamba-1 run is ~58 MB: RECALIBRATE's stay on the machine)
    tar czf "$OUT/results.tar.gz.part" -C "$RUN" --exclude=ckpt --exclude='*.safetensors' \
        --exclude='*.tmp' ${RECALIBRATE:+--exclude=calibration.npz} . 2>/dev/null \
        && mv "$OUT/results.tar.gz.part" "$OUT/results.tar.gz"
}

(command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
     --format=csv,noheader
 $PY -c "import jax; print('jax', jax.__version__, jax.devices())") 2>&1 | tee "$LOG"
( while sleep 20; do pack; done ) &
PACKER=$!
trap 'kill $PACKER 2>/dev/null' EXIT

IFS=, read -r -a SEED_LIST <<< "$SEEDS"
if [ -n "$RUNS_FROM" ]; then
    stamp "no training: evaluating the runs in $RUNS_FROM"
    for s in "${SEED_LIST[@]}"; do
        [ -d "$RUNS_FROM/seed$s" ] && cp -r "$RUNS_FROM/seed$s" "$RUN/"
    done
else
    stamp "train: --arch $ARCH --seeds $SEEDS $TRAIN_ARGS --train-len $TRAIN_LEN"
    # The vmapped step of several seeds needs more than JAX's default 75% of the GPU.
    # shellcheck disable=SC2086
    XLA_PYTHON_CLIENT_MEM_FRACTION=${TRAIN_MEM_FRACTION:-0.92} \
        $PY -m longmamba_evals.short_train.train --arch "$ARCH" --seeds "$SEEDS" $TRAIN_ARGS \
        --train-len "$TRAIN_LEN" --data-workers "$DATA_WORKERS" --out "$RUN/seed{seed}" 2>&1 \
        | tee -a "$LOG"
    TRAIN_RC=${PIPESTATUS[0]}
    [ "$TRAIN_RC" -eq 0 ] || { stamp "training failed (exit $TRAIN_RC)"; pack; exit 1; }
fi
RUNS=()
for s in "${SEED_LIST[@]}"; do
    d="$RUN/seed$s"
    if [ -f "$d/calibration.npz" ]; then
        RUNS+=("$d")
        [ -n "$RUNS_FROM" ] || cp "$d/model/model.safetensors" "$OUT/model_seed$s.safetensors"
    else
        stamp "seed $s: no calibrated model"
    fi
done
if [ -n "${RECALIBRATE:-}" ]; then
    stamp "calibrate ${#RUNS[@]} runs again, storage $RECALIBRATE"
    CAL_PIDS=()
    for d in "${RUNS[@]}"; do
        # in parallel: none may take JAX's default 75% of the GPU
        XLA_PYTHON_CLIENT_PREALLOCATE=false $PY -m longmamba_evals.short_train.train \
            --recalibrate --calib-storage "$RECALIBRATE" --out "$d" >> "$d/recalibrate.log" 2>&1 &
        CAL_PIDS+=($!)
    done
    for p in "${CAL_PIDS[@]}"; do wait "$p"; done
    tail -q -n 2 "${RUNS[@]/%//recalibrate.log}" | tee -a "$LOG"
fi
pack
[ ${#RUNS[@]} -gt 0 ] || { stamp "training failed"; exit 1; }
[ "$EVAL" = 0 ] && { stamp "done (EVAL=0: no evaluation)"; exit 0; }  # the trap stops the packer

NOW=$(date +%s)
DEADLINE=$(( T0 + CALL_LIMIT - 30 ))
HARD=$(( T0 + CALL_LIMIT - 12 - NOW ))
PIDS=()
if [ "$EVAL" = rules ]; then
    stamp "token-selection rules on ${#RUNS[@]} runs in parallel: $SAMPLES keys per (length, depth)"
    # two processes a seed (the methods split in halves, perplexity with the second), so that
    # compiling, which takes most of this on a small model, runs on more cores
    half1=${RULES_1:-vanilla,longmamba,longmamba-budget,longmamba-alpha,longmamba-channelwise_topk}
    half2=${RULES_2:-longmamba-offline,longmamba-all_topk,longmamba-bound,longmamba-norm}
    ppl=${PPL_RULES:-vanilla,longmamba,longmamba-alpha,longmamba-budget}
    for d in "${RUNS[@]}"; do
        for part in 1 2; do
            if [ $part = 1 ]; then r=$half1; pr=""; else r=$half2; pr=$ppl; fi
            mkdir -p "$d/rules$part"
            OUT="$d/rules$part" MODEL="$d/model" CALIBRATION="$d/calibration.npz" RULES="$r" \
                PPL_RULES="$pr" \
                SAMPLES="$SAMPLES" BATCH="$BATCH" BACKEND="$BACKEND" SKIP_BENCH=1 \
                XLA_PYTHON_CLIENT_PREALLOCATE=false timeout "$HARD" \
                bash "$(dirname "${BASH_SOURCE[0]}")/rules_eval.sh" > "$d/rules_eval$part.log" 2>&1 &
            PIDS+=($!)
        done
    done
    for p in "${PIDS[@]}"; do wait "$p"; done
    cat "${RUNS[@]/%//rules_eval1.log}" "${RUNS[@]/%//rules_eval2.log}" | grep "saved\|rror" | tail -n 60
    kill $PACKER 2>/dev/null
    pack
    stamp "done"
    exit 0
fi
stamp "evaluate ${#RUNS[@]} runs in parallel: $SAMPLES keys per (length, depth), levers '$LEVERS'"
for d in "${RUNS[@]}"; do
    while [ "$(jobs -rp | wc -l)" -gt "$EVAL_JOBS" ]; do sleep 2; done  # the packer is one job
    XLA_PYTHON_CLIENT_PREALLOCATE=false timeout "$HARD" \
        $PY -m longmamba_evals.short_train.evaluate "$d" --samples "$SAMPLES" --multiples "$MULTIPLES" \
        --batch-size "$BATCH" --backend "$BACKEND" --levers "$LEVERS" --deadline "$DEADLINE" \
        > "$d/eval.log" 2>&1 &
    PIDS+=($!)
done
for e in $EXTRA_EVAL; do
    d="$RUN/$(basename "$e")"
    cp -r "$e" "$d"
    RUNS+=("$d")
    XLA_PYTHON_CLIENT_PREALLOCATE=false timeout "$HARD" \
        $PY -m longmamba_evals.short_train.evaluate "$d" --samples "$SAMPLES" --multiples "$MULTIPLES" \
        --batch-size "$BATCH" --backend "$BACKEND" --no-perplexity --diagnose-prompts 0 --deadline "$DEADLINE" \
        > "$d/eval.log" 2>&1 &
    PIDS+=($!)
done
for p in "${PIDS[@]}"; do wait "$p"; done
for d in "${RUNS[@]}"; do
    echo "== $d" >> "$LOG"; grep -v "^\s*$" "$d/eval.log" | tail -n 30 >> "$LOG"
done
grep -h "passkey\|lever\|perplexity\|skipped\|rror" "${RUNS[@]/%//eval.log}" | tail -n 60
kill $PACKER 2>/dev/null
pack
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name --format=csv,noheader >> "$LOG"
stamp "done"
