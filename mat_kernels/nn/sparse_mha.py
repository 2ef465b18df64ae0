"""Sparse updates for the projection weights of ``nn.MultiheadAttention``, which has no linear layer to swap: its
forward calls ``F.linear`` on the whole ``in_proj_weight`` or on row slices of it, and on ``out_proj.weight``;
those calls are routed to :func:`mat_kernels.sparse_update_linear` by a handler of :mod:`mat_kernels.routing`
(registered while any :class:`SparseUpdateMHAWeight` lives).
"""
from __future__ import annotations

import weakref

import torch
from torch import nn

from mat_kernels import routing
from mat_kernels.blocks import BlockSpec, WeightBlocks
from mat_kernels.nn.sparse_function import sparse_layout, sparse_update_linear
from mat_kernels.nn.sparse_linear import SparseUpdateMixin

__all__ = ["SparseUpdateMHAWeight"]

# ----------------------------------------------------------------------------------------------------------------
# nn.MultiheadAttention: no layer to swap
# ----------------------------------------------------------------------------------------------------------------
# id(parameter) -> its sparse-update state. Weak values: when the controller (MAT) that holds a state is gone, the
# entry goes too and the attention trains through plain F.linear again; while a state lives it holds its
# parameter, so the id cannot be reused by another tensor.
_MHA_WEIGHTS: "weakref.WeakValueDictionary[int, SparseUpdateMHAWeight]" = weakref.WeakValueDictionary()
_MHA_BY_MODULE: dict[int, list] = {}  # id(attention module) -> weak references to its weights' states
_ROUTER: list[int] = []  # the routing handler's token while any state lives


def _route(nxt, input, weight, bias=None):
    """The ``F.linear`` handler: calls on a gated weight (or on a row view of it: cross-attention splits
    ``in_proj_weight`` into Q and K/V rows) take the sparse-update route; every other call goes on."""
    holder, r0 = _MHA_WEIGHTS.get(id(weight)), 0
    if holder is None and isinstance(weight, torch.Tensor) and weight._base is not None:
        holder = _MHA_WEIGHTS.get(id(weight._base))
        if holder is not None:
            r0 = routing.is_view_of_rows(weight, holder.weight)
            if r0 is None:
                holder = None  # not a block of whole rows: leave it to autograd (exact)
    if holder is None:
        return nxt(input, weight, bias)
    return holder._call(input, weight, bias, r0)


def _update_router(*_) -> None:
    """Register the routing handler while any state lives, and remove it when the last one is gone."""
    live = any(True for _ in _MHA_WEIGHTS.values())  # (a state being collected may still be counted by len)
    if live and not _ROUTER:
        _ROUTER.append(routing.add_linear_handler(_route, routing.ROUTE))
    elif not live and _ROUTER:
        routing.remove_linear_handler(_ROUTER.pop())


