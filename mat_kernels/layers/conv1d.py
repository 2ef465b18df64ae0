"""Layer type ``conv1d``: Hugging Face's transposed linear (GPT-2's ``Conv1D``: weight ``[d_in, d_out]``,
``y = x W + b``), recognised by class name and attributes so that transformers stays an optional dependency; its
sparse-update twin is :class:`mat_kernels.SparseUpdateConv1D` (the same kernels on the transposed view)."""
from __future__ import annotations

import torch.nn as nn

from mat_kernels.layers.base import LayerType, register_layer_type
from mat_kernels.nn.sparse_linear import SparseUpdateConv1D

__all__ = ["Conv1DType", "is_conv1d"]


def is_conv1d(mod: nn.Module) -> bool:
    """Hugging Face's transposed linear (GPT-2's ``Conv1D``, weight ``[d_in, d_out]``) or its sparse-update twin."""
    return (type(mod).__name__ in ("Conv1D", "SparseUpdateConv1D") and hasattr(mod, "nf")
            and getattr(mod, "weight", None) is not None)


class Conv1DType(LayerType):
    name = "conv1d"
    priority = 10
    transposed = True

    def matches(self, owner, attr, parent):
        return attr == "weight" and is_conv1d(owner)

    def sparse_twin(self, owner, attr, parent):
        if type(owner).__name__ == "Conv1D":
            return lambda **kw: SparseUpdateConv1D.from_conv1d(owner, **kw)
        return None


register_layer_type(Conv1DType(), builtin=True)
