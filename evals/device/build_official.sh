#!/usr/bin/env bash
# Builds the official stack's CUDA extensions on a GPU machine, forward passes only, so that
# the benchmarks can time mamba_ssm as its users run it, in the same run as ours:
#
#   bash evals/device/build_official.sh      # -> .official/build/ (then on sys.path)
#
# - `selective_scan_cuda` (mamba_ssm 2.3.2, csrc/selective_scan): the forward pass for fp32 and
#   bf16 inputs with real A (Mamba-1's scan; mamba_inner_fn and selective_scan_fn call it).
# - `causal_conv1d_cuda` (causal_conv1d 1.7.0): its forward and update kernels as shipped, and
#   the `causal_conv1d` Python package next to it, so mamba_ssm takes its fused paths.
# With BACKWARD=1 the backward passes are built too (the scan's for fp32 and bf16 inputs with
# real A, the conv's for every dtype: what torch autograd of MambaLMHeadModel calls; about
# 85 s in all on 16 cores). fp16 and complex A for the scan are never compiled. What is not built is
# linked to stubs that raise a RuntimeError naming it, so nothing calls them silently. Flags are
# those of the packages' setup.py, for sm_$ARCH only. About 40 s on 16 cores (forward only).
#
# Needs the sources unpacked in $MAMBA_SSM_SRC (default .official; git-ignored, see
# evals/bench/official.py for how to fetch them): <src>/csrc/selective_scan and
# <src>/causal_conv1d-1.7.0. Also nvcc, g++ and torch. `official.import_mamba_ssm` puts
# <src>/build on sys.path. Nothing of either package is copied into this repository.
set -euo pipefail
cd "$(dirname "$0")/../.."
source evals/device/env.sh

SRC="${MAMBA_SSM_SRC:-.official}"
SS="$SRC/csrc/selective_scan"
CC="$SRC/causal_conv1d-1.7.0"
BUILD="${BUILD:-$SRC/build}"
ARCH="${ARCH:-90}"
BACKWARD="${BACKWARD:-0}"
NVCC="${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}"
CXX="${CXX:-g++}"
for f in "$SS/selective_scan.cpp" "$SS/selective_scan_fwd_kernel.cuh" "$CC/csrc/causal_conv1d.cpp" \
         "$CC/csrc/causal_conv1d_fwd.cu" "$CC/causal_conv1d/__init__.py"; do
  [ -f "$f" ] || { echo "missing $f: unpack the mamba_ssm and causal_conv1d sdists into $SRC" \
    "(see evals/bench/official.py)" >&2; exit 2; }
done
[ -x "$NVCC" ] || { echo "no nvcc at $NVCC (set NVCC)" >&2; exit 2; }
CUDA_HOME="${CUDA_HOME:-$(dirname "$(dirname "$(readlink -f "$NVCC")")")}"
mkdir -p "$BUILD"
BUILD="$(cd "$BUILD" && pwd)" SS="$(cd "$SS" && pwd)" CC="$(cd "$CC" && pwd)"

# torch's headers, library dir, ABI and pybind11 flags (as torch.utils.cpp_extension sets them)
eval "$($PY - <<'EOF'
import os, sysconfig, torch
inc = os.path.join(os.path.dirname(torch.__file__), "include")
print(f"TORCH_INC='-I{inc} -I{inc}/torch/csrc/api/include'")
print(f"TORCH_LIB='{os.path.join(os.path.dirname(torch.__file__), 'lib')}'")
print(f"PY_INC='{sysconfig.get_paths()['include']}'")
print(f"EXT_SUFFIX='{sysconfig.get_config_var('EXT_SUFFIX')}'")
flags = [f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
for name in ("COMPILER_TYPE", "STDLIB", "BUILD_ABI"):
    value = getattr(torch._C, f"_PYBIND11_{name}", None)
    if value is not None:
        flags.append(f'-DPYBIND11_{name}="{value}"')
print(f"TORCH_DEFS='{' '.join(flags)}'")
print(f"TORCH_VERSION='{torch.__version__}'")
EOF
)"
echo "building selective_scan_cuda and causal_conv1d_cuda (forward) for sm_$ARCH with" \
  "$("$NVCC" --version | tail -1), torch $TORCH_VERSION, into $BUILD"

INCS="$TORCH_INC -I$PY_INC -I$CUDA_HOME/include"
NVFLAGS=(-O3 -std=c++17 -U__CUDA_NO_HALF_OPERATORS__ -U__CUDA_NO_HALF_CONVERSIONS__
  -U__CUDA_NO_BFLOAT16_OPERATORS__ -U__CUDA_NO_BFLOAT16_CONVERSIONS__
  -U__CUDA_NO_BFLOAT162_OPERATORS__ -U__CUDA_NO_BFLOAT162_CONVERSIONS__
  --expt-relaxed-constexpr --expt-extended-lambda --use_fast_math -lineinfo
  "-gencode=arch=compute_$ARCH,code=sm_$ARCH" -Xcompiler -fPIC)

