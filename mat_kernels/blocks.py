"""Which entries of a weight belong to which module: :class:`WeightBlocks`, the one representation.

A linear layer ``y = W x + b`` with ``W: [d_out, d_in]`` holds parameters of several MAT *modules*: an attention
head owns some rows of a Q/K/V (or fused QKV) weight, and some columns of the output projection; an FFN block owns
whole weights. A :class:`WeightBlocks` says, for one weight and one axis, which contiguous ranges ``(start, size)``
each module owns:

* ``axis="rows"``: output features (rows of W), and with ``bias=True`` the matching bias entries;
* ``axis="cols"``: input features (columns of W); the bias is shared by all columns and so belongs to no block;
* ``axis="all"``: the whole weight (and its bias with ``bias=True``).

Weights are always seen in their linear-map orientation ``[d_out, d_in]`` (GPT-2's ``Conv1D`` stores the
transpose; a ``Conv2d`` weight ``[O, C, kh, kw]`` is ``[O, C·kh·kw]``). The same object is built by the layer
entry points (:func:`mat_kernels.estimate_lambda_max` from ``row_blocks``/``col_blocks``), by model-level
discovery (:func:`mat_kernels.group_by_weight` from :class:`mat_kernels.ModuleSpec` slices), by the sparse-update
layers (their layout) and given to :class:`mat_kernels.train.optim.FrozenSliceOptimizer`; it is validated once, when it
is constructed.

The kernels work on *segments*, the flat list of every range of every module; a module's Gram is the sum of its
segments' Grams (Grams of disjoint parameter slices add).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence, Union

Range = tuple[int, int]
BlockSpec = Union[int, Sequence[Union[Range, Sequence[Range]]], None]

__all__ = ["WeightBlocks", "resolve_blocks", "layer_blocks", "fused_qkv_heads"]

_AXES = ("rows", "cols", "all")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_range(v) -> bool:
    return isinstance(v, (tuple, list)) and len(v) == 2 and all(_is_int(e) for e in v)


@dataclass(frozen=True)
class WeightBlocks:
    """The modules of one weight along one axis of its linear map ``[d_out, d_in]``.

    Attributes:
        axis: ``"rows"``, ``"cols"`` or ``"all"``.
        modules: one tuple of ``(start, size)`` ranges per module, in result order (``()`` for ``"all"``). Ranges of
            one module never overlap; ranges of different modules may (a Gram does not mind; a sparse-update layout
            requires them disjoint, :meth:`check_disjoint`).
        shape: ``(d_out, d_in)``; an entry may be None when unknown (a spec resolved against one axis only).
        bias: whether each row (or whole-weight) module owns the bias entries of its rows.
        index: each module's index in the caller's module list (default ``0 .. len(modules) - 1``): the entry of
            an activity mask or of a result that belongs to it.
        weight, bias_name: the parameters' names in ``model.named_parameters()`` when built for a model.
        name: what error messages call it (the argument, or the weight).

    Raises (at construction): ``TypeError``/``ValueError`` naming ``name`` for an unknown axis, no module, a
    malformed or non-positive range, a range out of bounds for a known ``shape``, overlapping ranges inside one
    module, ``bias=True`` with column blocks, or an ``index`` of the wrong length, negative or repeated.
    """

    axis: str
    modules: tuple[tuple[Range, ...], ...]
    shape: tuple[int | None, int | None] | None = None
    bias: bool = False
    index: tuple[int, ...] | None = None
    weight: str | None = None
    bias_name: str | None = None
    name: str = field(default="blocks", repr=False, compare=False)

    def __post_init__(self):
        name, axis = self.name, self.axis
        if axis not in _AXES:
            raise ValueError(f"{name}: axis must be 'rows', 'cols' or 'all', got {axis!r}")
        if not isinstance(self.modules, (tuple, list)) or len(self.modules) == 0:
            raise ValueError(f"{name} is empty: give at least one block")
        shape = None if self.shape is None else tuple(self.shape)
        if shape is not None and (len(shape) != 2 or not all(s is None or (_is_int(s) and s > 0) for s in shape)):
            raise ValueError(f"{name}: shape must be (d_out, d_in) of positive ints, got {self.shape!r}")
        dim = None if shape is None else shape[1 if axis == "cols" else 0]
        modules = []
        for k, item in enumerate(self.modules):
            if _is_range(item):  # a module of one range
                item = (item,)
            if not isinstance(item, (tuple, list)) or not all(_is_range(r) for r in item):
                raise TypeError(f"{name}[{k}] must be a (start, size) pair of ints or a sequence of such pairs, "
                                f"got {item!r}")
            ranges = tuple((int(s), int(n)) for s, n in item)
            if axis == "all":
                if ranges:
                    raise ValueError(f"{name}[{k}]: axis 'all' takes no ranges, got {ranges}")
            elif not ranges:
                raise ValueError(f"{name}[{k}]: axis {axis!r} needs at least one (start, size) range")
            for start, size in ranges:
                if size <= 0:
                    raise ValueError(f"{name}[{k}]: block size must be positive, got {size}")
                if start < 0 or (dim is not None and start + size > dim):
                    raise ValueError(f"{name}[{k}]: range [{start}, {start + size}) is out of bounds for {axis} of "
                                     f"length {dim}")
            ordered = sorted(ranges)
            for (s0, n0), (s1, _) in zip(ordered, ordered[1:]):
                if s1 < s0 + n0:
                    raise ValueError(f"{name}[{k}]: ranges overlap at {s1} (a parameter would be counted twice)")
            modules.append(ranges)
        if self.bias and axis == "cols":
            raise ValueError(
                f"{name}: bias=True is not defined for column blocks: the bias is shared by every input column. "
                "Measure the bias with row blocks (or the whole weight) instead."
            )
        index = tuple(range(len(modules))) if self.index is None else tuple(self.index)
        if len(index) != len(modules) or not all(_is_int(i) and i >= 0 for i in index) or \
                len(set(index)) != len(index):
            raise ValueError(f"{name}: index must hold one distinct module index >= 0 per module, got {self.index!r}")
        set_ = object.__setattr__
        set_(self, "modules", tuple(modules))
        set_(self, "shape", shape)
        set_(self, "index", index)
        set_(self, "bias", bool(self.bias) or self.bias_name is not None)
    # ---------------------------------------------------------------------------------------------- building
    @classmethod
    def build(cls, d_out: int, d_in: int, *, row_blocks: BlockSpec = None, col_blocks: BlockSpec = None,
              bias: bool = False) -> "WeightBlocks":
        """The blocks of a ``[d_out, d_in]`` weight from ``row_blocks`` or ``col_blocks`` (not both; specs as in
        :func:`resolve_blocks`), or the whole weight as one module when neither is given."""
        for arg, v in (("out_features", d_out), ("in_features", d_in)):
            if not _is_int(v) or v <= 0:
                raise ValueError(f"{arg} must be a positive int, got {v!r}")
        if row_blocks is not None and col_blocks is not None:
            raise ValueError("give row_blocks or col_blocks, not both: a layout blocks one axis of the weight")
        if row_blocks is None and col_blocks is None:
            return cls("all", ((),), (d_out, d_in), bias=bias, name="weight")
        if row_blocks is not None:
            return resolve_blocks(row_blocks, d_out, axis="rows", name="row_blocks", bias=bias, shape=(d_out, d_in))
        return resolve_blocks(col_blocks, d_in, axis="cols", name="col_blocks", bias=bias, shape=(d_out, d_in))

    def for_bias(self) -> "WeightBlocks":
        """The same modules on the bias vector (seen as ``[d_out, 1]``): rows keep their ranges, ``"all"`` stays."""
        if not self.bias or self.axis == "cols":
            raise ValueError(f"{self.name}: these blocks own no bias entries")
        return WeightBlocks(self.axis, self.modules, (self.shape[0], 1) if self.shape else None, False, self.index,
                            self.bias_name, None, name=self.bias_name or f"{self.name} (bias)")

    # ---------------------------------------------------------------------------------------------- reading
    def _extent(self, axis: int) -> int:
        if self.shape is None or self.shape[axis] is None:
            raise ValueError(f"{self.name}: the extent of the weight is unknown (built without shape)")
        return self.shape[axis]

    @property
    def num_modules(self) -> int:
        return len(self.modules)

    @property
    def dim(self) -> int:
        """The blocked axis as a tensor dimension of ``[d_out, d_in]``: 1 for columns, else 0."""
        return 1 if self.axis == "cols" else 0

    def segments(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """Flatten to kernel segments ``(starts, sizes, owners)``, owners being positions in :attr:`modules`
        (``"all"``: one segment of every row). Computed once (a layer reads them at every forward)."""
        seg = self.__dict__.get("_seg")
        if seg is None:
            starts, sizes, owners = [], [], []
            for m, ranges in enumerate(self.modules):
                for start, size in ranges or ((0, self._extent(0)),):
                    starts.append(start)
                    sizes.append(size)
                    owners.append(m)
            seg = (tuple(starts), tuple(sizes), tuple(owners))
            object.__setattr__(self, "_seg", seg)
        return seg

    @property
    def starts(self) -> tuple[int, ...]:
        return self.segments()[0]

    @property
    def sizes(self) -> tuple[int, ...]:
        return self.segments()[1]

    @property
    def owners(self) -> tuple[int, ...]:
        return self.segments()[2]

    def entries(self) -> list[tuple[int, tuple[Range, ...]]]:
        """``(module index, ranges)`` per module; a whole weight is all its rows."""
        return [(i, r or ((0, self._extent(0)),)) for i, r in zip(self.index, self.modules)]

    def check_disjoint(self) -> "WeightBlocks":
        """Raise ``ValueError`` if ranges of different modules overlap (a parameter entry in two modules, which a
        sparse-update layout cannot express); return self."""
        if getattr(self, "_disjoint", False):
            return self
        starts, sizes, _ = self.segments()
        order = sorted(range(len(starts)), key=lambda s: starts[s])
        for a, b in zip(order, order[1:]):
            if starts[b] < starts[a] + sizes[a]:
                raise ValueError(f"{self.name}: block ranges overlap at index {starts[b]} (a parameter would belong "
                                 "to two blocks); ranges must be disjoint")
        object.__setattr__(self, "_disjoint", True)  # checked once per object (a layer calls this every forward)
        return self

    def describe(self) -> str:
        kind = {"all": "whole weight", "rows": "row blocks", "cols": "column blocks"}[self.axis]
        return f"{kind}, {self.num_modules} module(s), {len(self.starts)} range(s)"




def resolve_blocks(spec: BlockSpec, dim: int, *, axis: str, name: str, bias: bool = False,
                   shape: tuple[int | None, int | None] | None = None) -> WeightBlocks:
    """Turn a user block spec into :class:`WeightBlocks`, validating every range against ``dim``.

    Args:
        spec: ``int h`` (h equal blocks, ``dim % h == 0``); a sequence whose items are either one ``(start, size)``
            range (a module of one range) or a sequence of ranges (one module made of several ranges, e.g. head h's
            Q, K and V rows inside a fused QKV weight).
        dim: the length of the axis (``d_out`` for rows, ``d_in`` for columns).
        axis: ``"rows"`` or ``"cols"``.
        name: the argument name used in error messages.
        bias: include the bias (rows only).
        shape: ``(d_out, d_in)`` when known (default: ``dim`` along ``axis``, the other unknown).

    Raises:
        TypeError: spec is not an int or a sequence of ranges.
        ValueError: a count that does not divide ``dim``, an empty spec, a range out of ``[0, dim)``, a non-positive
            size, or overlapping ranges inside one module (they would be counted twice).
    """
    if axis not in ("rows", "cols"):
        raise ValueError(f"axis must be 'rows' or 'cols', got {axis!r}")
    if shape is None:
        shape = (dim, None) if axis == "rows" else (None, dim)
    elif shape[0 if axis == "rows" else 1] != dim:
        raise ValueError(f"{name}: dim {dim} disagrees with shape {shape}")
    if _is_int(spec):
        if spec <= 0 or dim % spec != 0:
            raise ValueError(f"{name}={spec} must be a positive number of equal blocks dividing {dim}")
        size = dim // spec
        modules = tuple(((k * size, size),) for k in range(spec))
    elif isinstance(spec, (tuple, list)):
        for k, item in enumerate(spec):  # a module is one range or a non-empty sequence of ranges
            if not (_is_range(item) or (isinstance(item, (tuple, list)) and item and all(map(_is_range, item)))):
                raise TypeError(f"{name}[{k}] must be a (start, size) pair of ints or a non-empty sequence of such "
                                f"pairs, got {item!r}")
        modules = tuple(spec)
    else:
        raise TypeError(f"{name} must be an int or a sequence of (start, size) ranges, got {type(spec).__name__}")
    return WeightBlocks(axis, modules, shape, bias=bias, name=name)


def layer_blocks(row_blocks: BlockSpec, col_blocks: BlockSpec, bias: bool, d_in: int, d_out: int) -> list[WeightBlocks]:
    """The module layouts of one layer from the entry points' arguments: row modules, then column modules; with
    neither, the whole weight (and bias) as one module. ``bias`` with column blocks alone raises with the reason."""
    if row_blocks is None and col_blocks is None:
        return [resolve_blocks(1, d_out, axis="rows", name="weight", bias=bias)]
    layouts = []
    if row_blocks is not None:
        layouts.append(resolve_blocks(row_blocks, d_out, axis="rows", name="row_blocks", bias=bias))
    if col_blocks is not None:
        if bias and row_blocks is None:
            resolve_blocks(col_blocks, d_in, axis="cols", name="col_blocks", bias=True)  # raises with the reason
        layouts.append(resolve_blocks(col_blocks, d_in, axis="cols", name="col_blocks"))
    return layouts


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
