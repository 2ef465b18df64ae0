"""``mat_kernels::sparse_input_grad``: dX = dY (M ⊙ W), the input gradient of partial backpropagation.

Oracle: ``dy @ (mask ⊙ W)`` in float64 on fresh random inputs, with the 0/1 mask built from the block ranges written
out in this file (fused QKV layouts: the ranges of ``mk.fused_qkv_heads``; the op's ``starts/sizes/owners`` come from
``resolve_blocks(...).segments()``, as in ``WeightBlocks.build``). Tolerances, stated once:

* float64: norm-wise relative error against the oracle at most ``FP64_RTOL = 1e-12``;
* float32: at most ``FP32_RTOL = 1e-6`` (fp32 rounding of dot products of a few dozen terms is ~1e-7; no TF32 on CPU);
* bfloat16: at most ``BF16_RTOL = 1e-2`` relative to the same op in float32 on the same (bf16-valued) inputs: each
  output rounding to bf16 is ~2e-3, and the row-block path rounds once per accumulated run (beta = 1 in bf16);
* frozen blocks: the output is exactly zero where nothing flows (frozen columns; everything when nothing is active).
"""
import pytest
import torch
from helpers import COPY_OPS, GEMM_OPS, SMALL_LAYOUT, aten_counts, devices, rel_err
from sparse_grad_samples import strided_variants

import mat_kernels as mk
from mat_kernels.blocks import resolve_blocks
from mat_kernels.ops import sparse_grad as su
from mat_kernels.testing.tolerances import SPARSE_GRAD_RTOL

FP64_RTOL, FP32_RTOL, BF16_RTOL = (SPARSE_GRAD_RTOL[d] for d in (torch.float64, torch.float32, torch.bfloat16))
OPS = torch.ops.mat_kernels
T, B = 5, 3  # tokens, batch

# ---------------------------------------------------------------------------------------------------------------
# Layouts: name -> (axis, modules = list of lists of (start, size), d_out, d_in). Odd sizes, gaps (indices in no
# range, frozen like frozen blocks), modules of several ranges.
# ---------------------------------------------------------------------------------------------------------------
_QKV = mk.fused_qkv_heads(4, 5)  # 4 heads of 5: head h owns rows p*20 + 5h .. +5 for p = Q, K, V
LAYOUTS = {
    "rows_uneven_gap": (0, [[(0, 7)], [(7, 11)], [(20, 9)], [(29, 8)]], 37, 23),  # rows 18, 19: in no range
    "rows_fused_qkv": (0, _QKV, 60, 23),
    "rows_multi_range": (0, [[(0, 4), (30, 3)], [(4, 10)], [(14, 16)]], 37, 23),  # rows 33..36: in no range
    "cols_uneven_gap": (1, [[(0, 5)], [(5, 3)], [(10, 6)], [(16, 7)]], 37, 23),  # cols 8, 9: in no range
    "cols_fused_qkv": (1, _QKV, 37, 60),
}
MASKS = ["all", "none", "alternating", "random"]


def _layout_args(name):
    axis, modules, d_out, d_in = LAYOUTS[name]
    dim = d_out if axis == 0 else d_in
    starts, sizes, owners = resolve_blocks(modules, dim, axis="rows" if axis == 0 else "cols", name=name).segments()
    assert len(starts) == sum(len(m) for m in modules)
    return list(starts), list(sizes), list(owners), axis


def _mask(name, num_modules, seed=0):
    if name == "all":
        return [True] * num_modules
    if name == "none":
        return [False] * num_modules
    if name == "alternating":
        return [m % 2 == 0 for m in range(num_modules)]
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(num_modules, generator=g) < 0.5).tolist()
    mask[1] = True  # at least one module of each kind
    mask[2] = False
    return mask


def _dense_mask(name, active):
    """0/1 float64 [d_out, d_in] mask of the active blocks, from the written-out ranges."""
    axis, modules, d_out, d_in = LAYOUTS[name]
    m = torch.zeros(d_out, d_in, dtype=torch.float64)
    for k, ranges in enumerate(modules):
        if active[k]:
            for start, size in ranges:
                if axis == 0:
                    m[start:start + size, :] = 1
                else:
                    m[:, start:start + size] = 1
    return m


def _oracle(dy, w, mask):
    return dy.detach().double().cpu() @ (mask * w.detach().double().cpu())