stub() {  # fn params input_t weight_t: an explicit specialization that raises
  echo "template<> void $1<$3, $4>($2 &, cudaStream_t) { throw std::runtime_error(\"$1<$3, $4> is not built: evals/device/build_official.sh builds forward passes only\"); }"
}

# --- selective_scan_cuda: one translation unit per instantiation built, the rest stubs
for itype in float:fp32 at::BFloat16:bf16; do  # C++ type:file tag
  printf '#include "selective_scan_fwd_kernel.cuh"\ntemplate void selective_scan_fwd_cuda<%s, float>(SSMParamsBase &params, cudaStream_t stream);\n' \
    "${itype%:*}" > "$BUILD/ss_fwd_${itype##*:}.cu"
done
{
  printf '#include <stdexcept>\n#include <c10/util/BFloat16.h>\n#include <c10/util/Half.h>\n'
  printf '#include "selective_scan.h"\n#include "selective_scan_common.h"\n'
  echo 'template<typename input_t, typename weight_t> void selective_scan_fwd_cuda(SSMParamsBase &params, cudaStream_t stream);'
  echo 'template<typename input_t, typename weight_t> void selective_scan_bwd_cuda(SSMParamsBwd &params, cudaStream_t stream);'
  stub selective_scan_fwd_cuda SSMParamsBase at::Half float
  for it in float at::Half at::BFloat16; do
    stub selective_scan_fwd_cuda SSMParamsBase "$it" complex_t
    if [ "$BACKWARD" != 1 ] || [ "$it" = at::Half ]; then
      stub selective_scan_bwd_cuda SSMParamsBwd "$it" float
    fi
    stub selective_scan_bwd_cuda SSMParamsBwd "$it" complex_t
  done
} > "$BUILD/ss_stubs.cu"

# --- causal_conv1d_cuda: forward and update as shipped, backward stubs
{
  printf '#include <stdexcept>\n#include <c10/util/BFloat16.h>\n#include <c10/util/Half.h>\n'
  printf '#include <cuda_runtime.h>\n#include "causal_conv1d.h"\n'
  echo 'template<typename input_t, typename weight_t> void causal_conv1d_bwd_cuda(ConvParamsBwd &params, cudaStream_t stream);'
  echo 'template<typename input_t, typename weight_t> void causal_conv1d_channellast_bwd_cuda(ConvParamsBwd &params, cudaStream_t stream);'
  if [ "$BACKWARD" != 1 ]; then
    for it in float at::Half at::BFloat16; do
      for wt in float at::Half at::BFloat16; do
        stub causal_conv1d_bwd_cuda ConvParamsBwd "$it" "$wt"
        stub causal_conv1d_channellast_bwd_cuda ConvParamsBwd "$it" "$wt"
      done
    done
  fi
} > "$BUILD/cc_stubs.cu"

