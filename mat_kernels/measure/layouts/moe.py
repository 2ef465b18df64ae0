"""Layout ``moe_experts``: a child list or dict ``experts`` of sub-networks (dense dispatch): one MAT module per
expert, owning all its linear weights. Token-routed experts (each sample sees a different subset) break the
per-sample Gram of a shared module and are refused by the capture, not here."""
from __future__ import annotations

import torch.nn as nn

from mat_kernels.measure.layout_registry import register_layout
from mat_kernels.measure.specs import ModuleSpec, is_linear_like, whole_slice


@register_layout("moe_experts")
def _moe_experts(prefix, mod, model, opts):
    experts = getattr(mod, "experts", None)
    if not isinstance(experts, (nn.ModuleList, nn.ModuleDict)) or len(experts) == 0:
        return None
    items = experts.items() if isinstance(experts, nn.ModuleDict) else enumerate(experts)
    specs = []
    for key, expert in items:
        slices = []
        for sub_name, sub in expert.named_modules():
            if is_linear_like(sub):
                child = f"experts.{key}" + (f".{sub_name}" if sub_name else "")
                slices.append(whole_slice(prefix, mod, child))
        if not slices:
            return None
        specs.append(ModuleSpec(f"{prefix}.experts.{key}" if prefix else f"experts.{key}", tuple(slices), "expert"))
    return specs
