#!/usr/bin/env bash
# On one GPU, in under 8 minutes: evals/bench/train.py, ours (one process: one layer's SSD and
# selective scan forward + backward at 4K/16K/64K, the training step of the 1.3B-shaped models
# at 4K and 16K), then mamba_ssm with torch autograd (another process, JAX kept off the GPU:
# the official kernels' forward + backward, MambaLMHeadModel's training step under bf16
# autocast with AdamW), then the merged table. Everything lands under $OUT: train_ours.json,
# train_official.json, train.json (merged), train.md (the table), bench.log, device.txt.
#
#   OUT=out bash evals/device/train_bench.sh
# Time: ours (at most OURS_BUDGET_S + 60, while the official build runs beside it) + official
# (at most OFFICIAL_BUDGET_S + 45); 64K training steps are left out. The backward build takes
# about 85 s on 16 cores (one unit per kernel configuration, in parallel), less than ours.
# Knobs (environment): OURS_BUDGET_S (default 200), OFFICIAL_BUDGET_S (default 200), REMAT
# (layer | dots | none), SSD_BACKWARD_VARIANTS (more SSD layer rows with other backward blocks, ';'
# separated; default the one-head layout, empty for none), PY. The official stack's CUDA extensions are built with their backward
# passes (BACKWARD=1 build_official.sh, about 85 s once per machine), so mamba_ssm trains
# through its fused paths as shipped.
set -uo pipefail
cd "$(dirname "$0")/../.."
source evals/device/env.sh
OURS_BUDGET_S="${OURS_BUDGET_S:-200}"
OFFICIAL_BUDGET_S="${OFFICIAL_BUDGET_S:-200}"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/device.txt"
$PY -c "import jax; print('jax', jax.__version__, jax.devices())" 2>&1 | tee -a "$OUT/device.txt"
# The official extensions with their backward passes (nvcc, CPU) build while ours runs on the
# GPU; the official process waits for them.
export BACKWARD=1
build_official_if_missing > "$OUT/build.txt" 2>&1 &
build_pid=$!

# ours: compile dominates the first call at each shape; the budget stops new rows, the timeout
# the process
timeout $((OURS_BUDGET_S + 60)) $PY evals/bench/train.py --impl ours --out "$OUT/train_ours.json" \
  --budget-s "$OURS_BUDGET_S" --remat "${REMAT:-layer}" --reps 5 --step-reps 3 \
  --ssd-backward-variants "${SSD_BACKWARD_VARIANTS-heads_per_program=1,states_unroll=1,states_num_warps=8}" \
  2>&1 | tee "$OUT/bench.log"
rc_ours=${PIPESTATUS[0]}

wait "$build_pid"; cat "$OUT/build.txt"
JAX_PLATFORMS=cpu timeout $((OFFICIAL_BUDGET_S + 45)) $PY evals/bench/train.py --impl official \
  --out "$OUT/train_official.json" --budget-s "$OFFICIAL_BUDGET_S" --reps 5 --step-reps 3 \
  2>&1 | tee -a "$OUT/bench.log"
rc_official=${PIPESTATUS[0]}

files=()
for f in "$OUT/train_ours.json" "$OUT/train_official.json"; do [ -f "$f" ] && files+=("$f"); done
if [ ${#files[@]} -gt 0 ]; then
  $PY evals/bench/train.py --merge "${files[@]}" --out "$OUT/train.json" | tee "$OUT/train.md"
fi
echo "exit codes: ours $rc_ours, official $rc_official"
[ "$rc_ours" = 0 ] && [ "$rc_official" = 0 ]
