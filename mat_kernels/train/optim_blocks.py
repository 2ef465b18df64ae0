"""How :class:`mat_kernels.train.optim.FrozenSliceOptimizer` sees a parameter: the module blocks of its linear
view (from :class:`mat_kernels.WeightBlocks`), the runs of entries with one owner along the blocked axis, and the
merging of neighbouring runs with equal step counts into the segments a step updates."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import torch

from mat_kernels.blocks import WeightBlocks

__all__ = ["Block", "BlocksArg", "blocks_of", "linear_view", "mask_key", "Runs", "WHOLE", "owner_runs",
           "merge_runs", "is_full"]


@dataclass(frozen=True)
class Block:
    """Entries ``[start, start + size)`` along ``axis`` (0 rows, 1 columns; ``size = None``: the whole tensor) of a
    parameter's linear view, owned by module ``module``: the optimizer's internal unit, one per range of a
    :class:`mat_kernels.WeightBlocks`."""

    module: int
    axis: int = 0
    start: int = 0
    size: int | None = None


BlocksArg = Union[WeightBlocks, Sequence[WeightBlocks]]


def blocks_of(p: torch.Tensor, given: BlocksArg, transposed: bool) -> list[Block]:
    """The internal blocks of parameter ``p`` from its WeightBlocks (checked against its linear view)."""
    items = [given] if isinstance(given, WeightBlocks) else list(given)
    if not items or not all(isinstance(b, WeightBlocks) for b in items):
        raise TypeError(f"blocks of each parameter must be WeightBlocks or a list of them, got {given!r}")
    shape = tuple(linear_view(p, transposed).shape)
    out = []
    for wb in items:
        if wb.shape is not None and any(s is not None and s != t for s, t in zip(wb.shape, shape)):
            raise ValueError(f"blocks {wb.name}: built for shape {wb.shape}, but the parameter's linear view is "
                             f"{shape}")
        if wb.shape is None or None in wb.shape:
            wb = WeightBlocks(wb.axis, wb.modules, shape, index=wb.index, name=wb.name)  # bounds checked here
        for m, ranges in zip(wb.index, wb.modules):
            if wb.axis == "all":
                out.append(Block(m))
            out += [Block(m, wb.dim, start, size) for start, size in ranges]
    return out


def linear_view(t: torch.Tensor, transposed: bool) -> torch.Tensor:
    """2-D linear-map view ``[d_out, d_in]`` of a parameter-shaped tensor (1-D: ``[d, 1]``)."""
    if t.dim() == 1:
        return t.unsqueeze(1)
    if transposed:
        return t.t()
    return t if t.dim() == 2 else t.view(t.shape[0], -1)


def mask_key(active, num_modules: int) -> tuple:
    """The activity mask as a tuple of bools, read on the host (``tolist`` dispatches no aten op)."""
    if isinstance(active, torch.Tensor):
        if active.dtype != torch.bool:
            raise TypeError(f"active must be a bool tensor, got {active.dtype}")
        shape, values = tuple(active.shape), active.tolist()
    else:
        values = [bool(a) for a in active]
        shape = (len(values),)
    if shape != (num_modules,):
        raise ValueError(f"active must have shape [{num_modules}], got {list(shape)}")
    return tuple(values)


@dataclass(frozen=True)
class Runs:
    """A parameter's entries along its blocked axis as consecutive runs ``(size, module)`` (module -1: owned by no
    module, always trained), and how to cut the stored tensor (and its gradient, its state) along that axis."""

    runs: tuple
    dim: int  # dimension of the stored tensor that the blocked axis is
    flat: bool  # >2-D weight (convolution) cut along its flattened columns

    def splitter(self, sizes: list[int]):
        dim, flat = self.dim, self.flat

        def split(t: torch.Tensor):  # one aten op (two for a flattened >2-D weight): views, no copies
            return (t.flatten(1) if flat else t).split_with_sizes(sizes, dim)
        return split


WHOLE = Runs(((1, -1),), 0, False)  # a parameter no module owns: one run, always trained


def owner_runs(p: torch.Tensor, parts: list[Block], transposed: bool) -> Runs:
    if any(b.size is None for b in parts):
        if len({b.module for b in parts}) != 1:
            raise ValueError("a parameter owned whole by a module cannot belong to another module too")
        return Runs(((1, parts[0].module),), 0, False)
    axes = {b.axis for b in parts}
    if len(axes) != 1:
        raise ValueError("blocks of one parameter must all be rows or all be columns of its linear view")
    (axis,) = axes
    owner = [-1] * linear_view(p, transposed).shape[axis]
    for b in parts:
        for i in range(b.start, b.start + b.size):
            if owner[i] != -1:
                raise ValueError(f"entry {i} of a parameter belongs to two modules' blocks")
            owner[i] = b.module
    runs = []
    for m in owner:
        if runs and runs[-1][1] == m:
            runs[-1][0] += 1
        else:
            runs.append([1, m])
    if p.dim() == 1:
        dim, flat = 0, False
    elif transposed:
        dim, flat = 1 - axis, False
    else:
        dim, flat = axis, p.dim() > 2 and axis == 1
    return Runs(tuple((n, m) for n, m in runs), dim, flat)


def merge_runs(runs: Runs, keys: list) -> tuple[list[int], list]:
    """Sizes and keys of the segments: a key is a run's step count (active) or None (frozen); neighbouring runs with
    equal keys merge (an all-active tensor whose blocks took equal steps is one segment)."""
    sizes, out = [], []
    for (n, _), k in zip(runs.runs, keys):
        if out and out[-1] == k:
            sizes[-1] += n
        else:
            sizes.append(n)
            out.append(k)
    return sizes, out


def is_full(t, p) -> bool:
    return isinstance(t, torch.Tensor) and t.shape == p.shape
