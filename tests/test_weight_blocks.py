"""WeightBlocks: the one representation of "which ranges of a weight belong to which module" (issue 10, item 5).

The layer entry points, discovery/capture (group_by_weight), the sparse-update layers and the optimizer all take the
same object, validated once when it is constructed; these tests pin that down and the errors it raises.
"""
import pytest
import torch
from models import TinyLM

import mat_kernels as mk
from mat_kernels.blocks import WeightBlocks
from mat_kernels.ops import sparse_grad as ops


def test_every_user_holds_weight_blocks():
    g = torch.Generator().manual_seed(0)
    x, dy = torch.randn(3, 5, 8, generator=g), torch.randn(3, 5, 12, generator=g)
    res = mk.layer_grams(x, dy, row_blocks=mk.fused_qkv_heads(2, 2), bias=True, backend="torch")
    (wb,) = res.blocks
    assert isinstance(wb, WeightBlocks) and wb.axis == "rows" and wb.bias and wb.modules[1] == ((2, 2), (6, 2), (10, 2))
    model = TinyLM(d=12, heads=3)
    groups = mk.group_by_weight(model, mk.discover_modules(model).specs)
    assert all(isinstance(g, WeightBlocks) for gs in groups.values() for g in gs)
    if ops.extension_available():
        layer = mk.SparseUpdateLinear(8, 12, row_blocks=mk.fused_qkv_heads(2, 2))
        assert isinstance(layer.layout, WeightBlocks) and layer.layout.segments() == wb.segments()


def test_segments_and_entries():
    wb = WeightBlocks("rows", [[(0, 2), (6, 2)], (2, 4)], (8, 3), index=[5, 7])
    assert wb.segments() == ((0, 6, 2), (2, 2, 4), (0, 0, 1))
    assert wb.entries() == [(5, ((0, 2), (6, 2))), (7, ((2, 4),))]
    whole = WeightBlocks.build(4, 3)
    assert whole.axis == "all" and whole.segments() == ((0,), (4,), (0,)) and whole.dim == 0
    cols = WeightBlocks.build(4, 6, col_blocks=3)
    assert cols.dim == 1 and cols.starts == (0, 2, 4) and cols.describe().startswith("column blocks")


@pytest.mark.parametrize("args,kwargs,exc,match", [
    (("diag", [[(0, 1)]]), {}, ValueError, "axis must be"),
    (("rows", []), {}, ValueError, "is empty"),
    (("rows", [[(0, 0)]]), {}, ValueError, "block size must be positive"),
    (("rows", [[(-1, 2)]]), {}, ValueError, "out of bounds"),
    (("rows", [[(6, 3)]], (8, 2)), {}, ValueError, r"range \[6, 9\) is out of bounds for rows of length 8"),
    (("cols", [[(0, 3)]], (8, 2)), {}, ValueError, "out of bounds for cols of length 2"),
    (("rows", [[(0, 4), (2, 4)]]), {}, ValueError, "ranges overlap at 2"),
    (("rows", [[()]]), {}, TypeError, r"\(start, size\) pair"),
    (("rows", [[]]), {}, ValueError, "needs at least one"),
    (("all", [[(0, 1)]]), {}, ValueError, "takes no ranges"),
    (("cols", [[(0, 1)]]), {"bias": True}, ValueError, "not defined for column blocks"),
    (("rows", [[(0, 1)], [(1, 1)]]), {"index": [0, 0]}, ValueError, "one distinct module index"),
    (("rows", [[(0, 1)]]), {"index": [-1]}, ValueError, "one distinct module index"),
    (("rows", [[(0, 1)]], (0, 3)), {}, ValueError, "shape must be"),
])
def test_invalid_blocks_are_refused_naming_them(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        WeightBlocks(*args, **kwargs, name="my_blocks")
    with pytest.raises(exc, match="my_blocks"):
        WeightBlocks(*args, **kwargs, name="my_blocks")


def test_overlapping_modules_are_fine_for_grams_but_not_for_a_sparse_layout():
    wb = WeightBlocks("rows", [[(0, 4)], [(2, 4)]], (8, 3))  # two modules sharing rows 2-3: Grams just add
    with pytest.raises(ValueError, match="ranges must be disjoint"):
        wb.check_disjoint()
    if ops.extension_available():
        with pytest.raises(ValueError, match="ranges must be disjoint"):
            mk.sparse_update_linear(torch.randn(2, 3), torch.randn(8, 3), active=torch.ones(2, dtype=torch.bool),
                                    layout=wb)
        with pytest.raises(ValueError, match="ranges must be disjoint"):
            mk.SparseUpdateLinear(3, 8, row_blocks=[[(0, 4)], [(2, 4)]])


def test_bias_view():
    wb = WeightBlocks("rows", [[(0, 2)], [(2, 2)]], (4, 3), index=[3, 1], weight="w", bias_name="b")
    bb = wb.for_bias()
    assert bb.shape == (4, 1) and bb.index == (3, 1) and bb.weight == "b" and not bb.bias
    with pytest.raises(ValueError, match="own no bias"):
        WeightBlocks("cols", [[(0, 1)]]).for_bias()


def test_model_specs_are_validated_by_the_same_type():
    model = TinyLM(d=12, heads=3)
    bad = [mk.ModuleSpec("x", (mk.ParamSlice("blocks.0.qkv.weight", "rows", ((0, 4), (2, 4))),))]
    with pytest.raises(ValueError, match=r"module 'x' \(blocks.0.qkv.weight\)\[0\]: ranges overlap"):
        mk.group_by_weight(model, bad)
    flat = [mk.ModuleSpec("x", (mk.ParamSlice("blocks.0.qkv.weight", "rows", (0, 4)),))]
    with pytest.raises(TypeError, match="sequence of \\(start, size\\) pairs"):
        mk.group_by_weight(model, flat)
