"""``torch.library`` operators of mat_kernels (``mat_kernels::*``).

* ``segment_grams``: Python custom op (Triton / PyTorch), see :mod:`mat_kernels.ops.segment_grams`.
* ``sparse_weight_grad``, ``sparse_weight_grad_accumulate``, ``sparse_bias_grad``, ``sparse_bias_grad_accumulate``,
  ``sparse_input_grad`` (dX of partial backpropagation: no gradient through frozen blocks): C++/CUDA ops from the
  extension ``mat_kernels._C``, see :mod:`mat_kernels.ops.sparse_grad`. Importing this package loads the extension
  if it is built; without it these raise a RuntimeError saying how to build it.
"""
from mat_kernels.ops.segment_grams import segment_grams
from mat_kernels.ops.sparse_grad import (
    extension_available,
    sparse_bias_grad,
    sparse_bias_grad_accumulate,
    sparse_input_grad,
    sparse_weight_grad,
    sparse_weight_grad_accumulate,
)

__all__ = [
    "segment_grams",
    "sparse_weight_grad",
    "sparse_weight_grad_accumulate",
    "sparse_bias_grad",
    "sparse_bias_grad_accumulate",
    "sparse_input_grad",
    "extension_available",
]
