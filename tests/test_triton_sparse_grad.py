"""The Triton kernels of the sparse-update backward (mat_kernels/kernels/triton_sparse_grad.py) against a float64
oracle, in Triton's CPU interpreter (fp32; the interpreter's bf16 is not trusted) and, GPU-marked, on CUDA; and the
sparse layers' routing to them (one launch for dW and db, one for the detach dX).

Oracle: ``dW = M ⊙ (dYᵀ X)``, ``db = m ⊙ Σ_t dY``, ``dX = dY (M ⊙ W)`` in float64, M the 0/1 mask of the active
rows or columns expanded from the layout (an independent expansion: Python loops over the ranges)."""
import pytest
import torch
from helpers import FP32_RTOL, rel_err, requires_cuda

import mat_kernels as mk

pytest.importorskip("triton")
from mat_kernels import backend as _backend  # noqa: E402

if _backend.triton_mode()[0] == "unavailable":
    pytest.skip("Triton cannot run here (no CUDA device, TRITON_INTERPRET unset)", allow_module_level=True)

from mat_kernels.kernels import triton_sparse_grad as tk  # noqa: E402
from mat_kernels.nn import sparse_function as sl  # noqa: E402

_device_masks = tk.device_masks

ON_CUDA = _backend.triton_mode()[0] == "native"
DEVICE = "cuda" if ON_CUDA else "cpu"

# (name, d_in, d_out, layer kwargs, axis)
LAYOUTS = {
    "qkv_rows": (19, 3 * 4 * 5, dict(row_blocks=mk.fused_qkv_heads(4, 5)), 0),
    "cols_uneven": (37, 11, dict(col_blocks=[(0, 7), (7, 13), (20, 17)]), 1),
    "rows_gap": (9, 150, dict(row_blocks=[(0, 40), (60, 70), (130, 20)]), 0),  # rows 40-59 in no block
}


def _expanded(layout: mk.WeightBlocks, active, length: int) -> torch.Tensor:
    m = torch.zeros(length, dtype=torch.bool)
    for i, ranges in layout.entries():
        for start, size in ranges:
            m[start:start + size] = bool(active[i])
    return m


def _case(name, active, tokens=33, seed=0):
    d_in, d_out, kw, axis = LAYOUTS[name]
    layout = mk.WeightBlocks.build(d_out, d_in, **kw)
    g = torch.Generator().manual_seed(seed)
    x, w, dy = torch.randn(tokens, d_in, generator=g), torch.randn(d_out, d_in, generator=g), \
        torch.randn(tokens, d_out, generator=g)
    blocked = _expanded(layout, active, d_out if axis == 0 else d_in)
    rows = blocked if axis == 0 else torch.ones(d_out, dtype=torch.bool)
    cols = blocked if axis == 1 else torch.ones(d_in, dtype=torch.bool)
    return layout, x, w, dy, rows, cols


MASKS = {"one": lambda M: [i == 1 for i in range(M)], "alternate": lambda M: [i % 2 == 0 for i in range(M)],
         "all_but_one": lambda M: [i != M - 1 for i in range(M)], "none": lambda M: [False] * M}


@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
def test_kernels_match_the_float64_oracle(name, mask, strided):
    M = mk.WeightBlocks.build(LAYOUTS[name][1], LAYOUTS[name][0], **LAYOUTS[name][2]).num_modules
    layout, x, w, dy, rows, cols = _case(name, MASKS[mask](M), seed=hash((name, mask)) % 1000)
    if strided:  # column-major X and W, a dY with a row stride beyond its width
        x, w = x.t().contiguous().t(), w.t().contiguous().t()
        dy = torch.cat([dy, torch.randn_like(dy)], 1)[:, :dy.shape[1]]
    dev = [t.to(DEVICE) for t in (x, w, dy)]
    masks = tk.device_masks(rows, cols, torch.device(DEVICE), tk.tile_config(torch.float32)["BK"], LAYOUTS[name][3])
    full = rows[:, None] & cols[None, :]
    want_dw = (dy.double().t() @ x.double()) * full
    want_db = dy.double().sum(0) * rows
    want_dx = dy.double() @ (w.double() * full)
    own = LAYOUTS[name][3] == 0  # row blocks own their bias entries; column blocks share the bias
    dw, db = tk.masked_weight_grad(dev[2], dev[0], masks, bias="own" if own else "shared", allow_tf32=False)
    dx = tk.masked_input_grad(dev[2], dev[1], masks, allow_tf32=False)
    assert torch.equal(dw.cpu()[~full], torch.zeros(int((~full).sum()))), "frozen entries must be exactly zero"
    assert rel_err(dw, want_dw) <= FP32_RTOL and rel_err(dx, want_dx) <= FP32_RTOL
    if own:
        assert torch.equal(db.cpu()[~rows], torch.zeros(int((~rows).sum())))
        assert rel_err(db, want_db) <= FP32_RTOL
    else:
        assert rel_err(db, dy.double().sum(0)) <= FP32_RTOL
    dw2, none = tk.masked_weight_grad(dev[2], dev[0], masks, bias=None, allow_tf32=False)
    assert none is None and torch.equal(dw2, dw)


