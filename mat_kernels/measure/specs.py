"""What a MAT module is: :class:`ParamSlice` (rows, columns or all of one weight, in the linear-map orientation
``[d_out, d_in]``), :class:`ModuleSpec` (a named set of slices), :class:`Discovery` (specs and unclaimed
parameters), and the helpers the layouts share (a weight's linear-map shape is its layer type's:
:mod:`mat_kernels.layers`)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn

from mat_kernels.layers import layer_type_of

__all__ = ["ParamSlice", "ModuleSpec", "Discovery", "is_linear_like", "param_name", "get_path", "whole_slice"]

Range = tuple[int, int]


@dataclass(frozen=True)
class ParamSlice:
    """Rows, columns or all of one weight (linear-map orientation ``[d_out, d_in]``), with optional bias entries.

    Attributes:
        weight: the weight parameter's name in ``model.named_parameters()``.
        axis: ``"rows"`` (output features), ``"cols"`` (input features) or ``"all"``.
        ranges: ``(start, size)`` ranges along ``axis`` (empty for ``"all"``).
        bias: name of the bias parameter whose entries for these rows belong to the module (``"rows"``/``"all"``).
    """

    weight: str
    axis: str = "all"
    ranges: tuple[Range, ...] = ()
    bias: str | None = None


@dataclass(frozen=True)
class ModuleSpec:
    """One MAT module: a name, what it is, and the parameter slices it owns (their Grams add)."""

    name: str
    slices: tuple[ParamSlice, ...]
    kind: str = "custom"

    @staticmethod
    def whole(name: str, weight: str, bias: str | None = None, kind: str = "custom") -> "ModuleSpec":
        """A module that owns a whole weight (and its bias)."""
        return ModuleSpec(name, (ParamSlice(weight, "all", (), bias),), kind)

    def param_names(self) -> list[str]:
        out = []
        for s in self.slices:
            out.append(s.weight)
            if s.bias is not None:
                out.append(s.bias)
        return out


@dataclass
class Discovery:
    """Result of :func:`discover_modules`: the module specs, and every parameter no module claimed, with why."""

    specs: list[ModuleSpec]
    unclaimed: dict[str, str] = field(default_factory=dict)

    def names(self) -> list[str]:
        return [s.name for s in self.specs]


# ----------------------------------------------------------------------------------------------------------------
# helpers of the layouts
# ----------------------------------------------------------------------------------------------------------------
def param_name(prefix: str, mod: nn.Module, child: str, attr: str = "weight") -> str | None:
    """The name in ``model.named_parameters()`` of ``<prefix>.<child>.<attr>``, or None if it does not exist."""
    sub = mod
    for part in child.split("."):
        sub = getattr(sub, part, None)
        if sub is None:
            return None
    if getattr(sub, attr, None) is None:
        return None
    return f"{prefix}.{child}.{attr}" if prefix else f"{child}.{attr}"


def get_path(mod: nn.Module, path: str):
    """The submodule (or attribute) at dotted ``path`` under ``mod``, or None."""
    for part in path.split("."):
        mod = getattr(mod, part, None)
        if mod is None:
            return None
    return mod


def is_linear_like(mod) -> bool:
    """A layer whose ``weight`` is a plain matrix of a registered layer type (``nn.Linear``, Hugging Face's
    transposed ``Conv1D``, a user type), as the attention and FFN layouts need: not a convolution."""
    t = layer_type_of(mod, "weight") if isinstance(mod, nn.Module) else None
    return t is not None and t.calls == "module" and mod.weight.dim() == 2


def whole_slice(prefix: str, mod: nn.Module, child: str) -> ParamSlice:
    """The whole weight (and bias) of child ``child`` of ``mod`` as one slice."""
    return ParamSlice(param_name(prefix, mod, child), "all", (), param_name(prefix, mod, child, "bias"))
