"""MAT modules of a model: named sets of parameter slices, found by a registry of layouts.

A :class:`ModuleSpec` is a MAT module: a name and the parameter slices it owns. A :class:`ParamSlice` is rows,
columns or all of one weight, optionally with the matching bias entries. Slices are always stated in the
*linear-map orientation* ``[d_out, d_in]`` of the weight, whatever its storage: rows are output features, columns
input features. (GPT-2's ``Conv1D`` stores ``[d_in, d_out]``; a ``Conv2d`` weight ``[O, C, kh, kw]`` is the linear
map ``[O, C·kh·kw]`` on unfolded patches.)

:func:`discover_modules` walks ``model.named_modules()`` and asks each registered layout, in registration order,
whether it recognises the module. Layouts are registered with :func:`register_layout`; the built-in ones live in
:mod:`mat_kernels.measure.layouts`, one file per family. Which module names and classes each layout recognises,
grouped-query attention and the output projection's heads (``out_proj=``): ``docs/discovery.md``.

Parameters claimed by no layout are *reported*, never silently dropped: :attr:`Discovery.unclaimed` maps each to
the reason (embeddings and norms are "always trained"; a linear no layout recognised is "unrecognised layout").
"""
from __future__ import annotations

import re
from typing import Iterable

import torch.nn as nn

from mat_kernels.blocks import Range, WeightBlocks
from mat_kernels.layers import layer_type_of, linear_shape
from mat_kernels.measure import layouts as _builtin_layouts  # noqa: F401  (registers the built-in layouts)
from mat_kernels.measure.layout_registry import (  # noqa: F401
    LAYOUTS,
    LayoutFn,
    layouts,
    register_layout,
    unregister_layout,
)
from mat_kernels.measure.specs import Discovery, ModuleSpec, ParamSlice

__all__ = [
    "ParamSlice",
    "ModuleSpec",
    "Discovery",
    "discover_modules",
    "register_layout",
    "unregister_layout",
    "layouts",
    "validate_specs",
    "WeightBlocks",
    "group_by_weight",
]

# ----------------------------------------------------------------------------------------------------------------
# discovery
# ----------------------------------------------------------------------------------------------------------------
_ALWAYS_TRAINED = (nn.Embedding, nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm, nn.RMSNorm)


def discover_modules(
    model: nn.Module,
    *,
    out_proj: str = "separate",
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
) -> Discovery:
    """Find the MAT modules of ``model`` with the registered layouts.

    Args:
        model: any ``nn.Module``.
        out_proj: what becomes of each head's columns of the attention output projection: ``"separate"`` (a module
            ``<attn>.head<h>.out``), ``"merge"`` (part of the head's module) or ``"none"`` (not a module).
        include: regular expressions; keep only modules whose name matches one (``re.search``).
        exclude: regular expressions; drop modules whose name matches one.

    Returns:
        :class:`Discovery` with the specs (in ``named_modules`` order) and the unclaimed parameters.

    Raises:
        ValueError: unknown ``out_proj``; ``include``/``exclude`` patterns that match no module.
    """
    if out_proj not in ("separate", "merge", "none"):
        raise ValueError(f"out_proj must be 'separate', 'merge' or 'none', got {out_proj!r}")
    opts = {"out_proj": out_proj}
    claimed: set[str] = set()
    specs: list[ModuleSpec] = []
    for prefix, mod in model.named_modules():
        for _, fn in LAYOUTS:
            found = fn(prefix, mod, model, opts)
            if not found:
                continue
            params = {p for s in found for p in s.param_names()}
            if params & claimed:
                continue  # a more specific layout owns (some of) these parameters already
            specs += found
            claimed |= params  # other layouts may still match other children of the same module
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"discovered module names are not unique: {dup}")
    for arg, pats in (("include", include), ("exclude", exclude)):
        for pat in pats or ():
            if not any(re.search(pat, n) for n in names):
                raise ValueError(f"{arg} pattern {pat!r} matches none of the {len(names)} discovered modules")
    if include is not None:
        specs = [s for s in specs if any(re.search(p, s.name) for p in include)]
    if exclude is not None:
        specs = [s for s in specs if not any(re.search(p, s.name) for p in exclude)]
    used = {p for s in specs for p in s.param_names()}
    unclaimed = {}
    owners = dict(model.named_modules())
    for pname, p in model.named_parameters():
        if pname in used:
            continue
        if pname in claimed:
            unclaimed[pname] = "excluded by include/exclude"
            continue
        if pname in opts.get("shared", {}):
            unclaimed[pname] = opts["shared"][pname]
            continue
        if pname in opts.get("refused", {}):
            unclaimed[pname] = opts["refused"][pname]
            continue
        owner = owners.get(pname.rsplit(".", 1)[0] if "." in pname else "", model)
        if isinstance(owner, _ALWAYS_TRAINED) or type(owner).__name__.endswith(("RMSNorm", "LayerNorm")):
            unclaimed[pname] = f"always trained ({type(owner).__name__})"
        elif layer_type_of(owner, pname.rsplit(".", 1)[-1]) is not None:
            unclaimed[pname] = f"unrecognised layout ({type(owner).__name__}); add an explicit ModuleSpec"
        else:
            unclaimed[pname] = f"unrecognised parameter of {type(owner).__name__}; add an explicit ModuleSpec"
    return Discovery(specs, unclaimed)