class SparseUpdateMHAWeight(SparseUpdateMixin):
    """Sparse updates for a weight of ``nn.MultiheadAttention`` (``in_proj_weight``, ``q/k/v_proj_weight``,
    ``out_proj.weight``), which ``F.multi_head_attention_forward`` passes straight to ``F.linear`` (whole, or as
    row views for cross-attention): there is no layer to swap. While this state lives, ``F.linear`` calls on this
    weight are routed through :func:`sparse_update_linear` (:mod:`mat_kernels.routing`), with the layout
    restricted to the rows a view covers; a forward of the attention that was not routed (``torch.compile``
    traced it) raises.

    Same interface as :class:`SparseUpdateLinear` (``set_active``, ``exact_backward``, ``set_frozen_backward``);
    not an ``nn.Module`` (the parameter stays where it is). :meth:`remove` undoes the hooks.
    """

    def __init__(self, attention: nn.MultiheadAttention, weight: torch.Tensor, *, row_blocks: BlockSpec = None,
                 col_blocks: BlockSpec = None, frozen_backward: str = "dw", shared_bias: bool = False):
        if not isinstance(attention, nn.MultiheadAttention):
            raise TypeError(f"attention must be an nn.MultiheadAttention, got {type(attention).__name__}")
        owned = [attention.in_proj_weight, attention.q_proj_weight, attention.k_proj_weight,
                 attention.v_proj_weight, attention.out_proj.weight]
        if not any(weight is p for p in owned if p is not None):
            raise ValueError("weight must be one of the attention module's projection weights")
        if id(weight) in _MHA_WEIGHTS:
            raise ValueError("this weight already has a SparseUpdateMHAWeight (another MAT on this model?); "
                             "remove() it first")
        self.attention, self.weight = attention, weight
        self.out_features, self.in_features = weight.shape
        self._init_sparse(row_blocks, col_blocks, False, frozen_backward, shared_bias)
        self._views: dict[tuple[int, int], tuple[WeightBlocks, torch.Tensor]] = {}
        self._routed = 0  # calls taken through the sparse route (a forward with none was bypassed)
        _MHA_WEIGHTS[id(weight)] = self
        weakref.finalize(self, _update_router)
        _update_router()
        routing.register_exact(attention, self)
        refs = _MHA_BY_MODULE.setdefault(id(attention), [])
        refs[:] = [r for r in refs if r() is not None]  # states whose MAT is gone
        refs.append(weakref.ref(self))
        self._handles = [attention.register_forward_pre_hook(_mha_enter),
                         attention.register_forward_hook(_mha_exit, always_call=True)]

    def remove(self) -> None:
        """Remove the hooks; the weight trains through plain ``F.linear`` again."""
        for h in self._handles:
            h.remove()
        self._handles = []
        _MHA_WEIGHTS.pop(id(self.weight), None)
        _update_router()
        routing.unregister_exact(self.attention, self)
        refs = [r for r in _MHA_BY_MODULE.get(id(self.attention), ()) if r() is not None and r() is not self]
        if refs:
            _MHA_BY_MODULE[id(self.attention)] = refs
        else:
            _MHA_BY_MODULE.pop(id(self.attention), None)

    def _view(self, r0: int, rows: int) -> tuple[WeightBlocks, torch.Tensor | None]:
        """The layout of rows ``[r0, r0 + rows)`` and the indices of its modules in the full mask."""
        if r0 == 0 and rows == self.out_features:
            return self.layout, None
        key = (r0, rows)
        if key not in self._views:
            if self.layout.dim != 0:
                raise ValueError("a row view of a weight with column blocks")
            per_module: dict[int, list[tuple[int, int]]] = {}
            for s, n, m in zip(self.layout.starts, self.layout.sizes, self.layout.owners):
                lo, hi = max(s, r0), min(s + n, r0 + rows)
                if lo < hi:
                    per_module.setdefault(m, []).append((lo - r0, hi - lo))
            order = sorted(per_module)
            sub = sparse_layout(rows, self.in_features, [per_module[m] for m in order], None)
            self._views[key] = (sub, torch.tensor(order, dtype=torch.long))
        return self._views[key]

    def _call(self, x, weight, bias, r0: int):
        self._routed += 1
        layout, idx = self._view(r0, weight.shape[0])
        active = self._active if idx is None else self._active[idx]
        detach, weight_grad = self._override or (self.frozen_backward == "detach", True)
        # in_proj_bias entries follow their rows unless the layout says the bias is shared (column blocks)
        return sparse_update_linear(x, weight, bias, active=active, layout=layout,
                                    frozen_backward="detach" if detach else "dw",
                                    shared_bias=self.shared_bias, weight_grad=weight_grad)

    def __repr__(self) -> str:
        return f"SparseUpdateMHAWeight({tuple(self.weight.shape)}, {self._state_repr()})"


def _holders_of(module) -> list["SparseUpdateMHAWeight"]:
    """The live states of this attention module's weights (a short list: no scan of every registered weight)."""
    refs = _MHA_BY_MODULE.get(id(module), ())
    return [h for h in (r() for r in refs) if h is not None and h.attention is module and h._handles]


def _mha_enter(module, args, kwargs=None):
    module._mk_routed = sum(h._routed for h in _holders_of(module))


def _mha_exit(module, args, output):
    holders = _holders_of(module)
    before = getattr(module, "_mk_routed", None)
    module._mk_routed = None
    if before is None or not holders or not torch.is_grad_enabled():
        return
    if any(h.weight.requires_grad for h in holders) and sum(h._routed for h in holders) == before:
        # The attention ran with gradients but never through the routed F.linear: torch.compile traced it with
        # the original F.linear (or something else replaced it). Training would silently differ from eager.
        raise RuntimeError(
            "mat_kernels: the sparse updates of this nn.MultiheadAttention's weights (SparseUpdateMHAWeight, "
            "installed by MAT) were bypassed: its forward never called the routed F.linear (torch.compile does "
            "this). Run the attention eagerly, or build MAT(..., sparse_backward=False) (frozen heads then compute "
            "their full weight gradient, discarded by the optimizer)")
