// Argument checks shared by the CPU and CUDA implementations. Every message names the op and the argument,
// so a user reading the error knows which tensor to fix without reading C++. TORCH_CHECK_VALUE surfaces in Python
// as ValueError (shapes, devices, masks, layouts), TORCH_CHECK_TYPE as TypeError (dtypes).
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <string>

namespace mat_kernels {

// Floating dtypes the sparse-update ops accept. float64 is accepted too (used by gradcheck and oracles).
inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

inline void check_defined(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.defined(), op, ": ", name, " is an undefined tensor");
}

inline void check_float_dtype(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_TYPE(is_supported_float(t.scalar_type()), op, ": ", name,
                   " must be float32, bfloat16 or float16 (float64 is also accepted), got ", t.scalar_type());
}

inline void check_same_dtype(const at::Tensor& a, const char* na, const at::Tensor& b, const char* nb,
                             const char* op) {
  TORCH_CHECK_TYPE(a.scalar_type() == b.scalar_type(), op, ": ", na, " and ", nb,
                   " must have the same dtype, got ", a.scalar_type(), " and ", b.scalar_type());
}

inline void check_same_device(const at::Tensor& a, const char* na, const at::Tensor& b, const char* nb,
                              const char* op) {
  TORCH_CHECK_VALUE(a.device() == b.device(), op, ": ", na, " and ", nb, " must be on the same device, got ",
              a.device(), " and ", b.device());
}

inline void check_dims_2_or_3(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 2 || t.dim() == 3, op, ": ", name,
              " must be 2-D [tokens, features] or 3-D [batch, tokens, features], got shape ", t.sizes());
}

// Leading (token) dimensions of x and dy must agree: they are the contraction of dW = dyᵀ x.
inline void check_tokens_match(const at::Tensor& dy, const at::Tensor& x, const char* op) {
  TORCH_CHECK_VALUE(dy.dim() == x.dim(), op, ": dy and x must have the same rank, got dy ", dy.sizes(), " and x ",
              x.sizes());
  for (int64_t d = 0; d + 1 < dy.dim(); ++d) {
    TORCH_CHECK_VALUE(dy.size(d) == x.size(d), op, ": dy and x must agree in every dimension but the last, got dy ",
                dy.sizes(), " and x ", x.sizes());
  }
}

// The activity mask is read on the host to plan the GEMMs; on CUDA that would otherwise be a device sync.
inline void check_active(const at::Tensor& active, const char* op) {
  check_defined(active, op, "active");
  TORCH_CHECK_VALUE(active.device().is_cpu(), op,
              ": active must be a CPU tensor (it is read on the host to plan the GEMMs, which would need a "
              "device synchronisation otherwise), got device ",
              active.device());
  TORCH_CHECK_TYPE(active.scalar_type() == at::kBool || active.scalar_type() == at::kByte, op,
                   ": active must be a bool (or uint8) tensor, got ", active.scalar_type());
  TORCH_CHECK_VALUE(active.dim() == 1, op, ": active must be 1-D [num_modules], got shape ", active.sizes());
}

inline void check_no_internal_overlap(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(at::has_internal_overlap(t) != at::MemOverlap::Yes, op, ": ", name,
              " has overlapping memory (e.g. an expanded tensor) and cannot be written in place");
}

}  // namespace mat_kernels
