"""What a MAT module is: :class:`ParamSlice` (rows, columns or all of one weight, in the linear-map orientation
``[d_out, d_in]``), :class:`ModuleSpec` (a named set of slices), :class:`Discovery` (specs and unclaimed
parameters), and the helpers that view a layer's weight as a linear map, shared by discovery, its layouts, the
capture and the controller."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

__all__ = ["ParamSlice", "ModuleSpec", "Discovery", "is_conv1d", "is_linear_like", "linear_shape", "param_name",
           "get_path", "whole_slice"]

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
# linear-map view of a weight
# ----------------------------------------------------------------------------------------------------------------
def is_conv1d(mod: nn.Module) -> bool:
    """Hugging Face's transposed linear (GPT-2's ``Conv1D``, weight ``[d_in, d_out]``) or its sparse-update twin."""
    # Hugging Face's transposed linear (GPT-2): weight [nx, nf], y = x @ W + b. Recognised by name and shape so
    # that transformers stays an optional dependency.
    # mat_kernels' own SparseUpdateConv1D (the sparse-update twin MAT swaps in) is one too.
    return (type(mod).__name__ in ("Conv1D", "SparseUpdateConv1D") and hasattr(mod, "nf")
            and getattr(mod, "weight", None) is not None)


def linear_shape(owner: nn.Module, attr: str, param: torch.Tensor) -> tuple[int, int]:
    """``(d_out, d_in)`` of a weight in linear-map orientation."""
    if is_conv1d(owner) and attr == "weight":
        return param.shape[1], param.shape[0]
    if param.dim() == 2:
        return param.shape[0], param.shape[1]
    if param.dim() > 2:  # conv: [O, C/groups, k...] -> O x (C/groups·k...)
        return param.shape[0], param[0].numel()
    raise ValueError(f"a weight must have at least 2 dimensions, got shape {tuple(param.shape)}")


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
    """``nn.Linear`` or Hugging Face's transposed ``Conv1D``."""
    return isinstance(mod, nn.Linear) or is_conv1d(mod)


def whole_slice(prefix: str, mod: nn.Module, child: str) -> ParamSlice:
    """The whole weight (and bias) of child ``child`` of ``mod`` as one slice."""
    return ParamSlice(param_name(prefix, mod, child), "all", (), param_name(prefix, mod, child, "bias"))
