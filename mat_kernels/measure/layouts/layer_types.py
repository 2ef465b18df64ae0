"""Layout ``layer_types``: every layer whose registered layer type says ``own_module`` (``nn.Conv2d``, and any
type a user registers so) is one MAT module: its weight and bias, of the type's ``module_kind`` (``"conv"``)."""
from __future__ import annotations

from mat_kernels.layers import layer_type_of
from mat_kernels.measure.layout_registry import register_layout
from mat_kernels.measure.specs import ModuleSpec, ParamSlice


@register_layout("layer_types")
def _own_module(prefix, mod, model, opts):
    specs = []
    for attr in dict(mod.named_parameters(recurse=False)):
        t = layer_type_of(mod, attr)
        if t is None or not t.own_module or attr not in t.weights:
            continue
        bias = "bias" if getattr(mod, "bias", None) is not None else None
        full = (lambda a: f"{prefix}.{a}") if prefix else (lambda a: a)
        name = prefix or t.module_kind
        specs.append(ModuleSpec(name if len(t.weights) == 1 else f"{name}.{attr}",
                                (ParamSlice(full(attr), "all", (), full(bias) if bias else None),), t.module_kind))
    return specs or None