def _data(name, *, three_d, device="cpu", dtype=torch.float32, seed=0):
    _, _, d_out, d_in = LAYOUTS[name]
    g = torch.Generator().manual_seed(seed)
    lead = (B, T) if three_d else (T,)
    dy = torch.randn(*lead, d_out, generator=g)
    w = torch.randn(d_out, d_in, generator=g) / d_out**0.5
    return dy.to(device=device, dtype=dtype), w.to(device=device, dtype=dtype)


def _call(name, dy, w, active):
    starts, sizes, owners, axis = _layout_args(name)
    return OPS.sparse_input_grad(dy, w, torch.tensor(active), starts, sizes, owners, axis)


# ---------------------------------------------------------------------------------------------------------------
# Values against the float64 oracle
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("three_d", [False, True], ids=["2d", "3d"])
@pytest.mark.parametrize("mask_name", MASKS)
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_matches_dense_oracle(name, mask_name, three_d, dtype, device, gemm_plan):
    axis, modules, d_out, d_in = LAYOUTS[name]
    active = _mask(mask_name, len(modules), seed=list(LAYOUTS).index(name) + 10 * three_d)
    dy, w = _data(name, three_d=three_d, device=device, dtype=dtype, seed=1)
    dx = _call(name, dy, w, active)
    mask = _dense_mask(name, active)
    ref = _oracle(dy, w, mask)
    assert dx.shape == (*dy.shape[:-1], d_in) and dx.dtype == dtype and dx.device == dy.device
    assert dx.is_contiguous()
    if not any(active):
        assert torch.all(dx == 0)
        return
    assert rel_err(dx, ref) <= (FP64_RTOL if dtype == torch.float64 else FP32_RTOL)
    if axis == 1:  # frozen columns (and columns in no range) receive exactly nothing
        frozen_cols = mask[0] == 0
        assert torch.all(dx.cpu()[..., frozen_cols] == 0)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("name", ["rows_fused_qkv", "cols_fused_qkv", "rows_uneven_gap"])
def test_bfloat16_against_float32(name, device):
    axis, modules, _, _ = LAYOUTS[name]
    active = _mask("random", len(modules), seed=3)
    dy, w = _data(name, three_d=True, device=device, dtype=torch.bfloat16, seed=2)
    dx = _call(name, dy, w, active)
    ref32 = _call(name, dy.float(), w.float(), active)  # same values, float32 arithmetic
    assert dx.dtype == torch.bfloat16
    assert rel_err(dx, ref32) <= BF16_RTOL
    assert rel_err(ref32, _oracle(dy, w, _dense_mask(name, active))) <= FP32_RTOL


def test_uint8_mask_equals_bool_mask():
    for name in ("rows_fused_qkv", "cols_uneven_gap"):
        starts, sizes, owners, axis = _layout_args(name)
        active = _mask("random", len(LAYOUTS[name][1]), seed=4)
        dy, w = _data(name, three_d=False, seed=4)
        ref = OPS.sparse_input_grad(dy, w, torch.tensor(active), starts, sizes, owners, axis)
        got = OPS.sparse_input_grad(dy, w, torch.tensor(active, dtype=torch.uint8), starts, sizes, owners, axis)
        assert torch.equal(got, ref)


def test_python_wrapper_and_export():
    assert mk.ops.sparse_input_grad is su.sparse_input_grad
    starts, sizes, owners, axis = _layout_args("rows_multi_range")
    dy, w = _data("rows_multi_range", three_d=True, seed=5)
    act = torch.tensor([True, False, True])
    assert torch.equal(su.sparse_input_grad(dy, w, act, starts, sizes, owners, axis),
                       OPS.sparse_input_grad(dy, w, act, starts, sizes, owners, axis))


def test_no_tokens():
    dy, w = _data("rows_fused_qkv", three_d=False)
    dx = _call("rows_fused_qkv", dy[:0], w, [True, False, True, False])
    assert dx.shape == (0, 23)
    dx = _call("cols_fused_qkv", torch.zeros(2, 0, 37), torch.randn(37, 60), [True, False, True, False])
    assert dx.shape == (2, 0, 60)


