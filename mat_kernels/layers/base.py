"""The registry of layer types: everything mat_kernels needs to know about one kind of layer that holds a weight
used as a linear map (``y = W x + b`` on some view of the input), in one place (the pattern of opacus' per-layer
grad samplers). Discovery, the capture, the FLOP-skipping freezing of MAT and the test oracle look types up here;
a new layer type is one file that subclasses :class:`LayerType` and calls :func:`register_layer_type`.
"""
from __future__ import annotations

import abc
from typing import Callable

import torch
import torch.nn as nn

__all__ = ["LayerType", "register_layer_type", "unregister_layer_type", "layer_type_of", "layer_types",
           "linear_shape"]


class LayerType(abc.ABC):
    """One kind of layer. Subclasses override what differs from a plain ``nn.Linear``-like layer whose ``weight``
    is ``[d_out, d_in]`` and whose forward hook sees the input ``[n, ..., d_in]`` and output ``[n, ..., d_out]``.

    Attributes:
        name: the type's name (errors, :func:`layer_types`).
        weights: the parameter attributes of the layer that are linear maps (``("weight",)``).
        transposed: the weight is stored ``[d_in, d_out]`` (Hugging Face ``Conv1D``).
        priority: built-in types are tried in increasing priority (user types always first).
        own_module: discovery makes every layer of this type one MAT module (weight and bias) of kind
            ``module_kind`` unless a more specific layout claimed it (``nn.Conv2d``).
        calls: how the capture sees a call: ``"module"`` (forward hooks on the layer: input and output) or
            ``"linear"`` (the ``F.linear`` calls on the weight while :meth:`scope` runs its forward:
            ``nn.MultiheadAttention``, which has no layer per projection).
    """

    name = "layer"
    priority = 100  # built-in types are tried in increasing priority (the more specific first)
    weights: tuple[str, ...] = ("weight",)
    transposed = False
    own_module = False
    module_kind = "layer"
    calls = "module"

    # ------------------------------------------------------------------------------------------- recognition
    @abc.abstractmethod
    def matches(self, owner: nn.Module, attr: str, parent: nn.Module | None) -> bool:
        """Whether parameter ``attr`` of ``owner`` (a child of ``parent``, or None) is a weight of this type (every
        type defines it: a type without it cannot be instantiated)."""

    def linear_shape(self, owner: nn.Module, attr: str, param: torch.Tensor) -> tuple[int, int]:
        """``(d_out, d_in)`` of the weight as a linear map."""
        if self.transposed:
            return param.shape[1], param.shape[0]
        return param.shape[0], param[0].numel()

    def grad_as_linear_map(self, owner: nn.Module, attr: str, grad: torch.Tensor) -> torch.Tensor:
        """Per-sample gradients ``[n, *param.shape]`` as ``[n, d_out, d_in]`` (the oracle's slicing)."""
        if self.transposed:
            grad = grad.transpose(1, 2)
        return grad.reshape(grad.shape[0], grad.shape[1], -1)

    # ------------------------------------------------------------------------------------------- capture
    def scope(self, owner: nn.Module, parent: nn.Module | None) -> nn.Module:
        """The module whose forward the capture's hooks wrap (the layer itself, unless ``calls == "linear"``)."""
        return owner

    def samples_in(self, site, x: torch.Tensor) -> int:
        """How many samples a call's input ``x`` holds (``site.sample_dim``: 1 for sequence-first models)."""
        return x.shape[1] if site.sample_dim == 1 else x.shape[0]

    def samples(self, site, rec, n: int) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
        """A record's ``(x, dy)`` samples first: ``[(x [n, L, d_in'], dy [n, L, d_out'], row offset)]``, one entry
        per independent linear map of the call (one; a grouped convolution has one per group, ``row offset``
        its first output channel), so that a per-sample weight gradient is ``Σ_l dy[i, l] x[i, l]ᵀ``."""
        x, dy = rec.gemm_input(), rec.dy
        d_in = x.shape[-1]
        if site.sample_dim == 1:
            if x.dim() < 3 or x.shape[1] != n:
                raise ValueError(f"{site.weight}: sequence-first input of shape {tuple(x.shape)} does not hold "
                                 f"n={n} samples in dimension 1")
            return [(x.transpose(0, 1).reshape(n, -1, d_in), dy.transpose(0, 1).reshape(n, -1, dy.shape[-1]), 0)]
        if x.shape[0] != n:
            hint = " (sequence-first tensors? pass sample_dim=1)" if x.dim() >= 3 and x.shape[1] == n else ""
            raise ValueError(
                f"{site.weight}: the layer input has leading dimension {x.shape[0]}, not the n={n} samples{hint}. "
                "If the sample axis is lost (e.g. tokens gathered across samples, as in token-routed MoE experts), "
                "per-sample gradients cannot be formed from this layer's tensors"
            )
        return [(x.reshape(n, -1, d_in), dy.reshape(n, -1, dy.shape[-1]), 0)]

    # ------------------------------------------------------------------------------------------- training
    def sparse_twin(self, owner: nn.Module, attr: str, parent: nn.Module | None) -> Callable | None:
        """A factory ``f(**sparse_kwargs)`` of the sparse-update twin of this weight (the keywords of
        :class:`mat_kernels.SparseUpdateLinear`: ``row_blocks``, ``col_blocks``, ``shared_bias``), or None: then a
        whole weight is frozen by ``requires_grad`` gating (no weight gradient) and slices of it are masked (full
        gradient, frozen part discarded)."""
        return None

    swaps_owner = True  # the twin replaces the layer in its parent (False: it attaches to the weight in place)

    def __repr__(self) -> str:
        return f"<layer type {self.name!r}>"


