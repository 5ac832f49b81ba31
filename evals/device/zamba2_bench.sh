#!/usr/bin/env bash
# On a GPU machine: evals/bench/zamba2.py on the Zamba2-1.2B-shaped random model (prefill
# 4K/16K/64K/128K, LongMamba's prefill overhead at 16K, decode batch 1 and 8), longmamba_jax
# and then transformers' torch Zamba2 (with mamba_ssm's kernels, built first when their
# sources are in .official/) in a process of its own, each under its own time limit; then the merged table.
# Results under $OUT: zamba2.json (merged), zamba2_jax.json, zamba2_torch.json, zamba2.log,
# device.txt.
#
#   OUT=out bash evals/device/zamba2_bench.sh
# Knobs (environment): JAX_BUDGET_S (timeout of our side, default 240), TORCH_BUDGET_S (no new
# torch row after it, default 150; the process is stopped 90 s later), NEW_TOKENS (128), PY.
set -uo pipefail
cd "$(dirname "$0")/../.."
source evals/device/env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/device.txt"
$PY -c "import jax, torch, transformers; print('jax', jax.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)" \
  2>&1 | tee -a "$OUT/device.txt"
build_official_if_missing  # transformers' Zamba2 takes mamba_ssm's fused kernels when present
common=(--new-tokens "${NEW_TOKENS:-128}")
timeout "${JAX_BUDGET_S:-240}" $PY evals/bench/zamba2.py --no-torch "${common[@]}" \
  --out "$OUT/zamba2_jax.json" 2>&1 | tee "$OUT/zamba2.log"
rc_jax=${PIPESTATUS[0]}
# the torch process must not take GPU memory for JAX
JAX_PLATFORMS=cpu timeout $((${TORCH_BUDGET_S:-150} + 90)) $PY evals/bench/zamba2.py --no-jax \
  "${common[@]}" --budget-s "${TORCH_BUDGET_S:-150}" --out "$OUT/zamba2_torch.json" 2>&1 \
  | tee -a "$OUT/zamba2.log"
rc_torch=${PIPESTATUS[0]}
$PY - "$OUT" <<'PY' 2>&1 | tee -a "$OUT/zamba2.log"
import json, os, sys
from longmamba_evals.bench.zamba2 import _table
out, merged = sys.argv[1], None
for side in ("jax", "torch"):
    path = os.path.join(out, f"zamba2_{side}.json")
    if not os.path.exists(path):
        print(f"{side}: no results ({path} missing)")
        continue
    with open(path) as f:
        data = json.load(f)
    if merged is None:
        merged = data
    else:
        merged["results"] += data["results"]
        merged["torch"] = data["torch"]
if merged is not None:
    with open(os.path.join(out, "zamba2.json"), "w") as f:
        json.dump(merged, f, indent=2)
    print(f"torch: {merged['torch']}\n")
    print(_table(merged["results"]))
PY
echo "exit codes: jax $rc_jax, torch $rc_torch"
[ "$rc_jax" = 0 ] && [ "$rc_torch" = 0 ]