# ---------------------------------------------------------------------------------------------------------------
# Strides: stride-0 gradients, non-contiguous dy and weight
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("three_d", [False, True], ids=["2d", "3d"])
@pytest.mark.parametrize("name", ["rows_fused_qkv", "cols_fused_qkv"])
def test_non_contiguous_dy_and_weight(name, three_d, device, gemm_plan):
    active = _mask("alternating", len(LAYOUTS[name][1]))
    dy, w = _data(name, three_d=three_d, device=device, seed=6)
    ref = _oracle(dy, w, _dense_mask(name, active))
    for ndy, dyv in strided_variants(dy):
        for nw, wv in strided_variants(w):
            assert torch.equal(dyv, dy) and torch.equal(wv, w)
            dx = _call(name, dyv, wv, active)
            assert dx.is_contiguous() and dx.shape == (*dy.shape[:-1], w.shape[1])
            assert rel_err(dx, ref) <= FP32_RTOL, (ndy, nw)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("name", ["rows_fused_qkv", "cols_fused_qkv", "rows_uneven_gap"])
def test_expanded_stride0_dy(name, device, gemm_plan):
    """``loss.sum().backward()`` hands over a stride-0 dY (all strides 0 in 3-D; row-broadcast in 2-D)."""
    _, modules, d_out, _ = LAYOUTS[name]
    active = _mask("random", len(modules), seed=7)
    _, w = _data(name, three_d=False, device=device, seed=7)
    mask = _dense_mask(name, active)
    for dy in (torch.ones(1, 1, d_out, device=device).expand(B, T, d_out),
               torch.randn(1, d_out, device=device).expand(T, d_out)):
        dx = _call(name, dy, w, active)
        assert dx.is_contiguous() and dx.shape == (*dy.shape[:-1], w.shape[1])
        assert rel_err(dx, _oracle(dy, w, mask)) <= FP32_RTOL


# ---------------------------------------------------------------------------------------------------------------
# The GEMM plan: strided views only, no gather
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,mask,expect",
    [
        ("rows_fused_qkv", [True] * 4, {"aten::mm": 1}),  # one run: exactly the dense GEMM
        ("rows_fused_qkv", [False] * 4, {}),  # nothing active: no GEMM
        # heads 0 and 2 in Q, K, V: 6 runs of 5 rows; one GEMM each, the first writes, the others accumulate
        ("rows_fused_qkv", [True, False, True, False], {"aten::mm": 1, "aten::addmm_": 5}),
        ("rows_fused_qkv", [True, True, False, False], {"aten::mm": 1, "aten::addmm_": 2}),  # 3 runs of 10 rows
        ("cols_fused_qkv", [True] * 4, {"aten::mm": 1}),
        ("cols_fused_qkv", [False] * 4, {}),
        ("cols_fused_qkv", [True, False, True, False], {"aten::bmm": 1}),  # 6 equally spaced runs: one bmm
        ("cols_uneven_gap", [True, False, True, True], {"aten::mm": 2}),  # runs of lengths 5 and 13
    ],
    ids=["rows_all", "rows_none", "rows_interleaved", "rows_half", "cols_all", "cols_none", "cols_interleaved",
         "cols_uneven"],
)
def test_gemm_plan_no_copies(name, mask, expect, strided_plan):
    dy, w = _data(name, three_d=True, seed=8)
    counts = aten_counts(lambda: _call(name, dy, w, mask))
    assert {k: v for k, v in counts.items() if k in GEMM_OPS} == expect, counts
    assert not any(k in COPY_OPS for k in counts), counts


def test_stride0_dy_is_copied_once(strided_plan):
    dy0 = torch.randn(1, 60).expand(T, 60)
    _, w = _data("rows_fused_qkv", three_d=False)
    counts = aten_counts(lambda: _call("rows_fused_qkv", dy0, w, [True, False, True, False]))
    assert counts["aten::contiguous"] == 1, counts


# ---------------------------------------------------------------------------------------------------------------
# torch.library: opcheck, autograd formula (double backward), FLOPs, torch.compile
# ---------------------------------------------------------------------------------------------------------------
# opcheck and gradcheck of this op run on the op family's sample inputs (tests/sparse_grad_samples.py) in
# tests/test_sparse_grad.py: test_opcheck_every_op, test_op_autograd_formulas_gradcheck.
def test_autograd_formula_matches_dense_autograd():
    """Double backward against autograd of the dense formula dy @ (M ⊙ W)."""
    name = "cols_fused_qkv"
    starts, sizes, owners, axis = _layout_args(name)
    active = [False, True, True, False]
    mask = _dense_mask(name, active)
    dy, w = _data(name, three_d=True, dtype=torch.float64, seed=11)
    g = torch.randn(B, T, w.shape[1], dtype=torch.float64)
    grads = []
    for fn in (lambda d, ww: OPS.sparse_input_grad(d, ww, torch.tensor(active), starts, sizes, owners, axis),
               lambda d, ww: d @ (mask * ww)):
        d, ww = dy.clone().requires_grad_(True), w.clone().requires_grad_(True)
        fn(d, ww).backward(g)
        grads.append((d.grad, ww.grad))
    assert rel_err(grads[0][0], grads[1][0]) <= FP64_RTOL
    assert rel_err(grads[0][1], grads[1][1]) <= FP64_RTOL
    assert torch.all(grads[0][1][mask == 0] == 0)


