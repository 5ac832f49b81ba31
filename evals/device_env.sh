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

# The official stack's CUDA extensions (evals/build_official_extensions.sh, ~40 s), built once
# per machine when their sources are in .official/ and BUILD_OFFICIAL is not 0. A failed build
# is reported; the official columns are then skipped with their reason.
build_official_if_missing() {
  local src="${MAMBA_SSM_SRC:-.official}"
  [ "${BUILD_OFFICIAL:-1}" != 0 ] && [ -d "$src/csrc/selective_scan" ] || return 0
  ls "$src"/build/selective_scan_cuda*.so "$src"/build/causal_conv1d_cuda*.so >/dev/null 2>&1 \
    && return 0
  bash "$_LMJ_ROOT/evals/build_official_extensions.sh" > "$OUT/build_official.log" 2>&1 \
    && tail -2 "$OUT/build_official.log" \
    || echo "official extensions: build failed, see $OUT/build_official.log"
}
