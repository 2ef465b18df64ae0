"""What the capture records per weight and per call (how a record becomes samples-first ``(x, dy)`` pairs is its
layer type's: :mod:`mat_kernels.layers`). Used by :class:`mat_kernels.measure.capture.LambdaCapture`."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from mat_kernels.layers import LayerType

__all__ = ["Site", "Record", "ranges_in_call", "stack_samples", "GEMM_DTYPES"]

# dtypes an autocast GEMM may run in (the Gram kernels take them; fp32 accumulation)
GEMM_DTYPES = (torch.bfloat16, torch.float16)


@dataclass(eq=False)
class Site:
    """One captured weight: where its layer is, which module slices it holds, how its calls were seen."""

    weight: str
    layer: LayerType  # what kind of layer holds the weight (how its calls are seen, how samples come first)
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


def stack_samples(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, dy)`` pairs of several micro-batches (``[n_k, T_k, ·]``) as one ``[Σ n_k, max T_k, ·]`` pair. Shorter
    micro-batches are padded with zero tokens, which add nothing to a per-sample gradient Σ_t δ_t x_tᵀ (nor to a
    bias column Σ_t δ_t)."""
    if len(parts) == 1:
        return parts[0]
    T = max(x.shape[1] for x, _ in parts)
    pad = [(F.pad(x, (0, 0, 0, T - x.shape[1])), F.pad(d, (0, 0, 0, T - d.shape[1]))) for x, d in parts]
    return torch.cat([x for x, _ in pad]), torch.cat([d for _, d in pad])