@pytest.mark.parametrize("three_d", [False, True], ids=["2d", "3d"])
@pytest.mark.parametrize("mask_name", MASKS)
@pytest.mark.parametrize("name", ["rows_fused_qkv", "rows_uneven_gap", "cols_fused_qkv", "cols_uneven_gap"])
def test_flop_count(name, mask_name, three_d):
    from torch.utils.flop_counter import FlopCounterMode

    axis, modules, d_out, d_in = LAYOUTS[name]
    active = _mask(mask_name, len(modules), seed=12)
    dy, w = _data(name, three_d=three_d, seed=12)
    with FlopCounterMode(display=False) as mode:
        _call(name, dy, w, active)
    tokens = dy.numel() // d_out
    width = sum(size for k, ranges in enumerate(modules) if active[k] for _, size in ranges)
    expected = 2 * tokens * width * (d_in if axis == 0 else d_out)
    assert mode.get_total_flops() == expected
    if not any(active):
        assert expected == 0
    if all(active) and axis == 0 and name == "rows_fused_qkv":  # everything active: the dense GEMM's count
        with FlopCounterMode(display=False) as dense:
            dy @ w
        assert mode.get_total_flops() == dense.get_total_flops()


def test_torch_compile_fullgraph_mask_change_no_recompile():
    """fullgraph (no graph break), forward and backward through the op; a new mask is a new input, not a recompile."""
    from torch._dynamo.testing import CompileCounterWithBackend

    name = "rows_fused_qkv"
    starts, sizes, owners, axis = _layout_args(name)

    def fn(dy, w, active):
        return su.sparse_input_grad(dy * 2, w, active, starts, sizes, owners, axis).square().sum()

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, backend=counter, fullgraph=True)
    dy, w = _data(name, three_d=True, seed=13)
    for mask in ([True, False, True, False], [False] * 4, [True] * 4):
        active = torch.tensor(mask)
        results = []
        for f in (fn, compiled):
            d, ww = dy.clone().requires_grad_(True), w.clone().requires_grad_(True)
            out = f(d, ww, active)
            out.backward()
            results.append((out, d.grad, ww.grad))
        for a, b in zip(*results):
            assert rel_err(b, a) <= FP32_RTOL or (torch.all(a == 0) and torch.all(b == 0))
    assert counter.frame_count == 1, "changing the mask must not recompile"


