"""estimate_lambda_max / layer_grams against the float64 per-sample-gradient oracle.

Every test draws fresh random inputs (seeded per test for reproducibility). Triton kernels run in the CPU
interpreter here (tests/conftest.py) and natively where CUDA exists.
"""
import warnings

import pytest
import torch
from helpers import FP32_RTOL, TF32_RTOL, backends, rel_err, requires_cuda

import mat_kernels as mk
from mat_kernels.ops.gram_dispatch import route_of
from mat_kernels.testing.reference import (
    lambda_max_eigvalsh,
    per_sample_grads_func,
    per_sample_grads_loop,
    reference_lambda_max,
)

BACKENDS = backends()
EXACT_ROUTES = ["psg", "ghost"]


def _inputs(n, T, d_in, d_out, *, seed, device="cpu", dtype=torch.float32, two_d=False):
    g = torch.Generator().manual_seed(seed)
    shape_x = (n, d_in) if two_d else (n, T, d_in)
    shape_y = (n, d_out) if two_d else (n, T, d_out)
    x = torch.randn(shape_x, generator=g).to(device=device, dtype=dtype)
    dy = torch.randn(shape_y, generator=g).to(device=device, dtype=dtype)
    return x, dy


def _check(x, dy, *, route, device, backend, rtol=FP32_RTOL, **blocks):
    res = mk.estimate_lambda_max(x, dy, method=route, backend=backend, return_grams=True, **blocks)
    lam_ref, grams_ref = reference_lambda_max(x.cpu(), dy.cpu(), **blocks)
    assert res.values.dtype == torch.float32 and res.grams.dtype == torch.float32
    assert res.values.shape == lam_ref.shape
    assert rel_err(res.grams, grams_ref) <= rtol
    # per module, not just overall: each λ within rtol of its own reference
    per_module = ((res.values.double().cpu() - lam_ref).abs() / lam_ref.abs()).max().item()
    assert per_module <= rtol, per_module
    return res


# --------------------------------------------------------------------------------------------------------------
# oracles
# --------------------------------------------------------------------------------------------------------------
def test_oracles_agree():
    x, dy = _inputs(4, 5, 7, 6, seed=1)
    gw1, gb1 = per_sample_grads_loop(x, dy, bias=True)
    gw2, gb2 = per_sample_grads_func(x, dy, bias=True)
    assert gw1.dtype == torch.float64
    torch.testing.assert_close(gw1, gw2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gb1, gb2, rtol=1e-12, atol=1e-12)
    # an explicit check of the definition for one sample: dW_0 = Σ_t dy_0t x_0tᵀ
    torch.testing.assert_close(gw1[0], dy[0].double().T @ x[0].double())


def test_lambda_max_eigvalsh_matches_numpy():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(3, 6, 6, generator=g, dtype=torch.float64)
    grams = a @ a.transpose(1, 2)
    import numpy as np

    want = np.linalg.eigvalsh(grams.numpy())[:, -1]
    np.testing.assert_allclose(lambda_max_eigvalsh(grams).numpy(), want, rtol=1e-12)


# --------------------------------------------------------------------------------------------------------------
# exact routes, odd shapes, every layout
# --------------------------------------------------------------------------------------------------------------
SHAPES = [  # n, T, d_in, d_out
    (1, 1, 9, 12),
    (3, 7, 19, 24),
    (17, 1, 13, 20),
    (3, 33, 21, 15),
]


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("route", EXACT_ROUTES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "n{}_T{}_{}x{}".format(*s))
def test_row_blocks_with_bias(device, backend, route, shape):
    n, T, d_in, d_out = shape
    x, dy = _inputs(n, T, d_in, d_out, seed=hash(shape) % 1000, device=device)
    heads = 4 if d_out % 4 == 0 else 3
    res = _check(x, dy, route=route, device=device, backend=backend, row_blocks=heads, bias=True)
    assert route_of(res.routes[0]) == route and res.routes[0].startswith(backend)  # e.g. "triton-fused", psg
    assert res.backend.startswith(backend)


TRITON_BACKENDS = [b for b in BACKENDS if b[1] == "triton"]


