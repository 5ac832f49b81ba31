# Sourced by the scripts in evals/device/, on a GPU machine that has jax, torch and triton but
# not this package (and no network). Installs the repository once in editable mode, without
# dependencies or build isolation (nothing is downloaded), so `longmamba_jax`,
# `longmamba_kernels`, `longmamba_evals` and `longmamba_convert` import from anywhere; sets the
# scripts' defaults, OUT (results; <repo>/out, created) and PY (python3); unbuffered output.
_LMJ_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
OUT="${OUT:-$_LMJ_ROOT/out}"
PY="${PY:-python3}"
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
if ! (cd / && "$PY" -c 'import os, sys, longmamba_evals.tasks as t
sys.exit(os.path.realpath(t.__file__) != os.path.realpath(sys.argv[1]))' \
      "$_LMJ_ROOT/evals/tasks/__init__.py") >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-deps --no-build-isolation -e "$_LMJ_ROOT" \
    || echo "env.sh: pip install -e $_LMJ_ROOT failed" >&2
fi

# The official stack's CUDA extensions (evals/device/build_official.sh, ~40 s; BACKWARD=1 adds
# the backward passes), built once per machine when their sources are in .official/ and
# BUILD_OFFICIAL is not 0. A failed build is
# reported; the official columns are then skipped with their reason.
build_official_if_missing() {
  local src="${MAMBA_SSM_SRC:-.official}"
  [ "${BUILD_OFFICIAL:-1}" != 0 ] && [ -d "$src/csrc/selective_scan" ] || return 0
  ls "$src"/build/selective_scan_cuda*.so "$src"/build/causal_conv1d_cuda*.so >/dev/null 2>&1 \
    && { [ "${BACKWARD:-0}" != 1 ] || [ -f "$src/build/backward" ]; } && return 0
  bash "$_LMJ_ROOT/evals/device/build_official.sh" > "$OUT/build_official.log" 2>&1 \
    && tail -2 "$OUT/build_official.log" \
    || echo "official extensions: build failed, see $OUT/build_official.log"
}
