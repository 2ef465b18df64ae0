// Sparse-update backward of a linear layer: weight (and bias) gradients restricted to active blocks, and the input
// gradient of partial backpropagation (no gradient through frozen blocks).
//
// The implementation is written once against ATen (mm/bmm/sum on strided views) and is device-generic: the CPU
// registration (csrc/ops.cpp) and the CUDA registration (csrc/cuda/sparse_grad_cuda.cu) call the same
// functions, so every GEMM runs through the device's BLAS (MKL/OpenBLAS, cuBLAS) on the current stream.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace mat_kernels {

// `count` runs [start + i*stride, start + i*stride + len), i = 0..count-1, along the blocked axis.
// count == 1: one GEMM on narrowed views; count > 1: one batched GEMM on as_strided views.
struct RunGroup {
  int64_t start;
  int64_t stride;
  int64_t len;
  int64_t count;
};

struct RunPlan {
  std::vector<RunGroup> active;  // maximal runs of active rows/columns, grouped
  std::vector<RunGroup> frozen;  // the complement in [0, dim): frozen blocks and indices in no block
  std::vector<std::pair<int64_t, int64_t>> active_runs;  // the maximal active runs (start, len), ungrouped
  int64_t active_width = 0;                              // Σ len over active_runs
};

// Validates the layout (segments (starts[s], sizes[s]) owned by module owners[s]; in range, non-overlapping,
// every owner < active.numel() == 1 + max(owner)) and the mask, reads the mask on the host and returns the
// grouped runs. `dim` is the length of the blocked axis, `dim_name` how to call it in errors. Plans are cached
// (per thread) by layout and mask: a call with a layout and mask seen before only looks its plan up.
const RunPlan& plan_runs(const at::Tensor& active, at::IntArrayRef starts, at::IntArrayRef sizes, at::IntArrayRef owners,
                  int64_t dim, const char* op, const char* dim_name);

// dW = dyᵀ x restricted to active blocks, frozen blocks zero. axis 0: blocks of rows (output features),
// axis 1: blocks of columns (input features). dy: [T, d_out] or [B, T, d_out]; x: [T, d_in] or [B, T, d_in].
at::Tensor sparse_weight_grad(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& active,
                              at::IntArrayRef starts, at::IntArrayRef sizes, at::IntArrayRef owners, int64_t axis);

// grad_weight[active blocks] += dyᵀ x; frozen blocks are not touched.
void sparse_weight_grad_accumulate(const at::Tensor& grad_weight, const at::Tensor& dy, const at::Tensor& x,
                                   const at::Tensor& active, at::IntArrayRef starts, at::IntArrayRef sizes,
                                   at::IntArrayRef owners, int64_t axis);

// db = Σ_tokens dy restricted to active row blocks, frozen entries zero.
at::Tensor sparse_bias_grad(const at::Tensor& dy, const at::Tensor& active, at::IntArrayRef starts,
                            at::IntArrayRef sizes, at::IntArrayRef owners);

// grad_bias[active row blocks] += Σ_tokens dy; frozen entries are not touched.
void sparse_bias_grad_accumulate(const at::Tensor& grad_bias, const at::Tensor& dy, const at::Tensor& active,
                                 at::IntArrayRef starts, at::IntArrayRef sizes, at::IntArrayRef owners);

// dX = dY · (M ⊙ W): the input gradient when no gradient flows through frozen blocks of W [d_out, d_in]
// (M: 0/1 mask of the active blocks; axis 0: rows = output features, axis 1: columns = input features).
// dy: [T, d_out] or [B, T, d_out]; returns dX with dy's leading shape and last dim d_in, contiguous.
at::Tensor sparse_input_grad(const at::Tensor& dy, const at::Tensor& weight, const at::Tensor& active,
                             at::IntArrayRef starts, at::IntArrayRef sizes, at::IntArrayRef owners, int64_t axis);

}  // namespace mat_kernels