@pytest.mark.parametrize("device,backend", TRITON_BACKENDS)
@pytest.mark.parametrize("n,T,d_in,d_out,blocks", [
    (33, 3, 7, 10, {"row_blocks": [[(0, 3), (6, 2)], [(3, 3)]], "bias": True}),  # above FUSED_MAX_N
    (40, 2, 5, 9, {"col_blocks": [(0, 2), (2, 3)]}),
])
def test_two_kernel_psg_route_above_the_fused_n(device, backend, n, T, d_in, d_out, blocks):
    """n > FUSED_MAX_N runs the two-kernel psg route (per-sample gradients in a scratch, then the Gram kernel)."""
    from mat_kernels.kernels.triton_segment_grams_fused import FUSED_MAX_N

    assert n > FUSED_MAX_N
    x, dy = _inputs(n, T, d_in, d_out, seed=n, device=device)
    _check(x, dy, route="psg", device=device, backend=backend, **blocks)


@pytest.mark.parametrize("device,backend", TRITON_BACKENDS)
@pytest.mark.parametrize("n,bias", [(5, True), (19, False), (32, True)])
def test_fused_two_kernel_and_ghost_agree(device, backend, n, bias):
    """The fused kernel, the two-kernel route and the ghost kernel, each adding segments into their modules
    (a module of two segments included), agree; the whole path against the float64 oracle through _check."""
    from mat_kernels.kernels import triton_segment_grams as tg
    from mat_kernels.kernels import triton_segment_grams_fused as tf

    x, dy = _inputs(n, 3, 11, 14, seed=n, device=device)
    starts, sizes, owners = (0, 4, 9), (4, 5, 5), (0, 1, 0)
    fused = tf.fused_segment_grams(x, dy, starts, sizes, owners, add_one=bias, allow_tf32=False)
    seg = tg.psg_segment_grams(x, dy, starts, sizes, add_one=bias, allow_tf32=False)
    two = tg.psg_segment_grams(x, dy, starts, sizes, add_one=bias, allow_tf32=False, seg_owners=owners)
    ghost = tg.ghost_segment_grams(x, dy, starts, sizes, add_one=bias, allow_tf32=False, seg_owners=owners)
    local = tf.local_segment_grams(x, dy, starts, sizes, owners, add_one=bias, allow_tf32=False)
    for got in (two, ghost, local, torch.stack([seg[0] + seg[2], seg[1]])):
        assert rel_err(fused, got.double()) <= FP32_RTOL
    _check(x, dy, route="psg", device=device, backend=backend, row_blocks=[[(0, 4), (9, 5)], [(4, 5)]], bias=bias)


@pytest.mark.parametrize("device,backend", TRITON_BACKENDS)
@pytest.mark.parametrize("kernel,n,T,d_in,d_out,blocks", [
    ("triton-local", 64, 2, 70, 9, {"row_blocks": [[(0, 3), (6, 2)], [(3, 3)]], "bias": True}),  # n = 64, 2 col tiles
    ("triton-local", 3, 5, 6, 75, {"row_blocks": [(0, 40), (40, 35)], "bias": True}),  # a segment over 2 row tiles
    ("triton-local", 17, 3, 66, 8, {"col_blocks": [(0, 30), (30, 36)]}),  # column blocks: shared side dy, 2 row tiles
    ("triton-fused", 7, 4, 5, 12, {"row_blocks": 3, "bias": True}),
    ("triton-psg", 9, 3, 7, 10, {"row_blocks": [[(0, 3), (6, 2)], [(3, 3)]], "bias": True}),
])
def test_each_psg_variant_against_the_oracle(device, backend, kernel, n, T, d_in, d_out, blocks):
    """Each psg variant, forced through the dispatcher (``kernel=``), through the whole layer path: float64
    oracle, and the result names the kernel that ran."""
    x, dy = _inputs(n, T, d_in, d_out, seed=n + T, device=device)
    res = mk.estimate_lambda_max(x, dy, kernel=kernel, return_grams=True, **blocks)
    assert res.routes == (kernel,)
    _, grams_ref = reference_lambda_max(x.cpu(), dy.cpu(), **blocks)
    assert rel_err(res.grams, grams_ref) <= FP32_RTOL