def test_tile_table_lists_only_tiles_with_an_active_row():
    rows = torch.zeros(200, dtype=torch.bool)
    rows[70:75] = True
    rows[170:190] = True
    m = tk.device_masks(rows, torch.ones(3, dtype=torch.bool), torch.device("cpu"), 32)
    assert m["n_tiles"] == 2 and m["tiles"].tolist() == [64, 160]
    none = tk.device_masks(torch.zeros(5, dtype=torch.bool), torch.ones(3, dtype=torch.bool), torch.device("cpu"), 32)
    assert none["n_tiles"] == 0


@pytest.fixture
def triton_on_cpu(monkeypatch):
    """Route the CPU tensors of the sparse layers to the Triton kernels (interpreter), as CUDA tensors are."""
    if ON_CUDA:
        yield "cuda"
        return
    monkeypatch.setattr(sl, "TRITON_DEVICES", {"cpu"})
    yield "cpu"


@pytest.mark.parametrize("mask", ["alternate", "all"])
@pytest.mark.parametrize("frozen_backward", ["dw", "detach"])
@pytest.mark.parametrize("name", ["qkv_rows", "cols_uneven"])
def test_layers_route_to_the_kernels_and_match_the_ops(name, frozen_backward, mask, triton_on_cpu, monkeypatch):
    """Any active block: dW and db in one launch (all-active layers too), the detach dX of a partly active one in
    another; the result equals the ATen route's; the device masks are built once per mask, not per step."""
    d_in, d_out, kw, axis = LAYOUTS[name]
    torch.manual_seed(0)
    ref = mk.SparseUpdateLinear(d_in, d_out, frozen_backward=frozen_backward, **kw).to(triton_on_cpu)
    M = ref.num_modules
    active = torch.tensor(MASKS["alternate"](M) if mask == "alternate" else [True] * M)
    ref.set_active(active)
    x = torch.randn(2, 17, d_in, device=triton_on_cpu)
    dy = torch.randn(2, 17, d_out, device=triton_on_cpu)
    built = []
    monkeypatch.setattr(tk, "device_masks", lambda *a, **k: built.append(1) or _device_masks(*a, **k))
    grads = []
    for route in ("triton", "triton", "aten"):
        if route == "aten":
            monkeypatch.setattr(sl, "TRITON_DEVICES", set())
        xi = x.clone().requires_grad_(True)
        ref(xi).backward(dy)
        want = "dense" if route == "aten" and mask == "all" else route  # off the Triton devices: a plain linear
        assert sl.LAST_ROUTE["route"] == want, sl.LAST_ROUTE
        grads.append((xi.grad, ref.weight.grad, ref.bias.grad))
        ref.zero_grad(set_to_none=True)
    assert len(built) == 1  # two steps with one mask: one build
    for a, b in zip(grads[0], grads[2]):
        assert rel_err(a, b.double()) <= FP32_RTOL


def test_cpu_tensors_take_the_aten_plans_and_say_so():
    lin = mk.SparseUpdateLinear(8, 12, row_blocks=3)
    lin.set_active([True, False, True])
    lin(torch.randn(4, 8, requires_grad=True)).sum().backward()
    assert sl.LAST_ROUTE == {"route": "aten", "reason": "cpu tensors: the C++ ops' plans"}


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_layer_backward_against_the_oracle(dtype):
    """On a GPU: the routed backward (Triton kernels) of a BERT-base-shaped fused QKV with interleaved heads."""
    from helpers import TF32_RTOL

    from mat_kernels.testing.tolerances import SPARSE_GRAD_RTOL

    torch.manual_seed(0)
    lin = mk.SparseUpdateLinear(768, 2304, row_blocks=mk.fused_qkv_heads(12, 64), frozen_backward="detach")
    lin = lin.to("cuda", dtype)
    active = torch.arange(12) % 3 == 0
    lin.set_active(active)
    x = torch.randn(4, 128, 768, device="cuda", dtype=dtype, requires_grad=True)
    dy = torch.randn(4, 128, 2304, device="cuda", dtype=dtype)
    lin(x).backward(dy)
    assert sl.LAST_ROUTE["route"] == "triton"
    rows = _expanded(lin.layout, active, 2304).cuda()
    x2, dy2, w = x.detach().double().reshape(-1, 768), dy.double().reshape(-1, 2304), lin.weight.detach().double()
    tol = SPARSE_GRAD_RTOL[torch.bfloat16] if dtype == torch.bfloat16 else \
        TF32_RTOL if torch.backends.cuda.matmul.allow_tf32 else FP32_RTOL
    assert rel_err(lin.weight.grad, (dy2.t() @ x2) * rows[:, None]) <= tol
    assert rel_err(lin.bias.grad, dy2.sum(0) * rows) <= tol
    assert rel_err(x.grad.reshape(-1, 768), dy2 @ (w * rows[:, None])) <= tol