def validate_specs(model: nn.Module, specs: list[ModuleSpec]) -> None:
    """Check every spec against the model: parameters exist, ranges fit the linear-map shape, biases match,
    names are unique, no parameter entry is claimed twice inside one module. Raises ``ValueError``/``TypeError``.
    """
    if not isinstance(specs, (list, tuple)) or not all(isinstance(s, ModuleSpec) for s in specs):
        raise TypeError("specs must be a list of ModuleSpec")
    if not specs:
        raise ValueError("specs is empty: no module to measure")
    params = dict(model.named_parameters())
    owners = dict(model.named_modules())
    seen = set()
    for s in specs:
        if s.name in seen:
            raise ValueError(f"module name {s.name!r} is used twice")
        seen.add(s.name)
        if not s.slices:
            raise ValueError(f"module {s.name!r} has no parameter slice")
        claimed = []
        for sl in s.slices:
            if sl.weight not in params:
                raise ValueError(f"module {s.name!r}: no parameter named {sl.weight!r} in the model")
            owner_name, attr = sl.weight.rsplit(".", 1) if "." in sl.weight else ("", sl.weight)
            d_out, d_in = linear_shape(owners[owner_name], attr, params[sl.weight])
            if not isinstance(sl.ranges, (tuple, list)) or not all(
                    isinstance(r, (tuple, list)) and len(r) == 2 for r in sl.ranges):
                raise TypeError(f"module {s.name!r}: ranges of {sl.weight} must be a sequence of (start, size) "
                                f"pairs, got {sl.ranges!r}")
            # ranges, sizes, bounds and overlaps inside the slice: checked by the one representation
            WeightBlocks(sl.axis, (sl.ranges,), (d_out, d_in), name=f"module {s.name!r} ({sl.weight})")
            if sl.bias is not None:
                if sl.axis == "cols":
                    raise ValueError(f"module {s.name!r}: a column slice cannot own bias entries")
                if sl.bias not in params:
                    raise ValueError(f"module {s.name!r}: no parameter named {sl.bias!r} in the model")
                if params[sl.bias].shape != (d_out,):
                    raise ValueError(f"module {s.name!r}: bias {sl.bias} has shape {tuple(params[sl.bias].shape)}, "
                                     f"expected ({d_out},) for weight {sl.weight}")
            ranges = sl.ranges or ((0, d_out if sl.axis != "cols" else d_in),)
            claimed += [(sl.weight, sl.axis, a, b) for a, b in ranges]
        for i, (w, ax, a, b) in enumerate(claimed):
            for w2, ax2, a2, b2 in claimed[i + 1:]:
                if w != w2:
                    continue
                if ax != ax2 or ax == "all" or (a < a2 + b2 and a2 < a + b):
                    # rows and columns of one weight always intersect; 'all' intersects everything
                    raise ValueError(f"module {s.name!r}: slices of {w} overlap (entries would be counted twice)")


def group_by_weight(model: nn.Module, specs: list[ModuleSpec], *,
                    validate: bool = True) -> dict[str, list[WeightBlocks]]:
    """``{weight name: [WeightBlocks, ...]}``: every spec slice, grouped by weight and then by (axis, bias), in
    first-appearance order; one module's several slices of a weight along one axis are merged (a head's Q, K and V
    rows of a fused weight). Each :class:`~mat_kernels.WeightBlocks` carries the weight and bias names, the linear
    shape and, in ``index``, the modules' positions in ``specs``. The capture (Grams per layer),
    :class:`mat_kernels.MAT` (sparse-update layouts, ``requires_grad`` gates) and
    :class:`mat_kernels.train.optim.FrozenSliceOptimizer` (frozen blocks) are all built from it.
    Validates the specs first (:func:`validate_specs`) unless ``validate=False``.
    A weight with more than one group mixes axes (or owned and unowned bias entries)."""
    if validate:
        validate_specs(model, specs)
    params = dict(model.named_parameters())
    owners = dict(model.named_modules())
    grouped: dict[str, dict[tuple[str, str | None], dict[int, list[Range]]]] = {}
    for m, spec in enumerate(specs):
        for sl in spec.slices:
            groups = grouped.setdefault(sl.weight, {})
            entry = groups.setdefault((sl.axis, sl.bias), {}).setdefault(m, [])
            entry.extend(sl.ranges)
    out = {}
    for wname, groups in grouped.items():
        owner_name, attr = wname.rsplit(".", 1) if "." in wname else ("", wname)
        shape = linear_shape(owners[owner_name], attr, params[wname])
        out[wname] = [WeightBlocks(axis, tuple(tuple(r) for r in mods.values()), shape, index=tuple(mods),
                                   weight=wname, bias_name=bias, name=wname)
                      for (axis, bias), mods in groups.items()]
    return out
