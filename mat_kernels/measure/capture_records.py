"""What the capture records per weight and per call, and how a record becomes the samples-first ``(x, dy)`` pairs a
Gram is built from (linear layers, sequence-first and ``nn.MultiheadAttention`` layouts, unfolded ``Conv2d``
patches). Used by :class:`mat_kernels.measure.capture.LambdaCapture`."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["Site", "Record", "ranges_in_call", "conv_padding", "samples_first", "conv_parts", "stack_samples",
           "GEMM_DTYPES"]

# dtypes an autocast GEMM may run in (the Gram kernels take them; fp32 accumulation)
GEMM_DTYPES = (torch.bfloat16, torch.float16)


@dataclass(eq=False)
class Site:
    """One captured weight: where its layer is, which module slices it holds, how its calls were seen."""

    weight: str
    kind: str  # "linear" | "conv1d" | "conv2d" | "mha"
    owner: nn.Module
    scope: nn.Module  # module whose forward the hooks wrap
    param: torch.Tensor
    d_out: int
    d_in: int
    groups: list = field(default_factory=list)  # [(axis, bias, [(module_index, ranges)])]
    sample_dim: int = 0  # 0: [n, ...] inputs; 1: sequence-first [T, n, ...]
    calls: int = 0
    no_grad_calls: int = 0


@dataclass(eq=False)  # identity: records hold tensors, and list.remove must never compare those
class Record:
    """One call of a captured layer: its input, the rows it covered, and (once the backward reached it) dy."""

    site: Site
    x: torch.Tensor
    r0: int
    rows: int
    has_bias: bool
    backward_phase: bool
    dy: torch.Tensor | None = None
    micro: int = 0  # which micro-batch of the step (gradient accumulation) made the call
    dtype: torch.dtype | None = None  # the dtype autocast ran the GEMM in, when x was stored in another one

    def gemm_input(self) -> torch.Tensor:
        """The input the layer's GEMM multiplied: under autocast the stored ``x`` cast as autocast casts it (a
        deterministic rounding, so casting here, when the Gram is built, holds no second copy through the step)."""
        return self.x if self.dtype is None else self.x.to(self.dtype)


def ranges_in_call(ranges, axis: str, r0: int, rows: int, d_out: int):
    """Module ranges (in full-weight coordinates) restricted to the rows ``[r0, r0 + rows)`` one call covers."""
    if axis != "rows":
        return list(ranges)
    out = []
    for start, size in ranges:
        lo, hi = max(start, r0), min(start + size, r0 + rows)
        if lo < hi:
            out.append((lo - r0, hi - lo))
    return out


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


def samples_first(site: Site, rec: Record, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear record's ``(x, dy)`` as ``[n, tokens, width]`` (sequence-first and MHA layouts handled)."""
    x, dy = rec.gemm_input(), rec.dy
    d_in = x.shape[-1]
    if site.kind == "mha":  # [T, n, E] or [T·n, E]
        if x.numel() % (n * d_in) or (x.dim() == 3 and x.shape[1] != n):
            raise ValueError(f"{site.weight}: input of shape {tuple(x.shape)} does not hold n={n} samples "
                             "sequence-first")
        return (x.reshape(-1, n, d_in).transpose(0, 1), dy.reshape(-1, n, dy.shape[-1]).transpose(0, 1))
    if site.sample_dim == 1:
        if x.dim() < 3 or x.shape[1] != n:
            raise ValueError(f"{site.weight}: sequence-first input of shape {tuple(x.shape)} does not hold n={n} "
                             "samples in dimension 1")
        return x.transpose(0, 1).reshape(n, -1, d_in), dy.transpose(0, 1).reshape(n, -1, dy.shape[-1])
    if x.shape[0] != n:
        hint = " (sequence-first tensors? pass sample_dim=1)" if x.dim() >= 3 and x.shape[1] == n else ""
        raise ValueError(
            f"{site.weight}: the layer input has leading dimension {x.shape[0]}, not the n={n} samples{hint}. If "
            "the sample axis is lost (e.g. tokens gathered across samples, as in token-routed MoE experts), "
            "per-sample gradients cannot be formed from this layer's tensors"
        )
    return x.reshape(n, -1, d_in), dy.reshape(n, -1, dy.shape[-1])


def stack_samples(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, dy)`` pairs of several micro-batches (``[n_k, T_k, ·]``) as one ``[Σ n_k, max T_k, ·]`` pair. Shorter
    micro-batches are padded with zero tokens, which add nothing to a per-sample gradient Σ_t δ_t x_tᵀ (nor to a
    bias column Σ_t δ_t)."""
    if len(parts) == 1:
        return parts[0]
    T = max(x.shape[1] for x, _ in parts)
    pad = [(F.pad(x, (0, 0, 0, T - x.shape[1])), F.pad(d, (0, 0, 0, T - d.shape[1]))) for x, d in parts]
    return torch.cat([x for x, _ in pad]), torch.cat([d for _, d in pad])


def conv_parts(site: Site, rec: Record, n: int):
    """Per group of the convolution: (patches [n, L, C_g·kh·kw], dy [n, L, O_g], output-channel offset)."""
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
