"""Sparse-update backward: the mat_kernels._C ops, sparse_update_linear and SparseUpdateLinear.

Oracle: dense autograd of ``F.linear`` in float64, with the frozen blocks of dW (and db) zeroed afterwards from the
block specs written out in this file (not from the package's layout code). Tolerances, stated once:

* fp32: norm-wise relative error against the oracle at most ``FP32_RTOL = 1e-6`` (fp32 rounding of short dot
  products is ~1e-7; no TF32 on CPU);
* bf16 / fp16: error against the oracle at most twice that of plain PyTorch autograd in the same dtype;
* frozen blocks: exactly zero, or in accumulate mode bit-for-bit what they were.

Every test runs on CPU and, where CUDA exists, on CUDA (``conftest.devices()``); the mask always stays on the CPU.
"""
import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import COPY_OPS, GEMM_OPS, SMALL_LAYOUT, aten_counts, devices, rel_err, requires_cuda
from sparse_grad_samples import sample_inputs, segments, strided_variants
from torch import nn

import mat_kernels as mk
from mat_kernels.ops import sparse_grad as su
from mat_kernels.testing.tolerances import SPARSE_GRAD_RTOL

FP32_RTOL = SPARSE_GRAD_RTOL[torch.float32]  # mat_kernels/testing/tolerances.py
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPS = torch.ops.mat_kernels


def test_extension_is_built():
    """The C++ part is always buildable (no GPU needed): a missing _C is a build error, not a reason to skip."""
    assert su.extension_available(), (
        f"mat_kernels._C is not built ({su.extension_error()}): run `MAX_JOBS=2 python setup.py build_ext --inplace`"
    )
    assert "cpu" in su._C.BUILT_DEVICES.split(",")


# ---------------------------------------------------------------------------------------------------------------
# Layouts, written out as (axis, modules = list of lists of (start, size), d_out, d_in, spec passed to the API).
# Odd sizes everywhere: 5 tokens, d_in 19, heads of 3.
# ---------------------------------------------------------------------------------------------------------------
_QKV = [[(p * 15 + h * 3, 3) for p in range(3)] for h in range(5)]  # 5 heads of 3 in a fused [Q; K; V] of 45 rows
LAYOUTS = {
    "rows_equal": ("rows", [[(3 * h, 3)] for h in range(5)], 15, 19, dict(row_blocks=5)),
    "rows_fused_qkv": ("rows", _QKV, 45, 19, dict(row_blocks=mk.fused_qkv_heads(5, 3))),
    "rows_partial_uneven": ("rows", [[(0, 4)], [(6, 5)], [(13, 2), (11, 1)]], 17, 19,
                            dict(row_blocks=[(0, 4), (6, 5), [(13, 2), (11, 1)]])),
    "cols_equal": ("cols", [[(3 * h, 3)] for h in range(5)], 11, 15, dict(col_blocks=5)),
    "cols_uneven": ("cols", [[(0, 3)], [(3, 7)], [(10, 2)], [(12, 7)]], 13, 19,
                    dict(col_blocks=[(0, 3), (3, 7), (10, 2), (12, 7)])),
    "whole": ("rows", [[(0, 9)]], 9, 19, {}),
}


