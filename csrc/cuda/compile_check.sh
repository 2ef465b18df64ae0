#!/usr/bin/env bash
# Compile-check the CUDA sources without a CUDA torch or a GPU: nvcc -c against the installed torch's headers.
# A CPU torch wheel ships c10/cuda and ATen/cuda headers but not the generated c10/cuda/impl/cuda_cmake_macros.h;
# it only matters for Windows DLL exports, so it is skipped when absent. Nothing is linked or run.
#   usage: csrc/cuda/compile_check.sh [extra nvcc flags]      (default arch: sm_90)
set -euo pipefail
cd "$(dirname "$0")/../.."
NVCC=${NVCC:-nvcc}
TORCH_INC=$(python -c "import torch, os; print(os.path.join(os.path.dirname(torch.__file__), 'include'))")
PY_INC=$(python -c "import sysconfig; print(sysconfig.get_paths()['include'])")
CXX_STD=${CXX_STD:-c++20}  # what torch>=2.10 extensions build with
EXTRA=()
[[ -f "$TORCH_INC/c10/cuda/impl/cuda_cmake_macros.h" ]] || EXTRA+=(-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE)
out=$(mktemp -d)
for src in csrc/cuda/*.cu; do
  echo "nvcc -c $src"
  "$NVCC" -c "$src" -o "$out/$(basename "$src").o" -std="$CXX_STD" -O3 -Xcompiler -fPIC \
    -I"$TORCH_INC" -I"$TORCH_INC/torch/csrc/api/include" -I"$PY_INC" -DMAT_KERNELS_WITH_CUDA "${EXTRA[@]}" \
    -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ \
    -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr -gencode=arch=compute_90,code=sm_90 "$@"
done
rm -rf "$out"
echo "CUDA sources compile"
