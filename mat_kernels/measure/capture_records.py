"""What the capture records per weight and per call (how a record becomes samples-first ``(x, dy)`` pairs is its
layer type's: :mod:`mat_kernels.layers`). Used by :class:`mat_kernels.measure.capture.LambdaCapture`."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from mat_kernels.layers import LayerType
from mat_kernels.measure.layer import GramOptions, GramResult, layer_grams

__all__ = ["Site", "Record", "ranges_in_call", "stack_samples", "gemm_dtype", "site_grams", "GEMM_DTYPES"]

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


def gemm_dtype(site: Site, x: torch.Tensor, out: torch.Tensor) -> torch.dtype | None:
    """The dtype the layer's GEMM ran in when it differs from the stored input's (autocast), else None."""
    if x.dtype == out.dtype:
        return None
    if out.dtype not in GEMM_DTYPES or x.dtype not in (torch.float32, *GEMM_DTYPES):
        raise TypeError(
            f"{site.weight}: the layer's input is {x.dtype} and its output {out.dtype}; under autocast the Grams "
            f"are built from what the GEMM multiplied, which must be bfloat16 or float16 (autocast dtype "
            f"{out.dtype} is not supported)")
    return out.dtype


def site_grams(site: Site, micro_groups: list[list[Record]], n: int,
               options: GramOptions) -> list[tuple[list[int], GramResult]]:
    """Grams of one weight from its calls: ``[(module indices, their Grams)]``. The calls of one micro-batch are one
    per-sample gradient (their tokens concatenated; the layer type puts samples first, one part per linear map:
    a grouped convolution has one per group); micro-batches add samples (``n`` per micro-batch)."""
    rec0 = micro_groups[0][0]
    per_micro, offsets = [], None
    for group in micro_groups:
        per_rec = [site.layer.samples(site, r, n) for r in group]
        offsets = [off for _, _, off in per_rec[0]]
        per_micro.append([(torch.cat([p[k][0] for p in per_rec], 1), torch.cat([p[k][1] for p in per_rec], 1))
                          if len(per_rec) > 1 else per_rec[0][k][:2] for k in range(len(offsets))])
    chunks = [(*stack_samples([m[k] for m in per_micro]), off) for k, off in enumerate(offsets)]
    out = []
    for axis, bias, entries in site.groups:
        if bias and not rec0.has_bias:
            raise ValueError(f"{site.weight}: a module owns bias entries but the layer was called without bias")
        for x3, dy3, off in chunks:
            mods, blocks = [], []
            for m, ranges in entries:
                r = ranges_in_call(ranges, axis, rec0.r0 + off, dy3.shape[-1], site.d_out)
                if r:
                    mods.append(m)
                    blocks.append(r)
            if not mods:
                continue
            kw = {"row_blocks": blocks} if axis == "rows" else {"col_blocks": blocks}
            try:
                out.append((mods, layer_grams(x3, dy3, bias=bias and axis == "rows", **kw, options=options)))
            except ValueError as e:
                raise ValueError(f"{site.weight}: {e}") from e
    return out