@pytest.mark.parametrize("device,backend", TRITON_BACKENDS)
def test_tile_local_kernel_reuses_its_slots(device, backend):
    """With a scratch budget of one slot, one persistent program takes every work item in turn, rewriting its
    slot: the same Grams as with a program per work item."""
    from mat_kernels.kernels import triton_segment_grams_fused as tf

    x, dy = _inputs(6, 3, 70, 75, seed=21, device=device)
    args = (x, dy, (0, 40, 70), (40, 30, 5), (0, 1, 0))
    one = tf.local_segment_grams(*args, add_one=True, allow_tf32=False, scratch_bytes=1)
    many = tf.local_segment_grams(*args, add_one=True, allow_tf32=False)
    _, ref = reference_lambda_max(x.cpu(), dy.cpu(), row_blocks=[[(0, 40), (70, 5)], [(40, 30)]], bias=True)
    assert rel_err(one, ref) <= FP32_RTOL and rel_err(many, ref) <= FP32_RTOL
    with pytest.raises(ValueError, match="at most 64 samples"):
        tf.local_segment_grams(torch.zeros(65, 1, 2), torch.zeros(65, 1, 2), (0,), (2,), (0,), add_one=False,
                               allow_tf32=False)


def test_psg_variants_are_ranked_by_their_predicted_time():
    """The Triton psg kernels cost the same multiply-adds; the dispatcher ranks them by the byte model's predicted
    time (psg_seconds) and says so; n > 64 leaves the two-kernel route alone, with the reasons."""
    from mat_kernels.kernels.triton_segment_grams_fused import psg_seconds
    from mat_kernels.ops.gram_dispatch import GramInputs, TritonFused, TritonLocal, TritonPsg

    small = psg_seconds(8, 32, 769, 2304, 4)
    assert all(small[k] > 0 for k in ("fused", "local", "two-kernel"))
    big = psg_seconds(65, 128, 769, 2304, 2)
    assert big["fused"] is None and big["local"] is None and big["two-kernel"] > 0
    inp = GramInputs(65, 128, 768, 2304, True, torch.bfloat16, torch.device("cpu"))
    assert "65 samples > 64" in "; ".join(TritonLocal.not_supported_reasons(inp))
    assert "65 samples > 32" in "; ".join(TritonFused.not_supported_reasons(inp))
    assert TritonPsg.predicted_seconds(inp) == big["two-kernel"]


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_tf32_switch(device, backend):
    x, dy = _inputs(4, 8, 16, 16, seed=11, device=device)
    lam_ref, _ = reference_lambda_max(x.cpu(), dy.cpu(), row_blocks=2)
    res = mk.estimate_lambda_max(x, dy, row_blocks=2, allow_tf32=True, backend=backend)
    assert rel_err(res.values, lam_ref) <= TF32_RTOL