# ---------------------------------------------------------------------------------------------------------------
# Invalid inputs: errors name the op and the argument
# ---------------------------------------------------------------------------------------------------------------
_S, _Z, _O, _A = SMALL_LAYOUT  # helpers.py: the invalid-input tests of both sparse-grad files share it
_r = torch.randn


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: OPS.sparse_input_grad(_r(9), _r(9, 7), _A, _S, _Z, _O, 0), ValueError,
         "sparse_input_grad: dy must be 2-D"),
        (lambda: OPS.sparse_input_grad(_r(2, 3, 4, 9), _r(9, 7), _A, _S, _Z, _O, 0), ValueError, "dy must be 2-D"),
        (lambda: OPS.sparse_input_grad(_r(4, 9), _r(9, 7, 1), _A, _S, _Z, _O, 0), ValueError,
         r"sparse_input_grad: weight must be 2-D \[d_out, d_in\]"),
        (lambda: OPS.sparse_input_grad(_r(4, 9), _r(9), _A, _S, _Z, _O, 0), ValueError, "weight must be 2-D"),
        (lambda: OPS.sparse_input_grad(_r(4, 9).int(), _r(9, 7).int(), _A, _S, _Z, _O, 0), TypeError,
         "dy must be float32"),
        (lambda: OPS.sparse_input_grad(_r(4, 9), _r(9, 7, dtype=torch.float64), _A, _S, _Z, _O, 0), TypeError,
         "dy and weight must have the same dtype"),
        (lambda: OPS.sparse_input_grad(_r(4, 9), _r(9, 7, device="meta"), _A, _S, _Z, _O, 0), ValueError,
         "dy and weight must be on the same device"),
        (lambda: OPS.sparse_input_grad(_r(4, 8), _r(9, 7), _A, _S, _Z, _O, 0), ValueError,
         r"dy.size\(-1\) must equal d_out = weight.size\(0\)"),
        (lambda: OPS.sparse_input_grad(_r(2, 4, 7), _r(9, 7), _A, _S, _Z, _O, 1), ValueError,
         r"dy.size\(-1\) must equal d_out"),
        (lambda: OPS.sparse_input_grad(_r(4, 9), _r(9, 7), _A.float(), _S, _Z, _O, 0), TypeError,
         "active must be a bool"),
        (lambda: OPS.sparse_input_grad(_r(4, 9), _r(9, 7), _A[None], _S, _Z, _O, 0), ValueError,
         "active must be 1-D"),
        (lambda: OPS.sparse_input_grad(_r(4, 9), _r(9, 7), _A[:2], _S, _Z, _O, 0), ValueError,
         "active has 2 entries but the layout has 3 modules"),
        (lambda: OPS.sparse_input_grad(_r(4, 9), _r(9, 7), _A, [0, 3, 7], _Z, _O, 0), ValueError,
         r"out of bounds for d_out = weight.size\(0\) = 9"),
        (lambda: OPS.sparse_input_grad(_r(4, 9), _r(9, 7), _A, _S, _Z, _O, 1), ValueError,
         r"out of bounds for d_in = weight.size\(1\) = 7"),
        (lambda: OPS.sparse_input_grad(_r(4, 9), _r(9, 7), _A, [0, 2, 6], _Z, _O, 0), ValueError, "overlap"),
        (lambda: OPS.sparse_input_grad(_r(4, 9), _r(9, 7), _A, _S, [3, 0, 3], _O, 0), ValueError,
         r"sizes\[1\] must be positive"),
        (lambda: OPS.sparse_input_grad(_r(4, 9), _r(9, 7), _A, _S, _Z[:2], _O, 0), ValueError, "same length"),
        (lambda: OPS.sparse_input_grad(_r(4, 9), _r(9, 7), _A, _S, _Z, [0, 1, -1], 0), ValueError,
         r"owners\[2\]"),
        (lambda: OPS.sparse_input_grad(_r(4, 9), _r(9, 7), _A, _S, _Z, _O, 2), ValueError, "axis must be 0"),
    ],
)
def test_invalid_inputs(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize(
    "args,exc,match",
    [
        ((_r(4, 9, device="meta"), _r(9, 7, 1, device="meta"), _A), ValueError, "weight must be 2-D"),
        ((_r(4, 9, device="meta"), _r(9, 7, device="meta", dtype=torch.float64), _A), TypeError,
         "dy and weight must have the same dtype"),
        ((_r(4, 8, device="meta"), _r(9, 7, device="meta"), _A), ValueError, r"dy.size\(-1\) must equal d_out"),
        ((_r(4, 9, device="meta"), _r(9, 7, device="meta"), _A.to("meta")), ValueError,
         "active must be a CPU tensor"),
        ((_r(4, 9, device="meta"), _r(9, 7, device="meta"), _A[:2]), ValueError, "one entry per module"),
    ],
)
def test_fake_kernel_checks(args, exc, match):
    """Meta inputs go through the fake kernel, which applies the same rules and names the same arguments."""
    with pytest.raises(exc, match=match):
        OPS.sparse_input_grad(*args, _S, _Z, _O, 0)


def test_fake_kernel_output_metadata():
    dy, w = _r(B, T, 9, device="meta", dtype=torch.bfloat16), _r(9, 7, device="meta", dtype=torch.bfloat16)
    dx = OPS.sparse_input_grad(dy, w, _A, _S, _Z, _O, 0)
    assert dx.shape == (B, T, 7) and dx.dtype == torch.bfloat16 and dx.device.type == "meta"


def test_info_lists_the_op():
    from mat_kernels.info import CPP_OPS, _extension_rows

    assert "sparse_input_grad" in CPP_OPS
    row = dict(_extension_rows())["  mat_kernels::sparse_input_grad"]
    assert "cpu" in row and "fake" in row and "autograd" in row
