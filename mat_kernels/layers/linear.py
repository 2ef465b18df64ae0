"""Layer type ``linear``: ``nn.Linear`` (and its subclasses, e.g. MAT's own ``SparseUpdateLinear``); the sparse-update
twin :class:`mat_kernels.SparseUpdateLinear` replaces plain ``nn.Linear`` layers (and equivalents whose forward is
``F.linear``, :data:`LINEAR_EQUIVALENT`); other subclasses may compute something else, so slices of theirs are
masked."""
from __future__ import annotations

import torch.nn as nn

from mat_kernels.layers.base import LayerType, register_layer_type
from mat_kernels.nn.sparse_linear import SparseUpdateLinear

__all__ = ["LinearType", "LINEAR_EQUIVALENT"]

# nn.Linear subclasses whose forward is plain F.linear (Falcon's FalconLinear: a bias-free fast path of the same)
LINEAR_EQUIVALENT = ("FalconLinear",)


class LinearType(LayerType):
    name = "linear"
    priority = 20

    def matches(self, owner, attr, parent):
        return attr == "weight" and isinstance(owner, nn.Linear)

    def sparse_twin(self, owner, attr, parent):
        if type(owner) is nn.Linear or type(owner).__name__ in LINEAR_EQUIVALENT:
            return lambda **kw: SparseUpdateLinear.from_linear(owner, **kw)
        return None


register_layer_type(LinearType(), builtin=True)
