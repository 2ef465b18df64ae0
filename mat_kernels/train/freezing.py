"""How frozen modules are truly frozen (used by :class:`mat_kernels.MAT`).

* Every weight whose layer type (:mod:`mat_kernels.layers`) has a sparse-update twin gets it: a plain ``nn.Linear``
  is swapped for a :class:`mat_kernels.SparseUpdateLinear` sharing its parameters (so the optimizer stays valid), a
  Hugging Face ``Conv1D`` for a :class:`mat_kernels.SparseUpdateConv1D`, and the projection weights of
  ``nn.MultiheadAttention`` get a :class:`mat_kernels.SparseUpdateMHAWeight`: frozen modules skip their
  weight-gradient GEMMs.
* A module that owns whole weights of other layers (``nn.Conv2d``, ``nn.Linear`` subclasses other than Falcon's,
  user layer types without a twin) is gated by ``requires_grad`` (:class:`Gate`): while it is frozen autograd
  computes no weight gradient for it.
* Row or column slices of any other weight still compute their weight gradient, of which the frozen part is
  discarded: they are reported (``masked_weights``).
* :func:`frozen_optimizer`: :class:`mat_kernels.train.optim.FrozenSliceOptimizer` over the blocks of
  :func:`mat_kernels.group_by_weight`.
"""
from __future__ import annotations

import contextlib
import warnings

import torch
import torch.nn as nn

from mat_kernels import routing
from mat_kernels.blocks import WeightBlocks
from mat_kernels.layers import layer_type_of
from mat_kernels.measure.discovery import group_by_weight
from mat_kernels.measure.specs import ModuleSpec
from mat_kernels.train.optim import FrozenSliceOptimizer

__all__ = ["install_sparse", "frozen_optimizer", "owner_of", "layer_type_at", "complement", "Gate"]


def owner_of(module: nn.Module, pname: str):
    """``(owner name, owner module, attribute)`` of parameter ``pname``."""
    owner_name, attr = pname.rsplit(".", 1) if "." in pname else ("", pname)
    return owner_name, module.get_submodule(owner_name) if owner_name else module, attr


def layer_type_at(module: nn.Module, pname: str):
    """``(layer type or None, owner, attribute, parent)`` of weight ``pname`` of ``module``."""
    owner_name, owner, attr = owner_of(module, pname)
    parent = None
    if owner_name:
        parent_name = owner_name.rsplit(".", 1)[0] if "." in owner_name else ""
        parent = module.get_submodule(parent_name) if parent_name else module
    return layer_type_of(owner, attr, parent), owner, attr, parent


def install_sparse(module: nn.Module, specs: list[ModuleSpec], *, wanted: bool, frozen_backward: str,
                   swapped: list) -> tuple[list, list, list]:
    """Swap plain nn.Linear layers holding module slices for SparseUpdateLinear (``swapped`` receives
    ``(parent, child, original)`` for each, to put back), gate whole weights of other layers by requires_grad;
    return (layers, gated, masked weight names)."""
    from mat_kernels.ops import sparse_grad as ops

    by_weight = group_by_weight(module, specs, validate=False)  # validated in __init__
    params = dict(module.named_parameters())
    layers, gated, masked = [], [], []
    reason = None
    if wanted and not ops.extension_available():
        reason = f"the C++ extension is not built ({ops.extension_error()})"
    for wname, groups in by_weight.items():
        layer_type, owner, attr, parent = layer_type_at(module, wname)
        axes = {g.axis for g in groups}
        biases = sorted({g.bias_name for g in groups if g.bias_name is not None})
        twin = layer_type.sparse_twin(owner, attr, parent) if layer_type is not None else None
        if twin is not None and layer_type.swaps_owner and parent is None:
            twin = None  # the model itself is the layer: nothing to swap it in
        if wanted and axes == {"all"} and not (twin is not None and reason is None):
            # a whole weight of a layer without a sparse-update twin (Conv2d, Conv1D, ...): requires_grad gate.
            # Tensors the user froze (requires_grad=False) are left alone.
            tensors = [params[wname]] + [params[b] for b in biases]
            tensors = [t for t in tensors if t.requires_grad]
            if tensors:
                gated.append(Gate(owner, tensors, sorted({m for g in groups for m in g.index})))
            continue
        if not wanted or reason is not None or twin is None or len(axes) != 1:
            masked.append(wname)
            continue
        axis = axes.pop()
        per_module: dict[int, list] = {}  # a head's Q, K and V ranges are one module of the layer
        for g in groups:
            for m, ranges in zip(g.index, g.modules):
                per_module.setdefault(m, []).extend(ranges)
        order = list(per_module)
        owns_bias = bool(biases)
        if axis == "all":
            layer = twin(shared_bias=not owns_bias)
            extra = 0
        else:
            blocks = list(per_module.values())
            d_out, d_in = groups[0].shape
            rest = complement([r for rs in blocks for r in rs], d_out if axis == "rows" else d_in)
            extra = int(bool(rest))
            if rest:  # entries no module owns: one more block, always active (they train like the rest)
                blocks.append(rest)
            layer = twin(shared_bias=axis == "cols" or not owns_bias,
                         **({"row_blocks": blocks} if axis == "rows" else {"col_blocks": blocks}))
        layer.set_frozen_backward(frozen_backward)
        if layer_type.swaps_owner:
            owner_name = owner_of(module, wname)[0]
            child = owner_name.rsplit(".", 1)[-1]
            swapped.append((parent, child, owner))
            setattr(parent, child, layer)
        layers.append((layer, order, extra))
    if masked and wanted:
        why = reason or "they are row or column slices of layers without a sparse-update twin (mat_kernels.layers)"
        warnings.warn(
            f"mat_kernels.MAT: {len(masked)} weight(s) compute their full weight gradient, of which the frozen "
            f"part is discarded ({why}): {masked[:4]}{' ...' if len(masked) > 4 else ''}. MAT.report() lists them.",
            UserWarning, stacklevel=3,
        )
    if frozen_backward == "detach" and masked:
        warnings.warn(
            f"mat_kernels.MAT: frozen_backward='detach' cannot stop the gradient through the {len(masked)} masked "
            f"weight(s) {masked[:4]}: gradients still flow through their frozen slices", UserWarning, stacklevel=3)
    for gate in gated:
        gate.install(module, frozen_backward)
    return layers, gated, masked


