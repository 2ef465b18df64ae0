// CUDA implementation of the sparse-update ops (weight/bias gradients and the partial-backpropagation input
// gradient): the device-generic ATen algorithm of csrc/sparse_grad.cpp (one cuBLAS GEMM or strided-batched GEMM
// per group of active runs, or one GEMM per run for the row blocks of dX, issued on the current stream), run under a
// guard for the tensors' device so allocations and the cuBLAS handle belong to it.
//
// There is deliberately no hand-written kernel here: the work is GEMMs on strided views, which cuBLAS does
// best, and a raw kernel could not be tested on the CPU-only machines this package is developed on. The
// activity mask stays on the CPU (checked in plan_runs), so planning never synchronises with the device.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <string>

#include "../sparse_grad.h"

namespace mat_kernels {
namespace {

at::Tensor sparse_weight_grad_cuda(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& active,
                                   at::IntArrayRef starts, at::IntArrayRef sizes, at::IntArrayRef owners,
                                   int64_t axis) {
  const c10::cuda::CUDAGuard guard(dy.device());
  return sparse_weight_grad(dy, x, active, starts, sizes, owners, axis);
}

void sparse_weight_grad_accumulate_cuda(const at::Tensor& grad_weight, const at::Tensor& dy, const at::Tensor& x,
                                        const at::Tensor& active, at::IntArrayRef starts, at::IntArrayRef sizes,
                                        at::IntArrayRef owners, int64_t axis) {
  const c10::cuda::CUDAGuard guard(dy.device());
  sparse_weight_grad_accumulate(grad_weight, dy, x, active, starts, sizes, owners, axis);
}

at::Tensor sparse_bias_grad_cuda(const at::Tensor& dy, const at::Tensor& active, at::IntArrayRef starts,
                                 at::IntArrayRef sizes, at::IntArrayRef owners) {
  const c10::cuda::CUDAGuard guard(dy.device());
  return sparse_bias_grad(dy, active, starts, sizes, owners);
}

void sparse_bias_grad_accumulate_cuda(const at::Tensor& grad_bias, const at::Tensor& dy, const at::Tensor& active,
                                      at::IntArrayRef starts, at::IntArrayRef sizes, at::IntArrayRef owners) {
  const c10::cuda::CUDAGuard guard(dy.device());
  sparse_bias_grad_accumulate(grad_bias, dy, active, starts, sizes, owners);
}

at::Tensor sparse_input_grad_cuda(const at::Tensor& dy, const at::Tensor& weight, const at::Tensor& active,
                                  at::IntArrayRef starts, at::IntArrayRef sizes, at::IntArrayRef owners,
                                  int64_t axis) {
  const c10::cuda::CUDAGuard guard(dy.device());
  return sparse_input_grad(dy, weight, active, starts, sizes, owners, axis);
}

}  // namespace

// Reported as mat_kernels._C.CUDA_BUILD: the toolkit and the architectures this file was compiled for.
std::string cuda_build_info() {
  std::string info = "CUDA " + std::to_string(CUDART_VERSION / 1000) + "." +
                     std::to_string((CUDART_VERSION % 1000) / 10);
#ifdef __CUDA_ARCH_LIST__
// Variadic: with several architectures __CUDA_ARCH_LIST__ expands to a comma-separated list ("800,900").
#define MK_STR2(...) #__VA_ARGS__
#define MK_STR(...) MK_STR2(__VA_ARGS__)
  info += ", archs " MK_STR(__CUDA_ARCH_LIST__);
#endif
  return info;
}

}  // namespace mat_kernels

TORCH_LIBRARY_IMPL(mat_kernels, CUDA, m) {
  m.impl("sparse_weight_grad", &mat_kernels::sparse_weight_grad_cuda);
  m.impl("sparse_weight_grad_accumulate", &mat_kernels::sparse_weight_grad_accumulate_cuda);
  m.impl("sparse_bias_grad", &mat_kernels::sparse_bias_grad_cuda);
  m.impl("sparse_bias_grad_accumulate", &mat_kernels::sparse_bias_grad_accumulate_cuda);
  m.impl("sparse_input_grad", &mat_kernels::sparse_input_grad_cuda);
}
