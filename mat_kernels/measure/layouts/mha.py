"""Layout ``mha``: ``torch.nn.MultiheadAttention`` (packed ``in_proj_weight`` or separate ``q/k/v_proj_weight`` when
kdim/vdim differ): one module per head (its Q, K and V rows), each head's ``out_proj`` columns by ``out_proj=``."""
from __future__ import annotations

import dataclasses

import torch.nn as nn

from mat_kernels.measure.layout_registry import register_layout
from mat_kernels.measure.specs import ModuleSpec, ParamSlice


@register_layout("mha")
def _mha(prefix, mod, model, opts):
    if not isinstance(mod, nn.MultiheadAttention):
        return None
    E, H = mod.embed_dim, mod.num_heads
    hd = E // H
    if mod.in_proj_weight is not None:
        qkv = [("", 0), ("", E), ("", 2 * E)]
        specs = []
        for h in range(H):
            slices = [ParamSlice(f"{prefix}.in_proj_weight" if prefix else "in_proj_weight", "rows",
                                 tuple((off + h * hd, hd) for _, off in qkv),
                                 (f"{prefix}.in_proj_bias" if prefix else "in_proj_bias")
                                 if mod.in_proj_bias is not None else None)]
            specs.append(ModuleSpec(f"{prefix}.head{h}" if prefix else f"head{h}", tuple(slices), "head"))
    else:  # separate q/k/v weights (kdim/vdim differ from embed_dim). The packed in_proj_bias is left unclaimed
        # (reported): its entries sit at other offsets than the rows of q/k/v_proj_weight.
        specs = []
        for h in range(H):
            slices = []
            for p, attr in enumerate(("q_proj_weight", "k_proj_weight", "v_proj_weight")):
                slices.append(ParamSlice(f"{prefix}.{attr}" if prefix else attr, "rows", ((h * hd, hd),), None))
            specs.append(ModuleSpec(f"{prefix}.head{h}" if prefix else f"head{h}", tuple(slices), "head"))
    mode = opts.get("out_proj", "separate")
    if mode == "none":
        for attr in ("weight", "bias"):
            if getattr(mod.out_proj, attr) is not None:
                opts.setdefault("shared", {})[f"{prefix}.out_proj.{attr}" if prefix else f"out_proj.{attr}"] = (
                    "always trained (attention output projection, out_proj='none')")
    if mode != "none":
        out_w = f"{prefix}.out_proj.weight" if prefix else "out_proj.weight"
        if mod.out_proj.bias is not None:
            opts.setdefault("shared", {})[out_w[:-len("weight")] + "bias"] = (
                "always trained (output-projection bias, shared by all heads)")
        merged = []
        for h, spec in enumerate(specs):
            out_slice = ParamSlice(out_w, "cols", ((h * hd, hd),))
            if mode == "merge":
                merged.append(dataclasses.replace(spec, slices=spec.slices + (out_slice,)))
            else:
                merged += [spec, ModuleSpec(spec.name + ".out", (out_slice,), "head_out")]
        specs = merged
    return specs