def frozen_optimizer(module: nn.Module, specs: list[ModuleSpec], optimizer) -> FrozenSliceOptimizer:
    """The optimizer wrapped so that frozen slices stay bit-for-bit unchanged (blocks from group_by_weight)."""
    params = dict(module.named_parameters())
    blocks: dict[torch.Tensor, list[WeightBlocks]] = {}
    transposed = set()
    for wname, groups in group_by_weight(module, specs, validate=False).items():
        layer_type = layer_type_at(module, wname)[0]
        if layer_type is not None and layer_type.transposed:
            transposed.add(params[wname])
        for g in groups:
            blocks.setdefault(params[wname], []).append(g)
            if g.bias_name is not None:
                blocks.setdefault(params[g.bias_name], []).append(g.for_bias())
    return FrozenSliceOptimizer(optimizer, blocks, transposed=transposed, num_modules=len(specs))


def complement(ranges, dim: int) -> list[tuple[int, int]]:
    """``(start, size)`` ranges of ``[0, dim)`` covered by none of ``ranges``."""
    out, pos = [], 0
    for start, size in sorted(ranges):
        if start > pos:
            out.append((pos, start - pos))
        pos = max(pos, start + size)
    if pos < dim:
        out.append((pos, dim - pos))
    return out


# nn.Linear subclasses whose forward is exactly F.linear(x, weight, bias), so a SparseUpdateLinear may replace them
# (other subclasses may override forward: their slices are masked, and said so).


class Gate(routing.ExactBackward):
    """Whole weights (and their biases) of one layer owned by modules, gated by ``requires_grad``: while every
    owning module is frozen they do not require grad, so autograd computes no weight gradient for them; with
    partial backpropagation a forward pre-hook also detaches the layer's input, so no gradient flows through it."""

    def __init__(self, owner: nn.Module, tensors: list[torch.Tensor], modules: list[int]):
        self.owner, self.tensors, self.modules = owner, tensors, modules
        self.frozen = False
        self._keep = False
        self._open = 0
        self._detach = False
        self.names: list[str] = []

    def install(self, module: nn.Module, frozen_backward: str) -> None:
        ids = {id(t) for t in self.tensors}
        self.names = [n for n, p in module.named_parameters() if id(p) in ids]
        self._detach = frozen_backward == "detach"
        self._handle = self.owner.register_forward_pre_hook(self._pre_hook) if self._detach else None
        routing.register_exact(self.owner, self)

    def remove(self) -> None:
        """Every tensor requires grad again; the detach hook is removed."""
        routing.unregister_exact(self.owner, self)
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self.frozen = False
        for t in self.tensors:
            t.requires_grad_(True)

    def _pre_hook(self, module, args):
        if self.frozen and not self._open and args and isinstance(args[0], torch.Tensor):
            return (args[0].detach(), *args[1:])
        return None

    def apply(self, active: bool, *, keep_requires_grad: bool = False) -> None:
        """Freeze or unfreeze; ``keep_requires_grad`` (compiled models): the tensors keep requiring grad, the
        frozen-slice optimizer discards their gradients."""
        self.frozen = not active
        self._keep = keep_requires_grad
        if not self._open:
            for t in self.tensors:
                t.requires_grad_(active or keep_requires_grad)

    @contextlib.contextmanager
    def exact_backward(self, *, weight_grad: bool):
        """Exact behaviour (weights require grad, no detach) within the context: measurements (entered by
        :func:`mat_kernels.routing.exact_backward`). The weights require grad whatever ``weight_grad`` says: with
        ``False`` the measurement's backward asks for no weight gradient."""
        self._open += 1
        for t in self.tensors:
            t.requires_grad_(True)
        try:
            yield
        finally:
            self._open -= 1
            if not self._open:
                self.apply(not self.frozen, keep_requires_grad=self._keep)
