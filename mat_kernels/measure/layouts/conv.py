"""Layout ``conv2d``: every ``nn.Conv2d`` is one MAT module (its weight, a linear map on unfolded patches
``[O, C/groups·kh·kw]``, and its bias); any stride, dilation, groups, padding (``"same"``/``"valid"`` included) and
padding mode."""
from __future__ import annotations

import torch.nn as nn

from mat_kernels.measure.layout_registry import register_layout
from mat_kernels.measure.specs import ModuleSpec, ParamSlice, whole_slice


@register_layout("conv2d")
def _conv2d(prefix, mod, model, opts):
    if not isinstance(mod, nn.Conv2d):
        return None
    return [ModuleSpec(prefix or "conv", (whole_slice("", model, prefix),) if prefix else
                       (ParamSlice("weight", "all", (), "bias" if mod.bias is not None else None),), "conv")]
