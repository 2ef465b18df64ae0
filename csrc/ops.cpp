// Schemas of the mat_kernels C++ ops, their CPU implementation, and the `mat_kernels._C` Python module.
//
// Loading the shared library (`import mat_kernels._C`) runs the static registrations below; the ops then live
// in `torch.ops.mat_kernels`. Fake (meta) kernels and autograd formulas are registered from Python
// (mat_kernels/ops/sparse_grad.py). The CUDA implementation (csrc/cuda/) adds only a CUDA impl block.
//
// Layout arguments shared by every op: a layer's blocks along one axis are ranges [starts[s], starts[s] +
// sizes[s]) owned by module owners[s] (a module may own several ranges, e.g. one head's Q, K and V rows inside a
// fused QKV weight); `active` is a 1-D bool/uint8 CPU tensor with one entry per module, read on the host.
#include <Python.h>

#include <ATen/ATen.h>
#include <torch/version.h>  // TORCH_VERSION_MAJOR/MINOR/PATCH (torch/csrc/api/include)
#include <torch/library.h>

#include <string>

#include "sparse_grad.h"

namespace mat_kernels {
#ifdef MAT_KERNELS_WITH_CUDA
std::string cuda_build_info();  // csrc/cuda/sparse_grad_cuda.cu
#endif
}  // namespace mat_kernels

// The namespace also holds Python-defined ops (mat_kernels::segment_grams, a torch.library.custom_op, which
// registers as a FRAGMENT); a single C++ TORCH_LIBRARY block owning the namespace coexists with those.
TORCH_LIBRARY(mat_kernels, m) {
  m.def("sparse_weight_grad(Tensor dy, Tensor x, Tensor active, int[] starts, int[] sizes, int[] owners, "
        "int axis) -> Tensor");
  m.def("sparse_weight_grad_accumulate(Tensor(a!) grad_weight, Tensor dy, Tensor x, Tensor active, int[] starts, "
        "int[] sizes, int[] owners, int axis) -> ()");
  m.def("sparse_bias_grad(Tensor dy, Tensor active, int[] starts, int[] sizes, int[] owners) -> Tensor");
  m.def("sparse_bias_grad_accumulate(Tensor(a!) grad_bias, Tensor dy, Tensor active, int[] starts, int[] sizes, "
        "int[] owners) -> ()");
  m.def("sparse_input_grad(Tensor dy, Tensor weight, Tensor active, int[] starts, int[] sizes, int[] owners, "
        "int axis) -> Tensor");
}

TORCH_LIBRARY_IMPL(mat_kernels, CPU, m) {
  m.impl("sparse_weight_grad", &mat_kernels::sparse_weight_grad);
  m.impl("sparse_weight_grad_accumulate", &mat_kernels::sparse_weight_grad_accumulate);
  m.impl("sparse_bias_grad", &mat_kernels::sparse_bias_grad);
  m.impl("sparse_bias_grad_accumulate", &mat_kernels::sparse_bias_grad_accumulate);
  m.impl("sparse_input_grad", &mat_kernels::sparse_input_grad);
}

// A plain Python module so `import mat_kernels._C` loads the library (pattern of pytorch/extension-cpp); no
// pybind11. Build facts are module constants, printed by `python -m mat_kernels`.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C",
      "mat_kernels C++/CUDA ops; importing registers them in torch.ops.mat_kernels", -1, nullptr};
  PyObject* m = PyModule_Create(&module_def);
  if (m == nullptr) return nullptr;
  const std::string torch_version = std::to_string(TORCH_VERSION_MAJOR) + "." +
                                    std::to_string(TORCH_VERSION_MINOR) + "." +
                                    std::to_string(TORCH_VERSION_PATCH);
#ifdef MAT_KERNELS_WITH_CUDA
  const char* devices = "cpu,cuda";
  const std::string cuda = mat_kernels::cuda_build_info();
#else
  const char* devices = "cpu";
  const std::string cuda = "not compiled";
#endif
  if (PyModule_AddStringConstant(m, "BUILT_DEVICES", devices) < 0 ||
      PyModule_AddStringConstant(m, "CUDA_BUILD", cuda.c_str()) < 0 ||
      PyModule_AddStringConstant(m, "TORCH_VERSION", torch_version.c_str()) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
}