# ---------------------------------------------------------------------------------------------------------------
# the masked Adam/AdamW kernel (mat_kernels/kernels/triton_masked_adam.py) against a float64 Adam
# ---------------------------------------------------------------------------------------------------------------
def _adam64(p, g, m, v, vmax, t, lr, betas, eps, wd, adamw, amsgrad, maximize):
    """One Adam/AdamW step in float64 at step count t (torch's formulas, written out)."""
    p, g, m, v = (a.double() for a in (p, g, m, v))
    g = -g if maximize else g
    if adamw:
        p = p * (1 - lr * wd)
    else:
        g = g + wd * p
    m = betas[0] * m + (1 - betas[0]) * g
    v = betas[1] * v + (1 - betas[1]) * g * g
    vmax = torch.maximum(vmax.double(), v) if amsgrad else None
    denom = (vmax if amsgrad else v).sqrt() / (1 - betas[1] ** t) ** 0.5 + eps
    return p - lr / (1 - betas[0] ** t) * m / denom, m, v, vmax


@pytest.mark.parametrize("shape,axis", [((37, 150), 1), ((150, 37), 0), ((5, 7), 1)])
@pytest.mark.parametrize("flags", ["adamw", "adam_l2", "adamw_amsgrad_max"])
def test_masked_adam_kernel_against_float64(shape, axis, flags):
    """Active runs (own step counts) against float64 Adam; frozen runs of the weight and of every state tensor bit
    for bit unchanged; a strided (transposed) weight and a companion tensor in the same launch."""
    from mat_kernels.kernels.triton_masked_adam import masked_adam_step
    from mat_kernels.testing.tolerances import MASKED_ADAM_RTOL

    adamw, amsgrad, maximize = flags.startswith("adamw"), "amsgrad" in flags, flags.endswith("max")
    g = torch.Generator().manual_seed(len(flags) + shape[0])
    N, K = shape
    new = lambda *s: torch.randn(*s, generator=g).to(DEVICE)  # noqa: E731
    p, gr = new(K, N).t(), new(N, K)  # p: a strided view, as a transposed weight's
    m, v = new(K, N).t() * 0.1, new(K, N).t().square() * 0.01
    vmax = v * 1.5
    L = shape[axis]
    R = min(4, L)
    run = torch.tensor([i * R // L for i in range(L)], dtype=torch.int32, device=DEVICE)
    act = torch.tensor([1, 0, 1, 1][:R], dtype=torch.int8, device=DEVICE)
    steps = torch.tensor([3.0, 5.0, 1.0, 7.0][:R], device=DEVICE)
    c = [new(23), new(23), new(23) * 0.1, new(23).square() * 0.01, new(23).square() * 0.02, torch.tensor(2.0)]
    before = [t.clone() for t in (p, m, v, vmax, *c[:5])]
    hp = dict(lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    masked_adam_step(p, gr, (m, v, vmax if amsgrad else None), run, act, steps, axis=axis, amsgrad=amsgrad,
                     adamw=adamw, maximize=maximize, companion=(*c[:5], c[5].to(DEVICE)), **hp)
    hp64 = dict(lr=0.01, betas=(0.9, 0.99), eps=1e-8, wd=0.1, adamw=adamw, amsgrad=amsgrad, maximize=maximize)
    for r in range(R):
        ix = (run == r).nonzero().flatten()
        take = (lambda t: t[ix]) if axis == 0 else (lambda t: t[:, ix])  # noqa: E731
        got = [take(t) for t in (p, m, v, vmax)]
        old = [take(t) for t in before[:4]]
        if not act[r]:
            assert all(torch.equal(a, b) for a, b in zip(got, old)), r
            continue
        want = _adam64(old[0], take(gr), old[1], old[2], old[3], float(steps[r]), **hp64)
        for a, b in zip(got, want):
            if b is not None:
                assert rel_err(a, b) <= MASKED_ADAM_RTOL, (r, rel_err(a, b))
    want = _adam64(*before[4:9], 2.0, **hp64)  # the companion at its own step 2
    for a, b in zip((c[0], c[2], c[3], c[4]), want):
        if b is not None:
            assert rel_err(a, b) <= MASKED_ADAM_RTOL


@requires_cuda
def test_cuda_masked_adam_kernel_against_float64():
    """On a GPU, the native kernel (fp32) on an output-projection-shaped weight with interleaved active heads."""
    test_masked_adam_kernel_against_float64((768, 768), 1, "adamw_amsgrad_max")
