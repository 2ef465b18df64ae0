"""A toy layer type, in one file, as a user would add one (tests/test_layer_types.py uses it): a scaled linear
layer with its weight stored transposed under another name, ``y = scale · x K + b`` with ``K`` ``[d_in, d_out]``.
Declaring its type gives it discovery (one module per layer), λ from the capture (against the oracle) and MAT's
frozen-FLOPs skipping (a frozen layer is gated by requires_grad)."""
import math

import torch
import torch.nn as nn

from mat_kernels.layers import LayerType, register_layer_type


class ScaledLinear(nn.Module):
    def __init__(self, d_in: int, d_out: int, scale: float = 0.5):
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(d_in, d_out) / math.sqrt(d_in))
        self.bias = nn.Parameter(torch.randn(d_out) / 10)
        self.scale = scale

    def forward(self, x):
        return self.scale * (x @ self.kernel) + self.bias


class ScaledLinearType(LayerType):
    name = "toy_scaled_linear"
    weights = ("kernel",)
    transposed = True  # K is [d_in, d_out]
    own_module = True  # discovery: each layer is one module (kernel + bias)
    module_kind = "scaled"

    def matches(self, owner, attr, parent):
        return isinstance(owner, ScaledLinear) and attr == "kernel"

    def samples(self, site, rec, n):
        # dK (as a linear map [d_out, d_in]) = Σ_t dy_t (scale · x_t)ᵀ: the GEMM's input is the scaled x
        return [(x * site.owner.scale, dy, off) for x, dy, off in super().samples(site, rec, n)]


register_layer_type(ScaledLinearType())
