# Sourced by the device scripts (evals/*.sh): the package is not installed on the device
# machine, so expose the repo's directories under their import names (longmamba_kernels,
# longmamba_evals, longmamba_convert; longmamba_jax is importable from the repo root) and put
# them on PYTHONPATH, with unbuffered output for the logs. Also the scripts' defaults: OUT
# (results; <repo>/out) and PY (python3), and OUT created.
_LMJ_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p /tmp/pp
ln -sfn "$_LMJ_ROOT/kernels" /tmp/pp/longmamba_kernels
ln -sfn "$_LMJ_ROOT/evals" /tmp/pp/longmamba_evals
ln -sfn "$_LMJ_ROOT/convert" /tmp/pp/longmamba_convert
export PYTHONPATH="/tmp/pp:$_LMJ_ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-$_LMJ_ROOT/out}"
PY="${PY:-python3}"
mkdir -p "$OUT"
