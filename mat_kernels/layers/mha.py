"""Layer type ``mha``: the projection weights of ``nn.MultiheadAttention`` (``in_proj_weight``, ``q/k/v_proj_weight``,
``out_proj.weight``), which ``F.multi_head_attention_forward`` passes straight to ``F.linear`` (whole, or as row
views for cross-attention): no layer to hook or swap. The capture records the ``F.linear`` calls on them while the
attention runs (:mod:`mat_kernels.routing`); the tensors are sequence-first (``[T, n, E]``, ``[T·n, E]`` for
``out_proj``); the sparse-update twin :class:`mat_kernels.SparseUpdateMHAWeight` routes those calls."""
from __future__ import annotations

import torch.nn as nn

from mat_kernels.layers.base import LayerType, register_layer_type
from mat_kernels.nn.sparse_mha import SparseUpdateMHAWeight

__all__ = ["MHAType", "PROJECTIONS"]

PROJECTIONS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


class MHAType(LayerType):
    name = "mha"
    priority = 0
    calls = "linear"

    def matches(self, owner, attr, parent):
        if isinstance(owner, nn.MultiheadAttention):
            return attr in PROJECTIONS
        return isinstance(parent, nn.MultiheadAttention) and owner is parent.out_proj and attr == "weight"

    def scope(self, owner, parent):
        return owner if isinstance(owner, nn.MultiheadAttention) else parent

    def samples_in(self, site, x):
        return x.shape[1]

    def samples(self, site, rec, n):
        x, dy = rec.gemm_input(), rec.dy
        d_in = x.shape[-1]
        if x.numel() % (n * d_in) or (x.dim() == 3 and x.shape[1] != n):
            raise ValueError(f"{site.weight}: input of shape {tuple(x.shape)} does not hold n={n} samples "
                             "sequence-first")
        return [(x.reshape(-1, n, d_in).transpose(0, 1), dy.reshape(-1, n, dy.shape[-1]).transpose(0, 1), 0)]

    swaps_owner = False

    def sparse_twin(self, owner, attr, parent):
        attention = self.scope(owner, parent)
        weight = getattr(owner, attr)
        return lambda **kw: SparseUpdateMHAWeight(attention, weight, **kw)


register_layer_type(MHAType(), builtin=True)
