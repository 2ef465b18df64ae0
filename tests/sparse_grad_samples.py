"""``sample_inputs(device)`` of the op family ``mat_kernels::sparse_{weight,bias,input}_grad`` (+ the accumulate
forms): one list that feeds their correctness (float64 oracle), gradient (gradcheck) and ``opcheck`` tests in
tests/test_sparse_grad.py, the way ``pytorch/extension-cpp`` does.

Each sample writes its layout out by hand (ranges per module; the op's starts/sizes/owners derived from those lists
here, not by the package's layout code) with odd sizes, gaps (indices in no module, frozen), modules of several
ranges, row and column axes, 2-D and 3-D inputs, and a mask with at least one active and one frozen module.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import mat_kernels as mk

# name -> (axis 0 rows / 1 cols, modules = list of lists of (start, size), d_out, d_in)
LAYOUTS = {
    "rows_equal": (0, [[(3 * h, 3)] for h in range(5)], 15, 19),
    "rows_fused_qkv": (0, mk.fused_qkv_heads(4, 5), 60, 23),
    "rows_uneven_gap": (0, [[(0, 7)], [(7, 11)], [(20, 9)], [(29, 8)]], 37, 23),  # rows 18, 19: in no module
    "rows_multi_range": (0, [[(0, 4), (30, 3)], [(4, 10)], [(14, 16)]], 37, 23),  # rows 33..36: in no module
    "cols_uneven_gap": (1, [[(0, 5)], [(5, 3)], [(10, 6)], [(16, 7)]], 37, 23),  # cols 8, 9: in no module
    "cols_fused_qkv": (1, mk.fused_qkv_heads(4, 5), 37, 60),
    "whole_pair": (0, [[(0, 9)], [(9, 4)]], 13, 19),
}


@dataclass
class SparseGradSample:
    """Inputs of the sparse-grad ops for one layout, and the 0/1 float64 mask of W's active entries."""

    name: str
    x: torch.Tensor  # [*lead, d_in]
    w: torch.Tensor  # [d_out, d_in]
    b: torch.Tensor  # [d_out]
    dy: torch.Tensor  # [*lead, d_out]
    active: torch.Tensor  # bool [M], on the CPU
    starts: list[int]
    sizes: list[int]
    owners: list[int]
    axis: int
    mask: torch.Tensor  # float64 [d_out, d_in]

    def weight_args(self):
        return self.dy, self.x, self.active, self.starts, self.sizes, self.owners, self.axis

    def bias_args(self):
        return self.dy, self.active, self.starts, self.sizes, self.owners

    def input_args(self):
        return self.dy, self.w, self.active, self.starts, self.sizes, self.owners, self.axis


def segments(modules) -> tuple[list[int], list[int], list[int]]:
    """The ops' (starts, sizes, owners) from modules written out as lists of (start, size) ranges."""
    starts, sizes, owners = [], [], []
    for m, ranges in enumerate(modules):
        for start, size in ranges:
            starts.append(start)
            sizes.append(size)
            owners.append(m)
    return starts, sizes, owners


def sample_inputs(device, dtype=torch.float32, *, tokens: int = 5) -> list[SparseGradSample]:
    """Every layout in 2-D (``[tokens, d]``) and 3-D (``[2, tokens, d]``) form, fresh seeded random values."""
    out = []
    for k, (name, (axis, modules, d_out, d_in)) in enumerate(LAYOUTS.items()):
        starts, sizes, owners = segments(modules)
        for three_d in (False, True):
            g = torch.Generator().manual_seed(100 + 2 * k + three_d)
            lead = (2, tokens) if three_d else (tokens,)
            active = torch.rand(len(modules), generator=g) < 0.5
            active[k % len(modules)] = True  # at least one active and one frozen module
            active[(k + 1) % len(modules)] = False
            mask = torch.zeros(d_out, d_in, dtype=torch.float64)
            for m, ranges in enumerate(modules):
                for start, size in ranges:
                    if active[m]:
                        if axis == 0:
                            mask[start:start + size] = 1
                        else:
                            mask[:, start:start + size] = 1
            x, dy = torch.randn(*lead, d_in, generator=g), torch.randn(*lead, d_out, generator=g)
            w, b = torch.randn(d_out, d_in, generator=g) / d_in ** 0.5, torch.randn(d_out, generator=g)
            to = dict(device=device, dtype=dtype)
            out.append(SparseGradSample(f"{name}-{'3d' if three_d else '2d'}", x.to(**to), w.to(**to), b.to(**to),
                                        dy.to(**to), active, starts, sizes, owners, axis, mask))
    return out


def strided_variants(t: torch.Tensor):
    """(name, the same values as t in another memory layout): contiguous, column-major, a strided slice and, for
    3-D, token-major (batch and token dims not mergeable into one view: the ops must reshape with a copy)."""
    yield "contiguous", t
    yield "column_major", t.transpose(-1, -2).contiguous().transpose(-1, -2)
    big = torch.zeros(*t.shape[:-1], 2 * t.shape[-1] + 1, dtype=t.dtype, device=t.device)
    big[..., 1::2] = t
    yield "strided_slice", big[..., 1::2]
    if t.dim() == 3:
        yield "token_major_3d", t.transpose(0, 1).contiguous().transpose(0, 1)