_BUILTIN: list[LayerType] = []  # in the order they are tried: the more specific first
_USER: list[LayerType] = []  # registered by users, tried before the built-in ones (the latest first)


def register_layer_type(layer_type: LayerType, *, builtin: bool = False) -> LayerType:
    """Register a :class:`LayerType` instance (a type of that name already registered raises ``ValueError``).
    User types are tried before the built-in ones."""
    if not isinstance(layer_type, LayerType):
        raise TypeError(f"layer_type must be a LayerType instance, got {type(layer_type).__name__}")
    if any(t.name == layer_type.name for t in _BUILTIN + _USER):
        raise ValueError(f"a layer type named {layer_type.name!r} is already registered")
    if layer_type.calls not in ("module", "linear"):
        raise ValueError(f"{layer_type.name}: calls must be 'module' or 'linear', got {layer_type.calls!r}")
    if builtin:
        _BUILTIN.append(layer_type)
        _BUILTIN.sort(key=lambda t: t.priority)
    else:
        _USER.insert(0, layer_type)
    return layer_type


def unregister_layer_type(name: str) -> None:
    """Remove a user layer type (``ValueError`` if no user type has that name)."""
    if not any(t.name == name for t in _USER):
        raise ValueError(f"no user layer type named {name!r}; registered: {layer_types()}")
    _USER[:] = [t for t in _USER if t.name != name]


def layer_types() -> list[str]:
    """The registered layer types' names, in the order they are tried."""
    return [t.name for t in _USER + _BUILTIN]


def layer_type_of(owner: nn.Module, attr: str, parent: nn.Module | None = None) -> LayerType | None:
    """The layer type of parameter ``attr`` of ``owner`` (``parent``: the module holding ``owner``), or None."""
    for t in _USER + _BUILTIN:
        if t.matches(owner, attr, parent):
            return t
    return None


def linear_shape(owner: nn.Module, attr: str, param: torch.Tensor) -> tuple[int, int]:
    """``(d_out, d_in)`` of a weight in linear-map orientation: its layer type's, else ``[O, rest]``."""
    t = layer_type_of(owner, attr)
    if t is not None:
        return t.linear_shape(owner, attr, param)
    if param.dim() >= 2:
        return param.shape[0], param[0].numel()
    raise ValueError(f"a weight must have at least 2 dimensions, got shape {tuple(param.shape)}")