def _masks(num_modules: int, seed: int = 0) -> dict[str, list[bool]]:
    g = torch.Generator().manual_seed(seed)
    run = [num_modules // 3 <= m < max(num_modules // 3 + 1, 2 * num_modules // 3) for m in range(num_modules)]
    return {
        "all_on": [True] * num_modules,
        "all_off": [False] * num_modules,
        "alternating": [m % 2 == 0 for m in range(num_modules)],
        "one_run": run,
        "random": (torch.rand(num_modules, generator=g) < 0.5).tolist(),
    }


MASK_NAMES = ["all_on", "all_off", "alternating", "one_run", "random"]


def _expected_masks(layout_name, active):
    """0/1 masks (float64) of dW [d_out, d_in] and db [d_out] from the written-out layout."""
    axis, modules, d_out, d_in, _ = LAYOUTS[layout_name]
    mw = torch.zeros(d_out, d_in, dtype=torch.float64)
    for m, ranges in enumerate(modules):
        if active[m]:
            for start, size in ranges:
                if axis == "rows":
                    mw[start:start + size, :] = 1
                else:
                    mw[:, start:start + size] = 1
    if axis == "rows":
        mb = mw[:, 0].clone()
    else:  # column blocks share the bias: it belongs to no block and always gets its full gradient
        mb = torch.ones(d_out, dtype=torch.float64)
    return mw, mb


def _oracle(x, w, b, dy):
    """Dense float64 autograd gradients (dx, dW, db) of F.linear."""
    x64 = x.detach().double().cpu().requires_grad_(True)
    w64 = w.detach().double().cpu().requires_grad_(True)
    b64 = b.detach().double().cpu().requires_grad_(True) if b is not None else None
    F.linear(x64, w64, b64).backward(dy.detach().double().cpu())
    return x64.grad, w64.grad, (b64.grad if b is not None else None)


def _data(layout_name, *, three_d, device, dtype=torch.float32, seed=0, bias=True):
    _, _, d_out, d_in, _ = LAYOUTS[layout_name]
    g = torch.Generator().manual_seed(seed)
    lead = (2, 5) if three_d else (5,)
    x = torch.randn(*lead, d_in, generator=g)
    dy = torch.randn(*lead, d_out, generator=g)
    w = torch.randn(d_out, d_in, generator=g) / d_in**0.5
    b = torch.randn(d_out, generator=g) if bias else None
    to = dict(device=device, dtype=dtype)
    return x.to(**to), w.to(**to), (b.to(**to) if bias else None), dy.to(**to)


def _run_functional(x, w, b, dy, active, spec):
    x = x.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    b = b.clone().requires_grad_(True) if b is not None else None
    y = mk.sparse_update_linear(x, w, b, active=torch.tensor(active), **spec)
    y.backward(dy)
    return x.grad, w.grad, (b.grad if b is not None else None)


# ---------------------------------------------------------------------------------------------------------------
# Gradients against the oracle
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("three_d", [False, True], ids=["2d", "3d"])
@pytest.mark.parametrize("mask_name", MASK_NAMES)
@pytest.mark.parametrize("layout_name", list(LAYOUTS))
def test_functional_matches_dense_autograd_fp32(layout_name, mask_name, three_d, device, gemm_plan):
    spec = LAYOUTS[layout_name][4]
    active = _masks(len(LAYOUTS[layout_name][1]))[mask_name]
    x, w, b, dy = _data(layout_name, three_d=three_d, device=device)
    dx, dw, db = _run_functional(x, w, b, dy, active, spec)
    rdx, rdw, rdb = _oracle(x, w, b, dy)
    mw, mb = _expected_masks(layout_name, active)

    assert rel_err(dx, rdx) <= FP32_RTOL  # dX is always computed in full
    if not any(active):  # wholly frozen weight: no gradient at all, so optimizers skip it
        assert dw is None
        if LAYOUTS[layout_name][0] == "rows":
            assert db is None
        else:  # a shared bias is always trained
            assert rel_err(db, rdb) <= FP32_RTOL
        return
    assert dw.dtype == torch.float32 and dw.shape == w.shape
    assert rel_err(dw, rdw * mw) <= FP32_RTOL
    assert torch.all(dw.cpu()[mw == 0] == 0), "frozen blocks must be exactly zero"
    assert rel_err(db, rdb * mb) <= FP32_RTOL
    assert torch.all(db.cpu()[mb == 0] == 0)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout_name", ["rows_fused_qkv", "cols_uneven"])
def test_low_precision_within_twice_pytorch_error(layout_name, dtype, device):
    spec = LAYOUTS[layout_name][4]
    active = _masks(len(LAYOUTS[layout_name][1]), seed=3)["random"]
    active[0] = True
    x, w, b, dy = _data(layout_name, three_d=True, device=device, dtype=dtype, seed=4)
    dx, dw, db = _run_functional(x, w, b, dy, active, spec)
    rdx, rdw, rdb = _oracle(x, w, b, dy)
    mw, mb = _expected_masks(layout_name, active)
    # plain PyTorch in the same dtype, same inputs
    xt, wt, bt = (t.clone().requires_grad_(True) for t in (x, w, b))
    F.linear(xt, wt, bt).backward(dy)
    assert dw.dtype == dtype
    assert rel_err(dx, rdx) <= 2 * rel_err(xt.grad, rdx)
    assert rel_err(dw, rdw * mw) <= 2 * rel_err(wt.grad.double().cpu() * mw, rdw * mw)
    assert rel_err(db, rdb * mb) <= 2 * rel_err(bt.grad.double().cpu() * mb, rdb * mb)
    assert torch.all(dw.cpu()[mw == 0] == 0)


@pytest.mark.parametrize("device", devices())
def test_no_bias_and_other_ranks(device):
    spec = LAYOUTS["rows_fused_qkv"][4]
    active = _masks(5)["alternating"]
    mw, _ = _expected_masks("rows_fused_qkv", active)
    g = torch.Generator().manual_seed(5)
    w = torch.randn(45, 19, generator=g).to(device)
    for lead in [(), (3,), (2, 3, 4)]:  # 1-D input, 2-D, 4-D (leading dims flattened)
        x = torch.randn(*lead, 19, generator=g).to(device)
        dy = torch.randn(*lead, 45, generator=g).to(device)
        dx, dw, db = _run_functional(x, w, None, dy, active, spec)
        rdx, rdw, _ = _oracle(x, w, None, dy)
        assert db is None
        assert rel_err(dx, rdx) <= FP32_RTOL and rel_err(dw, rdw * mw) <= FP32_RTOL


@pytest.mark.parametrize("device", devices())
def test_needs_input_grad_is_respected(device):
    x, w, b, dy = _data("rows_equal", three_d=False, device=device)
    active = torch.tensor([True, False, True, False, True])
    # weight frozen by requires_grad: dX still flows, no weight gradient is produced
    xr = x.clone().requires_grad_(True)
    br = b.clone().requires_grad_(True)
    mk.sparse_update_linear(xr, w, br, active=active, row_blocks=5).backward(dy)
    assert w.grad is None and xr.grad is not None and br.grad is not None
    # input without grad: only parameter gradients
    wr = w.clone().requires_grad_(True)
    mk.sparse_update_linear(x, wr, b, active=active, row_blocks=5).backward(dy)
    _, rdw, _ = _oracle(x, w, b, dy)
    mw, _ = _expected_masks("rows_equal", active.tolist())
    assert rel_err(wr.grad, rdw * mw) <= FP32_RTOL


# ---------------------------------------------------------------------------------------------------------------
# The ops directly: strides, accumulate mode, GEMM counts
# ---------------------------------------------------------------------------------------------------------------
def _layout_args(layout_name):
    axis, modules, *_ = LAYOUTS[layout_name]
    return (*segments(modules), 0 if axis == "rows" else 1)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("layout_name", ["rows_fused_qkv", "cols_uneven"])
@pytest.mark.parametrize("three_d", [False, True], ids=["2d", "3d"])
def test_ops_arbitrary_strides(layout_name, three_d, device, gemm_plan):
    starts, sizes, owners, axis = _layout_args(layout_name)
    active = _masks(len(LAYOUTS[layout_name][1]))["alternating"]
    x, w, b, dy = _data(layout_name, three_d=three_d, device=device, seed=6)
    _, rdw, rdb = _oracle(x, w, b, dy)
    mw, mb = _expected_masks(layout_name, active)
    act = torch.tensor(active)
    for (nx, xv) in strided_variants(x):
        for (ndy, dyv) in strided_variants(dy):
            assert torch.equal(xv, x) and torch.equal(dyv, dy)
            dw = OPS.sparse_weight_grad(dyv, xv, act, starts, sizes, owners, axis)
            assert rel_err(dw, rdw * mw) <= FP32_RTOL, (nx, ndy)
            if axis == 0:
                db = OPS.sparse_bias_grad(dyv, act, starts, sizes, owners)
                assert rel_err(db, rdb * mb) <= FP32_RTOL, ndy


@pytest.mark.parametrize("device", devices())
def test_ops_expanded_stride0_dy(device, gemm_plan):
    """loss.sum().backward() hands over a stride-0 dY; contiguous-only kernels silently got this wrong before."""
    starts, sizes, owners, axis = _layout_args("rows_fused_qkv")
    act = torch.tensor(_masks(5)["random"])
    mw, mb = _expected_masks("rows_fused_qkv", act.tolist())
    x = torch.randn(2, 5, 19, device=device)
    for dy in (torch.ones(1, 1, 45, device=device).expand(2, 5, 45),
               torch.randn(1, 45, device=device).expand(10, 45)):
        xx = x if dy.dim() == 3 else x.reshape(10, 19)
        _, rdw, rdb = _oracle(xx, torch.zeros(45, 19), torch.zeros(45), dy)
        dw = OPS.sparse_weight_grad(dy, xx, act, starts, sizes, owners, axis)
        db = OPS.sparse_bias_grad(dy, act, starts, sizes, owners)
        assert rel_err(dw, rdw * mw) <= FP32_RTOL and rel_err(db, rdb * mb) <= FP32_RTOL


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("mask_name", MASK_NAMES)
@pytest.mark.parametrize("layout_name", ["rows_fused_qkv", "rows_partial_uneven", "cols_uneven", "whole"])
def test_accumulate_leaves_frozen_blocks_untouched(layout_name, mask_name, device, gemm_plan):
    starts, sizes, owners, axis = _layout_args(layout_name)
    active = _masks(len(LAYOUTS[layout_name][1]), seed=7)[mask_name]
    x, w, b, dy = _data(layout_name, three_d=True, device=device, seed=8)
    _, rdw, rdb = _oracle(x, w, b, dy)
    mw, mb = _expected_masks(layout_name, active)
    g0 = torch.randn(w.shape, device=device)
    gw = g0.clone()
    OPS.sparse_weight_grad_accumulate(gw, dy, x, torch.tensor(active), starts, sizes, owners, axis)
    assert torch.equal(gw.cpu()[mw == 0], g0.cpu()[mw == 0]), "frozen blocks must be left bit-for-bit"
    assert rel_err(gw, g0.double().cpu() + rdw * mw) <= FP32_RTOL
    # also into a non-contiguous gradient buffer
    gt = g0.t().contiguous().t()
    OPS.sparse_weight_grad_accumulate(gt, dy, x, torch.tensor(active), starts, sizes, owners, axis)
    assert torch.equal(gt, gw) or rel_err(gt, gw) <= FP32_RTOL
    if axis == 0:
        b0 = torch.randn(b.shape, device=device)
        gb = b0.clone()
        OPS.sparse_bias_grad_accumulate(gb, dy, torch.tensor(active), starts, sizes, owners)
        assert torch.equal(gb.cpu()[mb == 0], b0.cpu()[mb == 0])
        assert rel_err(gb, b0.double().cpu() + rdb * mb) <= FP32_RTOL


@pytest.mark.parametrize("device", devices())
def test_uint8_mask_and_empty_tokens(device):
    starts, sizes, owners, axis = _layout_args("rows_equal")
    act = torch.tensor([1, 0, 1, 1, 0], dtype=torch.uint8)
    x, w, b, dy = _data("rows_equal", three_d=False, device=device)
    ref = OPS.sparse_weight_grad(dy, x, act.bool(), starts, sizes, owners, axis)
    assert torch.equal(OPS.sparse_weight_grad(dy, x, act, starts, sizes, owners, axis), ref)
    # no tokens: the gradient is exactly zero everywhere
    dw = OPS.sparse_weight_grad(dy[:0], x[:0], act, starts, sizes, owners, axis)
    assert dw.shape == w.shape and torch.all(dw == 0)




@pytest.mark.parametrize(
    "mask,expect",
    [
        ([True] * 12, {"aten::mm": 1}),  # one run covering everything: exactly the dense GEMM
        ([False] * 12, {}),  # nothing active: no GEMM, no reshape
        ([h % 2 == 0 for h in range(12)], {"aten::bmm": 1}),  # 18 runs of one head, equal spacing: one bmm
        ([h < 6 for h in range(12)], {"aten::bmm": 1}),  # heads 0-5 in Q, K and V: 3 runs, one bmm
        ([h in (0, 1, 5, 7) for h in range(12)], {"aten::bmm": 3}),  # runs of 2 lengths; 64-runs in 2 chains
        ([h == 3 for h in range(12)], {"aten::bmm": 1}),
    ],
    ids=["all_on", "all_off", "interleaved", "contiguous_half", "random", "one_head"],
)
def test_gemm_plan_fused_qkv_no_copies(mask, expect, strided_plan):
    """One GEMM per group of runs on strided views: count the ATen calls inside the op (CPU profiler)."""
    heads = mk.fused_qkv_heads(12, 4)
    starts = [s for h in heads for s, _ in h]
    sizes = [n for h in heads for _, n in h]
    owners = [i for i, h in enumerate(heads) for _ in h]
    dy, x = torch.randn(2, 7, 144), torch.randn(2, 7, 19)
    act = torch.tensor(mask)
    counts = aten_counts(lambda: OPS.sparse_weight_grad(dy, x, act, starts, sizes, owners, 0))
    assert {k: v for k, v in counts.items() if k in GEMM_OPS} == expect
    assert not any(k in COPY_OPS for k in counts), counts
    counts = aten_counts(lambda: OPS.sparse_bias_grad(dy, act, starts, sizes, owners))
    assert not any(k in COPY_OPS for k in counts), counts


def test_gemm_plan_columns_and_single_copy_for_stride0(strided_plan):
    x, dy = torch.randn(9, 24), torch.randn(9, 6)
    act = torch.tensor([True, False] * 4)
    counts = aten_counts(lambda: OPS.sparse_weight_grad(dy, x, act, list(range(0, 24, 3)), [3] * 8,
                                                         list(range(8)), 1))
    assert counts["aten::bmm"] == 1 and not any(k in COPY_OPS for k in counts), counts
    # a stride-0 dY is not BLAS-compatible: copied once (not once per run)
    dy0 = torch.randn(1, 6).expand(9, 6)
    act = torch.tensor([True, False, True, False, True, True, False, True])
    counts = aten_counts(lambda: OPS.sparse_weight_grad(dy0, x, act, list(range(0, 24, 3)), [3] * 8,
                                                         list(range(8)), 1))
    assert counts["aten::contiguous"] == 1, counts


def _qkv_args(heads=12, head_dim=4):
    spec = mk.fused_qkv_heads(heads, head_dim)
    return ([s for h in spec for s, _ in h], [n for h in spec for _, n in h],
            [i for i, h in enumerate(spec) for _ in h])


@pytest.mark.parametrize("mask", [[h % 2 == 0 for h in range(12)], [h in (0, 1, 5, 7) for h in range(12)],
                                  [h != 4 for h in range(12)]], ids=["interleaved", "random", "one_frozen"])
def test_gather_plan_is_one_gemm_per_projection(mask, monkeypatch):
    """The gather plan: one GEMM for dW (row and column blocks) and for the detach dX (row and column blocks),
    whatever the mask: one copy per active run gathers an operand, one copy per run scatters the result."""
    monkeypatch.setenv("MAT_KERNELS_GEMM_PLAN", "gather")
    starts, sizes, owners = _qkv_args()
    act = torch.tensor(mask)
    rows = torch.zeros(144, dtype=torch.bool)
    for start, size, owner in zip(starts, sizes, owners):
        rows[start:start + size] = act[owner]
    runs = int((rows[1:] & ~rows[:-1]).sum()) + int(rows[0])  # maximal runs of active rows
    dy, x, w = torch.randn(2, 7, 144), torch.randn(2, 7, 19), torch.randn(144, 19)
    for call, gemm in ((lambda: OPS.sparse_weight_grad(dy, x, act, starts, sizes, owners, 0), "aten::mm"),
                       (lambda: OPS.sparse_input_grad(dy, w, act, starts, sizes, owners, 0), "aten::mm")):
        counts = aten_counts(call)
        assert {k: v for k, v in counts.items() if k in GEMM_OPS} == {gemm: 1}, counts
        assert counts["aten::copy_"] <= 2 * runs, (counts, runs)
    # column blocks: the same starts along d_in
    xc, wc = torch.randn(2, 7, 144), torch.randn(19, 144)
    dyc = torch.randn(2, 7, 19)
    for call in (lambda: OPS.sparse_weight_grad(dyc, xc, act, starts, sizes, owners, 1),
                 lambda: OPS.sparse_input_grad(dyc, wc, act, starts, sizes, owners, 1)):
        counts = aten_counts(call)
        assert {k: v for k, v in counts.items() if k in GEMM_OPS} == {"aten::mm": 1}, counts


def test_unknown_gemm_plan_is_an_error(monkeypatch):
    monkeypatch.setenv("MAT_KERNELS_GEMM_PLAN", "gathr")
    starts, sizes, owners = _qkv_args()
    with pytest.raises(ValueError, match="MAT_KERNELS_GEMM_PLAN must be auto, strided or gather"):
        OPS.sparse_weight_grad(torch.randn(7, 144), torch.randn(7, 19), torch.arange(12) % 2 == 0, starts, sizes,
                               owners, 0)


def test_cpu_cost_model_gathers_at_bert_shapes(monkeypatch):
    """Default plan on the CPU at a BERT-base QKV shape (768 -> 2304, 12 heads): single interleaved heads are many
    short runs that would each repack X, so the op gathers (one GEMM); runs of three heads keep their GEMMs; one
    contiguous run stays a view (no copy)."""
    monkeypatch.delenv("MAT_KERNELS_GEMM_PLAN", raising=False)
    starts, sizes, owners = _qkv_args(12, 64)
    dy, x = torch.randn(256, 2304), torch.randn(256, 768)
    counts = aten_counts(lambda: OPS.sparse_weight_grad(dy, x, torch.arange(12) % 4 == 0, starts, sizes, owners, 0))
    assert {k: v for k, v in counts.items() if k in GEMM_OPS} == {"aten::mm": 1}, counts
    # three quarters interleaved: runs of 3 heads (192 rows) stay their own GEMMs (one batched GEMM), no copy
    counts = aten_counts(lambda: OPS.sparse_weight_grad(dy, x, torch.arange(12) % 4 != 0, starts, sizes, owners, 0))
    assert {k: v for k, v in counts.items() if k in GEMM_OPS} == {"aten::bmm": 1}, counts
    assert not any(k in COPY_OPS for k in counts), counts
    counts = aten_counts(lambda: OPS.sparse_weight_grad(dy, x, torch.ones(12, dtype=torch.bool), starts, sizes,
                                                         owners, 0))
    assert {k: v for k, v in counts.items() if k in GEMM_OPS} == {"aten::mm": 1}
    assert not any(k in COPY_OPS for k in counts), counts


# ---------------------------------------------------------------------------------------------------------------
# torch.library: opcheck and autograd formulas of the ops
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", devices())
def test_ops_against_the_oracle_on_sample_inputs(device):
    """Every op of the family on every sample: dW, db (row layouts), dX against dense float64 autograd with the
    frozen entries zeroed; the accumulate forms add exactly that and leave frozen entries bit-for-bit."""
    for s in sample_inputs(device):
        rdx_dense, rdw, rdb = _oracle(s.x, s.w, s.b, s.dy)
        del rdx_dense  # the input gradient of partial backpropagation flows through the active entries only
        rdx = s.dy.detach().double().cpu() @ (s.mask * s.w.detach().double().cpu())
        assert rel_err(OPS.sparse_weight_grad(*s.weight_args()), rdw * s.mask) <= FP32_RTOL, s.name
        assert rel_err(OPS.sparse_input_grad(*s.input_args()), rdx) <= FP32_RTOL, s.name
        g0 = torch.randn(s.w.shape, device=device)
        gw = g0.clone()
        OPS.sparse_weight_grad_accumulate(gw, *s.weight_args())
        assert torch.equal(gw.cpu()[s.mask == 0], g0.cpu()[s.mask == 0]), s.name
        assert rel_err(gw, g0.double().cpu() + rdw * s.mask) <= FP32_RTOL, s.name
        if s.axis == 0:
            rows = s.mask[:, 0]
            assert rel_err(OPS.sparse_bias_grad(*s.bias_args()), rdb * rows) <= FP32_RTOL, s.name
            b0 = torch.randn(s.b.shape, device=device)
            gb = b0.clone()
            OPS.sparse_bias_grad_accumulate(gb, *s.bias_args())
            assert torch.equal(gb.cpu()[rows == 0], b0.cpu()[rows == 0]), s.name
            assert rel_err(gb, b0.double().cpu() + rdb * rows) <= FP32_RTOL, s.name


# ---------------------------------------------------------------------------------------------------------------
# torch.library: opcheck and autograd formulas of the ops, on the same sample inputs
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", devices())
def test_opcheck_every_op(device):
    for s in sample_inputs(device):
        dy, x, w = (t.clone().requires_grad_(True) for t in (s.dy, s.x, s.w))
        rest = (s.active, s.starts, s.sizes, s.owners)
        torch.library.opcheck(OPS.sparse_weight_grad.default, (dy, x, *rest, s.axis))
        torch.library.opcheck(OPS.sparse_input_grad.default, (dy, w, *rest, s.axis))
        torch.library.opcheck(OPS.sparse_weight_grad_accumulate.default, (torch.randn_like(s.w), *s.weight_args()))
        if s.axis == 0:
            torch.library.opcheck(OPS.sparse_bias_grad.default, (dy, *rest))
            torch.library.opcheck(OPS.sparse_bias_grad_accumulate.default, (torch.randn_like(s.b), *s.bias_args()))


def test_op_autograd_formulas_gradcheck():
    """The registered backward of the functional ops, and the input-gradient op's own backward (double backward),
    against finite differences on the sample inputs in float64 (2 tokens: small Jacobians). Double backward in
    full on three 3-D layouts, by random projections (``fast_mode``) on the others (full on all: 19 s)."""
    full_gradgrad = {"rows_multi_range-3d", "cols_uneven_gap-3d", "rows_fused_qkv-3d"}
    for s in sample_inputs("cpu", torch.float64, tokens=2):
        dy, x, w = (t.clone().requires_grad_(True) for t in (s.dy, s.x, s.w))
        rest = (s.active, s.starts, s.sizes, s.owners)
        assert torch.autograd.gradcheck(lambda d, a: OPS.sparse_weight_grad(d, a, *rest, s.axis), (dy, x)), s.name
        if s.axis == 0:
            assert torch.autograd.gradcheck(lambda d: OPS.sparse_bias_grad(d, *rest), (dy,)), s.name

        def input_grad(d, ww):
            return OPS.sparse_input_grad(d, ww, *rest, s.axis)

        assert torch.autograd.gradcheck(input_grad, (dy, w)), s.name
        assert torch.autograd.gradgradcheck(input_grad, (dy, w), fast_mode=s.name not in full_gradgrad), s.name


# ---------------------------------------------------------------------------------------------------------------
# SparseUpdateLinear
# ---------------------------------------------------------------------------------------------------------------
def test_module_is_a_drop_in_for_linear():
    torch.manual_seed(12)
    lin = nn.Linear(19, 45)
    s = mk.SparseUpdateLinear.from_linear(lin, row_blocks=mk.fused_qkv_heads(5, 3))
    assert s.weight is lin.weight and s.bias is lin.bias  # shared: optimizers built on `lin` stay valid
    assert isinstance(s, nn.Linear)
    assert list(s.state_dict()) == list(lin.state_dict()) == ["weight", "bias"]
    assert dict(s.named_parameters()).keys() == dict(lin.named_parameters()).keys()
    x = torch.randn(2, 5, 19)
    torch.testing.assert_close(s(x), lin(x), rtol=0, atol=0)
    # round trip through state_dict and back to nn.Linear
    fresh = mk.SparseUpdateLinear(19, 45, row_blocks=mk.fused_qkv_heads(5, 3))
    fresh.load_state_dict(lin.state_dict())
    back = fresh.to_linear()
    assert type(back) is nn.Linear and back.weight is fresh.weight
    torch.testing.assert_close(back(x), lin(x), rtol=0, atol=0)
    # all modules active by default: trains like nn.Linear
    s(x).square().sum().backward()
    w_sparse = lin.weight.grad.clone()
    lin.zero_grad()
    lin(x).square().sum().backward()
    assert rel_err(w_sparse, lin.weight.grad) <= FP32_RTOL
    nb = mk.SparseUpdateLinear.from_linear(nn.Linear(4, 6, bias=False), col_blocks=2)
    assert nb.bias is None and list(nb.state_dict()) == ["weight"]
    assert "active=2/2" in repr(nb)


def test_set_active_in_place_and_mask_stays_on_cpu():
    s = mk.SparseUpdateLinear(19, 15, row_blocks=5)
    ptr = s._active.data_ptr()
    s.set_active([True, False, True, False, False])
    s.set_active(torch.tensor([False, True, True, True, False]))
    assert s._active.data_ptr() == ptr
    assert s.active.tolist() == [False, True, True, True, False]
    s.active[0] = True  # the property hands out a copy
    assert s.active.tolist()[0] is False
    s.to(torch.float64)
    s.to("meta")  # stands for .cuda(): parameters move, the mask stays a CPU bool tensor
    assert s.weight.device.type == "meta"
    assert s._active.device.type == "cpu" and s._active.dtype == torch.bool and s._active.data_ptr() == ptr
    c = copy.deepcopy(s)
    assert c._active.data_ptr() != ptr and c.active.tolist() == s.active.tolist()


def test_set_active_between_forward_and_backward_applies_from_the_next_forward():
    torch.manual_seed(14)
    s = mk.SparseUpdateLinear(19, 15, row_blocks=5)
    x, dy = torch.randn(4, 19), torch.randn(4, 15)
    s.set_active([True, False, True, False, False])
    y = s(x)
    s.set_active([False] * 5)  # no in-place error: the backward uses its own forward's mask
    y.backward(dy)
    _, rdw, _ = _oracle(x, s.weight, s.bias, dy)
    rows = torch.tensor([True, False, True, False, False]).repeat_interleave(3)
    assert rel_err(s.weight.grad[rows], rdw[rows]) <= FP32_RTOL and not s.weight.grad[~rows].any()
    s.zero_grad(set_to_none=True)
    s(x).backward(dy)  # the next forward: everything frozen
    assert s.weight.grad is None


def test_meta_device_for_deferred_init():
    """Meta tensors (deferred initialisation, shape inference) go through the fake kernels."""
    s = mk.SparseUpdateLinear(19, 45, row_blocks=mk.fused_qkv_heads(5, 3), device="meta")
    s.set_active([True, False, True, False, False])
    y = s(torch.randn(2, 5, 19, device="meta"))
    y.sum().backward()
    assert y.shape == (2, 5, 45) and s.weight.grad.shape == (45, 19) and s.weight.grad.device.type == "meta"


def test_mask_change_between_steps_matches_fresh_module():
    torch.manual_seed(13)
    s = mk.SparseUpdateLinear(19, 45, row_blocks=mk.fused_qkv_heads(5, 3))
    x, dy = torch.randn(5, 19), torch.randn(5, 45)
    for mask in (_masks(5)["random"], _masks(5)["alternating"], [True] * 5):
        s.zero_grad()
        s.set_active(mask)
        s(x).backward(dy)
        _, rdw, rdb = _oracle(x, s.weight, s.bias, dy)
        mw, mb = _expected_masks("rows_fused_qkv", mask)
        assert rel_err(s.weight.grad, rdw * mw) <= FP32_RTOL and rel_err(s.bias.grad, rdb * mb) <= FP32_RTOL


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("layout_name", ["rows_fused_qkv", "cols_uneven"])
def test_module_accumulate_grad_mode(layout_name, device):
    """accumulate_grad=True adds straight into .grad: same result as autograd accumulation, frozen untouched."""
    _, modules, d_out, d_in, spec = LAYOUTS[layout_name]
    torch.manual_seed(14)
    ref = mk.SparseUpdateLinear(d_in, d_out, device=device, **spec)
    acc = copy.deepcopy(ref)
    acc.accumulate_grad = True
    masks = _masks(len(modules), seed=15)
    for step, name in enumerate(["random", "all_off", "alternating"]):
        x = torch.randn(2, 5, d_in, device=device)
        dy = torch.randn(2, 5, d_out, device=device)
        before = None if acc.weight.grad is None else acc.weight.grad.clone()
        for layer in (ref, acc):
            layer.set_active(masks[name])
            layer(x).backward(dy)
        frozen_w = _expected_masks(layout_name, masks[name])[0] == 0
        if step == 0:  # .grad allocated as zeros, active blocks written
            assert torch.all(acc.weight.grad.cpu()[frozen_w] == 0)
        else:  # frozen blocks bit-for-bit as they were (all of them when nothing is active)
            assert torch.equal(acc.weight.grad.cpu()[frozen_w], before.cpu()[frozen_w])
    assert rel_err(acc.weight.grad, ref.weight.grad) <= FP32_RTOL
    assert rel_err(acc.bias.grad, ref.bias.grad) <= FP32_RTOL
    fresh = mk.SparseUpdateLinear(d_in, d_out, device=device, accumulate_grad=True, **spec)
    fresh.set_active([False] * len(modules))
    fresh(torch.randn(3, d_in, device=device)).sum().backward()
    assert fresh.weight.grad is None
    if LAYOUTS[layout_name][0] == "rows":
        assert fresh.bias.grad is None
    else:  # a shared bias always gets its full gradient: 3 tokens of dy = 1
        assert torch.equal(fresh.bias.grad.cpu(), torch.full((d_out,), 3.0))


def test_autocast_bf16_cpu():
    torch.manual_seed(16)
    s = mk.SparseUpdateLinear(19, 15, row_blocks=5)
    lin = s.to_linear()
    mask = [True, False, False, True, True]
    s.set_active(mask)
    x = torch.randn(5, 19)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = s(x)
        y_ref = F.linear(x, s.weight, s.bias)
    assert y.dtype == torch.bfloat16 and torch.equal(y, y_ref)
    dy = torch.randn(5, 15)
    y.backward(dy.bfloat16())
    assert s.weight.grad.dtype == torch.float32
    w_sparse = s.weight.grad.clone()
    s.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lin(x).backward(dy.bfloat16())
    # oracle: the bf16-rounded operands autocast multiplies, in float64; 2x-PyTorch rule on the active rows
    mw, _ = _expected_masks("rows_equal", mask)
    oracle = dy.bfloat16().double().t() @ x.bfloat16().double() * mw
    assert rel_err(w_sparse, oracle) <= 2 * rel_err(s.weight.grad.double() * mw, oracle)
    assert torch.all(w_sparse[mw == 0] == 0)


# ---------------------------------------------------------------------------------------------------------------
# torch.compile: traced with fakes, no graph break, no recompilation when masks change
# ---------------------------------------------------------------------------------------------------------------
class _Block(nn.Module):
    """A tiny attention-less transformer block: fused QKV (row blocks), output projection (column blocks), FFN."""

    def __init__(self):
        super().__init__()
        self.qkv = mk.SparseUpdateLinear(19, 45, row_blocks=mk.fused_qkv_heads(5, 3))
        self.out = mk.SparseUpdateLinear(15, 19, col_blocks=5)
        self.ffn = mk.SparseUpdateLinear(19, 23)  # whole weight, one module

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.ffn(torch.relu(self.out(q * k + v)))


def test_torch_compile_fullgraph_mask_change_no_recompile():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch.manual_seed(17)
    model = _Block()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    x = torch.randn(2, 5, 19)

    def grads(fn):
        model.zero_grad(set_to_none=True)
        fn(x).square().sum().backward()
        return {n: p.grad.clone() if p.grad is not None else None for n, p in model.named_parameters()}

    schedules = [
        ([True] * 5, [True] * 5, [True]),
        ([True, False, True, False, False], [False, True, True, False, True], [True]),
        ([False, False, False, False, True], [True, False, False, False, False], [False]),
    ]
    for qkv_mask, out_mask, ffn_mask in schedules:
        model.qkv.set_active(qkv_mask)
        model.out.set_active(out_mask)
        model.ffn.set_active(ffn_mask)
        eager, comp = grads(model), grads(compiled)
        for name, g in eager.items():
            if g is None:  # wholly frozen: None in eager, zeros when compiled (documented)
                assert torch.all(comp[name] == 0), name
            else:
                assert rel_err(comp[name], g) <= FP32_RTOL, name
    assert counter.frame_count == 1, "changing masks must not recompile"
    assert counter.op_count > 0


@pytest.mark.slow
@pytest.mark.parametrize("device", devices())
def test_torch_compile_inductor(device):
    """Inductor (generated code around the ops, a CPU mask input next to device tensors): same gradients."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch.manual_seed(18)
    model = nn.Sequential(mk.SparseUpdateLinear(19, 45, row_blocks=mk.fused_qkv_heads(5, 3)), nn.ReLU(),
                          mk.SparseUpdateLinear(45, 7, col_blocks=[(0, 15), (15, 15), (30, 15)])).to(device)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    x = torch.randn(4, 19, device=device)
    for mask in ([True, False, True, False, True], [True] * 5):
        model[0].set_active(mask)
        model[2].set_active(mask[:3])
        grads = []
        for fn in (model, compiled):
            model.zero_grad(set_to_none=True)
            fn(x).sum().backward()
            grads.append([p.grad for p in model.parameters()])
        for ge, gc in zip(*grads):
            assert rel_err(gc, ge) <= FP32_RTOL
    assert counter.frame_count == 1


# ---------------------------------------------------------------------------------------------------------------
# Invalid inputs: errors name the argument
# ---------------------------------------------------------------------------------------------------------------
_S, _Z, _O, _A = SMALL_LAYOUT  # helpers.py: the invalid-input tests of both sparse-grad files share it
_dy = torch.randn


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: OPS.sparse_weight_grad(_dy(4, 9), _dy(5, 7), _A, _S, _Z, _O, 0), ValueError, "dy and x must agree"),
        (lambda: OPS.sparse_weight_grad(_dy(2, 4, 9), _dy(8, 7), _A, _S, _Z, _O, 0), ValueError, "same rank"),
        (lambda: OPS.sparse_weight_grad(_dy(9), _dy(7), _A, _S, _Z, _O, 0), ValueError, "dy must be 2-D"),
        (lambda: OPS.sparse_weight_grad(_dy(4, 9), _dy(4, 7, dtype=torch.float64), _A, _S, _Z, _O, 0), TypeError,
         "same dtype"),
        (lambda: OPS.sparse_weight_grad(_dy(4, 9).int(), _dy(4, 7).int(), _A, _S, _Z, _O, 0), TypeError,
         "dy must be float32"),
        (lambda: OPS.sparse_weight_grad(_dy(4, 9), _dy(4, 7, device="meta"), _A, _S, _Z, _O, 0), ValueError,
         "same device"),
        (lambda: OPS.sparse_weight_grad(_dy(4, 9), _dy(4, 7), _A.float(), _S, _Z, _O, 0), TypeError,
         "active must be a bool"),
        (lambda: OPS.sparse_weight_grad(_dy(4, 9), _dy(4, 7), _A[None], _S, _Z, _O, 0), ValueError,
         "active must be 1-D"),
        (lambda: OPS.sparse_weight_grad(_dy(4, 9), _dy(4, 7), _A[:2], _S, _Z, _O, 0), ValueError,
         "active has 2 entries but the layout has 3 modules"),
        (lambda: OPS.sparse_weight_grad(_dy(4, 9), _dy(4, 7), _A, [0, 3, 7], _Z, _O, 0), ValueError, "out of bounds"),
        (lambda: OPS.sparse_weight_grad(_dy(4, 9), _dy(4, 7), _A, [0, 2, 6], _Z, _O, 0), ValueError, "overlap"),
        (lambda: OPS.sparse_weight_grad(_dy(4, 9), _dy(4, 7), _A, _S, [3, 0, 3], _O, 0), ValueError,
         r"sizes\[1\] must be positive"),
        (lambda: OPS.sparse_weight_grad(_dy(4, 9), _dy(4, 7), _A, _S, _Z[:2], _O, 0), ValueError, "same length"),
        (lambda: OPS.sparse_weight_grad(_dy(4, 9), _dy(4, 7), _A, _S, _Z, [0, 1, -1], 0), ValueError,
         r"owners\[2\]"),
        (lambda: OPS.sparse_weight_grad(_dy(4, 9), _dy(4, 7), _A, _S, _Z, _O, 2), ValueError, "axis must be 0"),
        (lambda: OPS.sparse_weight_grad(_dy(4, 9), _dy(4, 7), _A, _S, _Z, _O, 1), ValueError,
         r"out of bounds for d_in = x.size\(-1\) = 7"),
        (lambda: OPS.sparse_weight_grad_accumulate(torch.zeros(9, 8), _dy(4, 9), _dy(4, 7), _A, _S, _Z, _O, 0),
         ValueError, "grad_weight must have shape"),
        (lambda: OPS.sparse_weight_grad_accumulate(torch.zeros(9, 7).half(), _dy(4, 9), _dy(4, 7), _A, _S, _Z, _O, 0),
         TypeError, "grad_weight and dy must have the same dtype"),
        (lambda: OPS.sparse_weight_grad_accumulate(torch.zeros(1, 7).expand(9, 7), _dy(4, 9), _dy(4, 7), _A, _S, _Z,
                                                   _O, 0), ValueError, "overlapping memory"),
        (lambda: OPS.sparse_bias_grad_accumulate(torch.zeros(8), _dy(4, 9), _A, _S, _Z, _O), ValueError,
         "grad_bias must have shape"),
    ],
)
def test_invalid_op_inputs(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_mask_on_another_device_is_rejected():
    # a meta mask dispatches to the fake kernel, which applies the same rule as C++
    with pytest.raises(ValueError, match="active must be a CPU tensor"):
        OPS.sparse_weight_grad(_dy(4, 9), _dy(4, 7), _A.to("meta"), _S, _Z, _O, 0)
    with pytest.raises(ValueError, match="active must be a CPU tensor"):
        mk.sparse_update_linear(_dy(4, 7), _dy(9, 7), active=_A.to("meta"), row_blocks=3)


@requires_cuda
def test_cuda_mask_rejected_and_current_stream():
    dy, x = _dy(4, 9, device="cuda"), _dy(4, 7, device="cuda")
    with pytest.raises(ValueError, match="active must be a CPU tensor"):
        OPS.sparse_weight_grad(dy, x, _A.cuda(), _S, _Z, _O, 0)
    ref = OPS.sparse_weight_grad(dy, x, _A, _S, _Z, _O, 0)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = OPS.sparse_weight_grad(dy, x, _A, _S, _Z, _O, 0)
    torch.cuda.current_stream().wait_stream(stream)
    assert torch.equal(got, ref)


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: mk.sparse_update_linear(_dy(4, 8), _dy(9, 7), active=_A, row_blocks=3), ValueError,
         r"x must have d_in = weight.shape\[1\] = 7"),
        (lambda: mk.sparse_update_linear([1.0], _dy(9, 7), active=_A, row_blocks=3), TypeError, "x must be a torch"),
        (lambda: mk.sparse_update_linear(_dy(4, 7), _dy(9, 7, 1), active=_A, row_blocks=3), ValueError,
         "weight must be a 2-D"),
        (lambda: mk.sparse_update_linear(_dy(4, 7), _dy(9, 7), _dy(8), active=_A, row_blocks=3), ValueError,
         r"bias must have shape \[9\]"),
        (lambda: mk.sparse_update_linear(_dy(4, 7).double(), _dy(9, 7), active=_A, row_blocks=3), TypeError,
         "same dtype"),
        (lambda: mk.sparse_update_linear(_dy(4, 7).int(), _dy(9, 7).int(), active=_A, row_blocks=3), TypeError,
         "x has dtype torch.int32"),
        (lambda: mk.sparse_update_linear(_dy(4, 7), _dy(9, 7, device="meta"), active=_A, row_blocks=3), ValueError,
         "same device"),
        (lambda: mk.sparse_update_linear(_dy(4, 7), _dy(9, 7), active=[True] * 3, row_blocks=3), TypeError,
         "active must be a bool CPU tensor"),
        (lambda: mk.sparse_update_linear(_dy(4, 7), _dy(9, 7), active=_A.int(), row_blocks=3), TypeError,
         "active must have dtype torch.bool"),
        (lambda: mk.sparse_update_linear(_dy(4, 7), _dy(9, 7), active=_A[:2], row_blocks=3), ValueError,
         r"active must have shape \[3\]"),
        (lambda: mk.sparse_update_linear(_dy(4, 7), _dy(9, 7), active=_A, row_blocks=3, col_blocks=7), ValueError,
         "not both"),
        (lambda: mk.sparse_update_linear(_dy(4, 7), _dy(9, 7), active=_A, row_blocks=4), ValueError,
         "row_blocks=4 must be a positive number of equal blocks dividing 9"),
        (lambda: mk.sparse_update_linear(_dy(4, 7), _dy(9, 7), active=_A, col_blocks=[(0, 3), (3, 3), (6, 2)]),
         ValueError, r"col_blocks\[2\]: range \[6, 8\) is out of bounds"),
        (lambda: mk.sparse_update_linear(_dy(4, 7), _dy(9, 7), active=_A, row_blocks=[(0, 3), (2, 3), (6, 3)]),
         ValueError, "overlap"),
        (lambda: mk.sparse_update_linear(_dy(4, 7), _dy(9, 7).requires_grad_() * 2, active=_A, row_blocks=3,
                                         accumulate_grad=True),
         ValueError, "leaf"),
        (lambda: mk.SparseUpdateLinear(7, 9, row_blocks=3).set_active([True, False]), ValueError,
         r"active must have shape \[3\]"),
        (lambda: mk.SparseUpdateLinear(7, 9, row_blocks=3).set_active([1, 0, 1]), TypeError, "sequence of bools"),
        (lambda: mk.SparseUpdateLinear(7, 9, row_blocks=3).set_active(torch.ones(3)), TypeError, "torch.bool"),
        (lambda: mk.SparseUpdateLinear.from_linear(nn.Conv1d(2, 2, 1)), TypeError, "torch.nn.Linear"),
        (lambda: mk.SparseUpdateLinear(7, 9, row_blocks=3)(_dy(4, 8)), ValueError, "d_in"),
    ],
)
def test_invalid_python_inputs(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_extension_without_cuda_kernels_says_so():
    if "cuda" in su._C.BUILT_DEVICES:
        pytest.skip("this build has CUDA kernels")
    with pytest.raises(RuntimeError, match="built for cpu only"):
        su.require_extension("cuda")


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_missing_extension_is_reported_clearly():
    """Without _C the package still imports (lambda_max works); the sparse-update API says how to build."""
    r = _python(
        "import sys; sys.modules['mat_kernels._C'] = None\n"
        "import mat_kernels as mk\n"
        "try:\n    mk.SparseUpdateLinear(4, 4)\nexcept RuntimeError as e:\n    print('ERR', e)\n"
    )
    assert r.returncode == 0, r.stderr
    assert "ERR mat_kernels._C is not built" in r.stdout and "setup.py build_ext --inplace" in r.stdout


def test_cpp_library_and_python_custom_op_share_the_namespace():
    """C++ TORCH_LIBRARY(mat_kernels) loaded before the Python custom_op mat_kernels::segment_grams, and after."""
    r = _python(
        "import glob, torch\n"
        "torch.ops.load_library(glob.glob('mat_kernels/_C*.so')[0])\n"
        "import mat_kernels\n"
        "print(torch.ops.mat_kernels.segment_grams, torch.ops.mat_kernels.sparse_weight_grad)\n"
    )
    assert r.returncode == 0, r.stderr
    assert "segment_grams" in r.stdout and "sparse_weight_grad" in r.stdout
    r = _python("from mat_kernels.info import main; main()")
    assert r.returncode == 0, r.stderr
    assert "mat_kernels::sparse_weight_grad" in r.stdout and "cpu, " in r.stdout


# ---------------------------------------------------------------------------------------------------------------
# The GPU benchmark script must not rot: its CPU smoke mode runs here
# ---------------------------------------------------------------------------------------------------------------
def test_benchmark_quick_mode(tmp_path):
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    try:
        import bench_sparse_grad as bench
    finally:
        sys.path.pop(0)
    csv_path = tmp_path / "results.csv"
    rows = bench.main(["--quick", "--device", "cpu", "--csv", str(csv_path)])
    providers = {r["provider"] for r in rows}
    assert {"dense_autograd", "dx_only", "gather", "ideal", "mat_kernels"} <= providers
    assert {r["fraction"] for r in rows} == {0.0, 0.25, 0.5, 0.75, 1.0}
    assert {r["pattern"] for r in rows} == {"contiguous", "interleaved"}
    for r in rows:
        if r["provider"] in ("mat_kernels", "gather"):
            assert r["max_rel_err"] <= FP32_RTOL, r  # fp32 rows: gradients checked against dense autograd
        assert r["ms"] > 0
    text = csv_path.read_text().splitlines()
    assert text[0].startswith("date,") and len(text) == len(rows) + 1