start=$SECONDS
units=() pids=()
nv() {  # object source defines includes...: compile in the background
  local obj=$1 src=$2 defs=$3; shift 3
  "$NVCC" "${NVFLAGS[@]}" $defs "$@" $INCS -c "$src" -o "$BUILD/$obj.o" > "$BUILD/$obj.log" 2>&1 &
  units+=("$obj") pids+=($!)
}
cxx() {
  local obj=$1 src=$2 defs=$3; shift 3
  "$CXX" -O3 -std=c++17 -fPIC $defs "$@" $INCS -c "$src" -o "$BUILD/$obj.o" > "$BUILD/$obj.log" 2>&1 &
  units+=("$obj") pids+=($!)
}
SS_DEFS="-DTORCH_EXTENSION_NAME=selective_scan_cuda -DTORCH_API_INCLUDE_EXTENSION_H $TORCH_DEFS"
CC_DEFS="-DTORCH_EXTENSION_NAME=causal_conv1d_cuda -DTORCH_API_INCLUDE_EXTENSION_H $TORCH_DEFS"
for u in ss_fwd_fp32 ss_fwd_bf16 ss_stubs; do nv "$u" "$BUILD/$u.cu" "$SS_DEFS" "-I$SS"; done
cxx ss_binding "$SS/selective_scan.cpp" "$SS_DEFS" "-I$SS"
nv cc_fwd "$CC/csrc/causal_conv1d_fwd.cu" "$CC_DEFS" "-I$CC/csrc"
nv cc_update "$CC/csrc/causal_conv1d_update.cu" "$CC_DEFS" "-I$CC/csrc"
nv cc_stubs "$BUILD/cc_stubs.cu" "$CC_DEFS" "-I$CC/csrc"
cxx cc_binding "$CC/csrc/causal_conv1d.cpp" "$CC_DEFS" "-I$CC/csrc"
SS_OBJS=(ss_binding ss_fwd_fp32 ss_fwd_bf16 ss_stubs) CC_OBJS=(cc_binding cc_fwd cc_update cc_stubs)
if [ "$BACKWARD" = 1 ]; then
  # The scan's backward (selective_scan_bwd_{fp32,bf16}_real.cu) instantiates every
  # selective_scan_bwd_launch<threads, items> of its length dispatch in one file, 6-7 minutes
  # of one core: here one unit per (dtype, launch) compiles in parallel, and a dispatch unit
  # repeats selective_scan_bwd_cuda's length switch over them. The kernels are the same
  # templates, instantiated with the same arguments.
  for itype in float:fp32 at::BFloat16:bf16; do
    t="${itype%:*}" tag="${itype##*:}"
    {
      printf '#include <c10/util/BFloat16.h>\n#include <cuda_runtime.h>\n#include "selective_scan.h"\n'
      echo 'template<int kNThreads, int kNItems, typename input_t, typename weight_t> void selective_scan_bwd_launch(SSMParamsBwd &params, cudaStream_t stream);'
      echo 'template<typename input_t, typename weight_t> void selective_scan_bwd_cuda(SSMParamsBwd &params, cudaStream_t stream);'
      echo "template<> void selective_scan_bwd_cuda<$t, float>(SSMParamsBwd &params, cudaStream_t stream) {"
      echo "  if (params.seqlen <= 128) { selective_scan_bwd_launch<32, 4, $t, float>(params, stream); }"
      echo "  else if (params.seqlen <= 256) { selective_scan_bwd_launch<32, 8, $t, float>(params, stream); }"
      echo "  else if (params.seqlen <= 512) { selective_scan_bwd_launch<32, 16, $t, float>(params, stream); }"
      echo "  else if (params.seqlen <= 1024) { selective_scan_bwd_launch<64, 16, $t, float>(params, stream); }"
      echo "  else { selective_scan_bwd_launch<128, 16, $t, float>(params, stream); }"
      echo "}"
    } > "$BUILD/ss_bwd_${tag}_dispatch.cu"
    nv "ss_bwd_${tag}_dispatch" "$BUILD/ss_bwd_${tag}_dispatch.cu" "$SS_DEFS" "-I$SS"
    SS_OBJS+=("ss_bwd_${tag}_dispatch")
    for launch in 32,4 32,8 32,16 64,16 128,16; do
      u="ss_bwd_${tag}_${launch/,/_}"
      printf '#include "selective_scan_bwd_kernel.cuh"\ntemplate void selective_scan_bwd_launch<%s, %s, float>(SSMParamsBwd &params, cudaStream_t stream);\n' \
        "$launch" "$t" > "$BUILD/$u.cu"
      nv "$u" "$BUILD/$u.cu" "$SS_DEFS" "-I$SS"
      SS_OBJS+=("$u")
    done
  done
  # the conv's backward: one unit per explicit instantiation line of causal_conv1d_bwd.cu
  # (the file without its other instantiation lines), in parallel for the same reason
  n=0
  while IFS= read -r line; do
    u="cc_bwd_$n" n=$((n + 1))
    grep -vxF -- "$(grep '^template void causal_conv1d_' "$CC/csrc/causal_conv1d_bwd.cu" \
      | grep -vxF -- "$line")" "$CC/csrc/causal_conv1d_bwd.cu" > "$BUILD/$u.cu"
    nv "$u" "$BUILD/$u.cu" "$CC_DEFS" "-I$CC/csrc"
    CC_OBJS+=("$u")
  done < <(grep '^template void causal_conv1d_' "$CC/csrc/causal_conv1d_bwd.cu")
fi
failed=0
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then
    echo "--- ${units[$i]} failed:" >&2; tail -40 "$BUILD/${units[$i]}.log" >&2; failed=1
  fi
done
[ "$failed" = 0 ] || exit 1
LIBS=(-L"$TORCH_LIB" -lc10 -lc10_cuda -ltorch -ltorch_cpu -ltorch_cuda -ltorch_python
  -L"$CUDA_HOME/lib64" -lcudart -Wl,-rpath,"$TORCH_LIB")
objects() { for o in "$@"; do echo "$BUILD/$o.o"; done; }
"$CXX" -shared -o "$BUILD/selective_scan_cuda$EXT_SUFFIX" $(objects "${SS_OBJS[@]}") "${LIBS[@]}"
"$CXX" -shared -o "$BUILD/causal_conv1d_cuda$EXT_SUFFIX" $(objects "${CC_OBJS[@]}") "${LIBS[@]}"
if [ "$BACKWARD" = 1 ]; then touch "$BUILD/backward"; else rm -f "$BUILD/backward"; fi
rm -rf "$BUILD/causal_conv1d" && cp -r "$CC/causal_conv1d" "$BUILD/causal_conv1d"
echo "built in $((SECONDS - start)) s"
$PY - "$BUILD" <<'EOF'
import sys
import torch  # noqa: F401 - the extensions link against it
sys.path.insert(0, sys.argv[1])
import causal_conv1d
import causal_conv1d_cuda
import selective_scan_cuda
print("import ok:", selective_scan_cuda.__file__, causal_conv1d_cuda.__file__,
      "causal_conv1d", causal_conv1d.__version__)
EOF
