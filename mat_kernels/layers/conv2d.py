"""Layer type ``conv2d``: ``nn.Conv2d``, a linear map ``[O, C/groups·kh·kw]`` on unfolded input patches, one map
per group; every ``nn.Conv2d`` is one MAT module (weight and bias) of kind ``"conv"``; any stride, dilation, groups,
padding (``"same"``/``"valid"`` included) and padding mode. No sparse-update twin: a frozen convolution is gated by
``requires_grad`` (it computes no weight gradient)."""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from mat_kernels.layers.base import LayerType, register_layer_type

__all__ = ["Conv2dType", "conv_padding"]


def conv_padding(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    """The input padding a ``Conv2d`` applies, as ``F.pad``'s ``(left, right, top, bottom)``: integer padding, or
    ``"valid"`` (none) and ``"same"`` (``dilation·(k-1)`` in all, the odd one on the right/bottom, as PyTorch
    does)."""
    if conv.padding == "valid":
        return (0, 0, 0, 0)
    if conv.padding == "same":
        out = []
        for d, k in zip(reversed(conv.dilation), reversed(conv.kernel_size)):
            total = d * (k - 1)
            out += [total // 2, total - total // 2]
        return tuple(out)
    ph, pw = conv.padding
    return (pw, pw, ph, ph)


class Conv2dType(LayerType):
    name = "conv2d"
    priority = 30
    own_module = True
    module_kind = "conv"

    def matches(self, owner, attr, parent):
        return attr == "weight" and isinstance(owner, nn.Conv2d)

    def samples_in(self, site, x):
        return x.shape[0]

    def samples(self, site, rec, n):
        """Per group: (patches ``[n, L, C_g·kh·kw]``, dy ``[n, L, O_g]``, the group's first output channel)."""
        conv = site.owner
        x, dy = rec.gemm_input(), rec.dy
        if x.dim() != 4 or x.shape[0] != n:
            raise ValueError(f"{site.weight}: Conv2d input must be [n, C, H, W] with n={n}, got {tuple(x.shape)}")
        G = conv.groups
        cg, og = x.shape[1] // G, dy.shape[1] // G
        parts = []
        left, right, top, bottom = conv_padding(conv)
        if conv.padding_mode == "zeros" and left == right and top == bottom:
            unfold_pad = (top, left)  # unfold pads symmetrically with zeros itself: no copy of x
        else:  # asymmetric ("same" with an even kernel) or reflect/replicate/circular: pad explicitly, as the conv does
            x = F.pad(x, (left, right, top, bottom),
                      mode="constant" if conv.padding_mode == "zeros" else conv.padding_mode)
            unfold_pad = 0
        for g in range(G):
            pt = F.unfold(x[:, g * cg:(g + 1) * cg], conv.kernel_size, conv.dilation, unfold_pad, conv.stride)
            d = dy[:, g * og:(g + 1) * og].reshape(n, og, -1)
            parts.append((pt.transpose(1, 2), d.transpose(1, 2), g * og))
        return parts


register_layer_type(Conv2dType(), builtin=True)
