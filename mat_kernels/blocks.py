"""Describing the modules of one linear layer as blocks of its weight.

A linear layer ``y = W x + b`` with ``W: [d_out, d_in]`` holds parameters of several MAT *modules*: an attention
head owns some rows of a Q/K/V (or fused QKV) weight, and some columns of the output projection; an FFN block owns
whole weights. Here a module of one layer is a tuple of contiguous ranges ``(start, size)`` along one axis of W:

* ``axis="rows"``: the ranges select output features (rows of W), and with ``bias=True`` the matching bias entries;
* ``axis="cols"``: the ranges select input features (columns of W); the bias is shared by all columns and so
  belongs to no column block.

The kernels work on *segments*, the flat list of every range of every module; a module's Gram is the sum of its
segments' Grams (Grams of disjoint parameter slices add).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

Range = tuple[int, int]
BlockSpec = Union[int, Sequence[Union[Range, Sequence[Range]]], None]

__all__ = ["LayerBlocks", "resolve_blocks", "fused_qkv_heads"]


@dataclass(frozen=True)
class LayerBlocks:
    """The modules of one layer along one axis of its weight.

    Attributes:
        axis: ``"rows"`` (output features) or ``"cols"`` (input features).
        modules: one tuple of ``(start, size)`` ranges per module, in the order results are returned.
        bias: whether each row module includes the bias entries of its rows.
    """

    axis: str
    modules: tuple[tuple[Range, ...], ...]
    bias: bool = False

    @property
    def num_modules(self) -> int:
        return len(self.modules)

    def segments(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """Flatten to kernel segments: ``(starts, sizes, module_index)``."""
        starts, sizes, owner = [], [], []
        for m, ranges in enumerate(self.modules):
            for start, size in ranges:
                starts.append(start)
                sizes.append(size)
                owner.append(m)
        return tuple(starts), tuple(sizes), tuple(owner)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_range(v) -> bool:
    return isinstance(v, (tuple, list)) and len(v) == 2 and all(_is_int(e) for e in v)


def resolve_blocks(spec: BlockSpec, dim: int, *, axis: str, name: str, bias: bool = False) -> LayerBlocks:
    """Turn a user block spec into :class:`LayerBlocks`, validating every range against ``dim``.

    Args:
        spec: ``int h`` (h equal blocks, ``dim % h == 0``); a sequence whose items are either one ``(start, size)``
            range (a module of one range) or a sequence of ranges (one module made of several ranges, e.g. head h's
            Q, K and V rows inside a fused QKV weight).
        dim: the length of the axis (``d_out`` for rows, ``d_in`` for columns).
        axis: ``"rows"`` or ``"cols"``.
        name: the argument name used in error messages.
        bias: include the bias (rows only).

    Raises:
        TypeError: spec is not an int or a sequence of ranges.
        ValueError: a count that does not divide ``dim``, an empty spec, a range out of ``[0, dim)``, a non-positive
            size, or overlapping ranges inside one module (they would be counted twice).
    """
    if axis not in ("rows", "cols"):
        raise ValueError(f"axis must be 'rows' or 'cols', got {axis!r}")
    if _is_int(spec):
        if spec <= 0 or dim % spec != 0:
            raise ValueError(f"{name}={spec} must be a positive number of equal blocks dividing {dim}")
        size = dim // spec
        modules = tuple(((k * size, size),) for k in range(spec))
    elif isinstance(spec, (tuple, list)):
        if len(spec) == 0:
            raise ValueError(f"{name} is empty: give at least one block")
        mods = []
        for k, item in enumerate(spec):
            if _is_range(item):
                ranges = (tuple(item),)
            elif isinstance(item, (tuple, list)) and len(item) > 0 and all(_is_range(r) for r in item):
                ranges = tuple(tuple(r) for r in item)
            else:
                raise TypeError(
                    f"{name}[{k}] must be a (start, size) pair of ints or a non-empty sequence of such pairs, "
                    f"got {item!r}"
                )
            for start, size in ranges:
                if size <= 0:
                    raise ValueError(f"{name}[{k}]: block size must be positive, got {size}")
                if start < 0 or start + size > dim:
                    raise ValueError(
                        f"{name}[{k}]: range [{start}, {start + size}) is out of bounds for {axis} of length {dim}"
                    )
            ordered = sorted(ranges)
            for (s0, n0), (s1, _) in zip(ordered, ordered[1:]):
                if s1 < s0 + n0:
                    raise ValueError(f"{name}[{k}]: ranges overlap at {s1} (a parameter would be counted twice)")
            mods.append(ranges)
        modules = tuple(mods)
    else:
        raise TypeError(f"{name} must be an int or a sequence of (start, size) ranges, got {type(spec).__name__}")
    if bias and axis == "cols":
        raise ValueError(
            "bias=True is not defined for column blocks: the bias is shared by every input column. "
            "Measure the bias with row blocks (or the whole weight) instead."
        )
    return LayerBlocks(axis=axis, modules=modules, bias=bias)


def fused_qkv_heads(num_heads: int, head_dim: int, *, num_projections: int = 3) -> list[list[Range]]:
    """Row ranges of each head inside a fused ``[Q; K; V]`` weight of shape ``[3 * num_heads * head_dim, d_in]``.

    Head ``h`` owns rows ``p * H * hd + h * hd ... + hd`` for each projection ``p``; the result can be passed as
    ``row_blocks`` to :func:`mat_kernels.estimate_lambda_max`.
    """
    if not (_is_int(num_heads) and _is_int(head_dim) and _is_int(num_projections)):
        raise TypeError("num_heads, head_dim and num_projections must be ints")
    if num_heads <= 0 or head_dim <= 0 or num_projections <= 0:
        raise ValueError("num_heads, head_dim and num_projections must be positive")
    width = num_heads * head_dim
    return [[(p * width + h * head_dim, head_dim) for p in range(num_projections)] for h in range(num_heads)]