def test_auto_route_follows_cost_model():
    x, dy = _inputs(8, 1, 32, 32, seed=12, two_d=True)
    assert mk.estimate_lambda_max(x, dy, row_blocks=2, backend="torch").routes == ("torch-ghost",)
    x, dy = _inputs(2, 64, 16, 16, seed=12)
    assert mk.estimate_lambda_max(x, dy, row_blocks=2, backend="torch").routes == ("torch-psg",)
    c = mk.route_costs(32, 128, 769, 2304, sketch_size=192)
    assert c["psg"] < c["ghost"] and c["sketch"] < c["psg"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("device,backend", BACKENDS)
def test_low_precision_inputs(device, backend, dtype):
    """16-bit inputs, fp32 accumulation: exact to fp32 rounding on the (already rounded) 16-bit values.

    On CPU the interpreter cannot do 16-bit dots, so inputs are upcast (with a warning); GPU runs real 16-bit
    dots, checked in test_gpu_low_precision_vs_pytorch.
    """
    if device == "cuda":
        pytest.skip("GPU low-precision accuracy is tested against PyTorch's own error below")
    x, dy = _inputs(3, 5, 12, 8, seed=13, device=device, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = mk.estimate_lambda_max(x, dy, row_blocks=2, bias=True, backend=backend, return_grams=True)
    lam_ref, _ = reference_lambda_max(x, dy, row_blocks=2, bias=True)  # float64 of the 16-bit values
    assert rel_err(res.values, lam_ref) <= FP32_RTOL


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("route", EXACT_ROUTES + ["psg:triton-fused", "psg:triton-local", "psg:triton-psg"])
def test_gpu_low_precision_vs_pytorch(route, dtype):
    """flash-attention's rule: error vs the fp64 reference ≤ 2× that of plain PyTorch at the same dtype.
    ``psg:<kernel>`` forces that psg kernel (the tile-local one keeps its per-sample tiles in 16 bits)."""
    route, kernel = route.split(":") if ":" in route else (route, "auto")
    x, dy = _inputs(8, 64, 96, 192, seed=14, device="cuda", dtype=dtype)
    blocks = dict(row_blocks=mk.fused_qkv_heads(2, 32), bias=True)
    lam_ref, _ = reference_lambda_max(x.cpu(), dy.cpu(), **blocks)
    res = mk.estimate_lambda_max(x, dy, method=route, backend="triton", kernel=kernel, **blocks)
    assert kernel == "auto" or res.routes == (kernel,)
    # plain PyTorch at this dtype: per-sample gradients and Gram in 16-bit
    gw = torch.einsum("ntr,ntc->nrc", dy, x)
    gb = dy.sum(1)
    grams = torch.stack([torch.cat([gw[:, r0:r0 + s].flatten(1) for r0, s in m] +
                                   [gb[:, r0:r0 + s] for r0, s in m], 1) for m in blocks["row_blocks"]])
    lam_pt = torch.linalg.eigvalsh((grams @ grams.transpose(1, 2)).float())[..., -1]
    assert rel_err(res.values, lam_ref) <= 2 * max(rel_err(lam_pt, lam_ref), 1e-6)


@requires_cuda
@pytest.mark.parametrize("kernel", ["triton-fused", "triton-local", "triton-psg", "triton-ghost"])
def test_gpu_layer_call_captures_in_a_cuda_graph(kernel):
    """With check_finite=False one layer call has no host sync or copy (tests/test_triton_aot.py checks that
    statically): it is captured in a CUDA graph and replayed on new values in the same buffers."""
    x, dy = _inputs(8, 32, 96, 192, seed=15, device="cuda")
    kw = dict(row_blocks=mk.fused_qkv_heads(2, 32), bias=True, kernel=kernel, check_finite=False)
    eager = mk.layer_grams(x, dy, **kw).grams.double()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile, tune and fill the caches before capturing
        for _ in range(2):
            mk.layer_grams(x, dy, **kw)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = mk.layer_grams(x, dy, **kw).grams
    x.mul_(2)  # new values in the captured buffer: every Gram scales by exactly 4
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(out, 4 * eager) <= FP32_RTOL


# --------------------------------------------------------------------------------------------------------------
# sketch
# --------------------------------------------------------------------------------------------------------------
def _lowrank_layer(n, T, d_in, d_out, seed):
    g = torch.Generator().manual_seed(seed)
    base_x, base_y = torch.randn(8, d_in, generator=g), torch.randn(8, d_out, generator=g)
    x = torch.randn(n, T, 8, generator=g) @ base_x + 0.3 * torch.randn(n, T, d_in, generator=g)
    dy = torch.randn(n, T, 8, generator=g) @ base_y + 0.3 * torch.randn(n, T, d_out, generator=g)
    return x, dy


def test_sketch_gram_is_unbiased():
    """E[sketched Gram] = exact Gram: the mean over independent seeds converges to it."""
    x, dy = _lowrank_layer(4, 6, 96, 16, seed=15)
    exact = mk.layer_grams(x, dy, row_blocks=2, bias=True, method="psg", backend="torch").grams.double()
    seeds = 200
    mean = sum(
        mk.layer_grams(x, dy, row_blocks=2, bias=True, method="sketch", sketch_size=16, seed=s,
                       backend="torch").grams.double()
        for s in range(seeds)
    ) / seeds
    one = mk.layer_grams(x, dy, row_blocks=2, bias=True, method="sketch", sketch_size=16, seed=0,
                         backend="torch").grams.double()
    # one sketch is off by tens of %, the mean of 200 by ~1/√200 of that
    assert rel_err(one, exact) > 0.05
    assert rel_err(mean, exact) < rel_err(one, exact) / 4


def test_sketch_default_accuracy():
    """Default sketch size keeps the median λmax error within 5% on a QKV-like layer (d_in = 768)."""
    x, dy = _lowrank_layer(16, 32, 768, 192, seed=16)
    blocks = dict(row_blocks=mk.fused_qkv_heads(4, 16), bias=True)
    exact = mk.estimate_lambda_max(x, dy, method="psg", backend="torch", **blocks).values.double()
    res = mk.estimate_lambda_max(x, dy, method="sketch", backend="torch", **blocks)
    assert res.routes == ("sketch+torch-psg",)
    err = (res.values.double() / exact - 1).abs()
    assert err.median().item() <= 0.05, err


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_sketch_kernel_matches_torch(device, backend):
    """The sketch route through the Triton kernels equals the same sketch through PyTorch (same seed)."""
    x, dy = _inputs(3, 5, 40, 12, seed=17, device=device)
    kw = dict(row_blocks=3, bias=True, method="sketch", sketch_size=8, seed=3)
    a = mk.layer_grams(x, dy, backend=backend, **kw).grams
    b = mk.layer_grams(x, dy, backend="torch", **kw).grams
    assert rel_err(a, b) <= FP32_RTOL


def test_sketch_wider_than_layer_is_exact_and_says_so():
    x, dy = _inputs(3, 4, 8, 6, seed=18)
    with pytest.warns(UserWarning, match="sketch_size"):
        res = mk.estimate_lambda_max(x, dy, method="sketch", sketch_size=64, backend="torch")
    assert res.routes == ("torch-psg",)


# --------------------------------------------------------------------------------------------------------------
# large-n solver
# --------------------------------------------------------------------------------------------------------------
def test_subspace_solver_large_n():
    g = torch.Generator().manual_seed(19)
    n = 300
    j = torch.randn(3, n, 40, generator=g, dtype=torch.float64) * torch.linspace(3, 0.1, 40, dtype=torch.float64)
    grams = j @ j.transpose(1, 2)
    exact = torch.linalg.eigvalsh(grams)[..., -1]
    got = mk.lambda_max(grams, solver="subspace", tol=1e-4)
    assert ((got - exact).abs() / exact).max() <= 1e-4
    assert (got <= exact * (1 + 1e-12)).all()  # a Rayleigh quotient never exceeds λmax
    assert mk.lambda_max(grams.float()).dtype == torch.float32


def test_estimate_lambda_max_large_n_uses_subspace():
    x, dy = _inputs(260, 1, 24, 16, seed=20, two_d=True)
    res = mk.estimate_lambda_max(x, dy, row_blocks=2, bias=True, backend="torch")
    assert res.solver == "subspace"
    lam_ref, _ = reference_lambda_max(x, dy, row_blocks=2, bias=True)
    assert rel_err(res.values, lam_ref) <= 1e-4


def test_subspace_nonconvergence_warns():
    g = torch.Generator().manual_seed(21)
    a = torch.randn(1, 300, 300, generator=g, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="did not reach"):
        mk.lambda_max(a @ a.transpose(1, 2), solver="subspace", tol=1e-12, max_iter=2)


# --------------------------------------------------------------------------------------------------------------
# fallback visibility
# --------------------------------------------------------------------------------------------------------------
def test_fallback_warns_once_and_is_inspectable(monkeypatch):
    from mat_kernels import backend as _backend

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(_backend, "_WARNED", set())
    x, dy = _inputs(2, 3, 4, 4, seed=22)
    if torch.cuda.is_available():
        pytest.skip("CPU tensors on a CUDA machine: covered by the same path, message differs")
    with pytest.warns(UserWarning, match="using the PyTorch implementation"):
        res = mk.estimate_lambda_max(x, dy)
    assert res.backend == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mk.estimate_lambda_max(x, dy)  # second call: no warning
    with pytest.raises(ValueError, match="backend='triton'") as e:  # every Triton kernel, with its reason
        mk.estimate_lambda_max(x, dy, backend="triton")
    assert all(f"triton-{k}: Triton cannot run here" in str(e.value) for k in ("fused", "local", "psg", "ghost"))
