"""The Gram dispatcher (mat_kernels.ops.gram_dispatch): every implementation forced against the float64 oracle,
what a forced kernel that cannot run says, what ``auto`` picks, what ``routes`` names, and the FLOPs of the Grams
counted by ``FlopCounterMode`` through the formula of ``mat_kernels::segment_grams`` (the dispatcher's cost)."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import FP32_RTOL, rel_err
from models import TinyLM, small_cnn
from torch.utils.flop_counter import FlopCounterMode

import mat_kernels as mk
from mat_kernels import backend as _backend
from mat_kernels.ops import gram_dispatch as gd
from mat_kernels.ops import segment_grams
from mat_kernels.testing.reference import reference_lambda_max
from mat_kernels.train.flops import FlopsLedger, count_flops

TRITON_RUNS = _backend.triton_unusable(torch.device("cpu")) is None  # the interpreter (CI) or a stand-in
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNELS = [k for k, impl in gd.KERNELS.items() if impl.BACKEND == "torch" or TRITON_RUNS or DEVICE == "cuda"]


def _inputs(n, T, d_in, d_out, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, T, d_in, generator=g).to(DEVICE), torch.randn(n, T, d_out, generator=g).to(DEVICE))


# --------------------------------------------------------------------------------------------------------------
# every implementation, forced
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("n,T,d_in,d_out", [(1, 1, 5, 7), (3, 7, 9, 11), (17, 2, 13, 6)],
                         ids=lambda v: str(v))
def test_every_kernel_forced_against_the_oracle(kernel, n, T, d_in, d_out):
    """Row modules (one of two separate ranges, with bias) and column modules of one layer through one forced
    kernel: each layout's Grams against the float64 oracle, and ``routes`` names the kernel for both layouts."""
    x, dy = _inputs(n, T, d_in, d_out, seed=n * 100 + T)
    rows = [[(0, 2), (d_out - 3, 3)], [(2, d_out - 5)]]
    cols = [(0, 4), (4, d_in - 4)]
    res = mk.estimate_lambda_max(x, dy, row_blocks=rows, col_blocks=cols, bias=True, kernel=kernel,
                                 return_grams=True)
    assert res.routes == (kernel, kernel)
    assert res.backend.startswith(gd.KERNELS[kernel].BACKEND)
    _, ref_rows = reference_lambda_max(x.cpu(), dy.cpu(), row_blocks=rows, bias=True)
    _, ref_cols = reference_lambda_max(x.cpu(), dy.cpu(), col_blocks=cols)
    assert rel_err(res.grams, torch.cat([ref_rows, ref_cols])) <= FP32_RTOL


@pytest.mark.parametrize("kernel", [k for k in KERNELS if gd.KERNELS[k].ROUTE == "psg"])
def test_sketch_runs_on_the_forced_psg_kernel(kernel):
    """The sketch is a method: it projects the shared side, then the psg kernel chosen (here forced) runs, and the
    route says both. Every psg kernel gives the same sketched Grams."""
    x, dy = _inputs(3, 5, 20, 6, seed=5)
    kw = dict(row_blocks=2, bias=True, method="sketch", sketch_size=8, seed=1)
    res = mk.layer_grams(x, dy, kernel=kernel, **kw)
    assert res.routes == (f"sketch+{kernel}",) and gd.route_of(res.routes[0]) == "sketch"
    assert rel_err(res.grams, mk.layer_grams(x, dy, kernel="torch-psg", **kw).grams) <= FP32_RTOL


def test_limits_of_the_one_launch_kernels_are_the_kernels_own():
    from mat_kernels.kernels.triton_segment_grams_fused import FUSED_MAX_N, LOCAL_MAX_N

    assert gd.TritonFused.MAX_N == FUSED_MAX_N and gd.TritonLocal.MAX_N == LOCAL_MAX_N


# --------------------------------------------------------------------------------------------------------------
# bad choices
# --------------------------------------------------------------------------------------------------------------
def test_a_forced_kernel_that_cannot_run_raises_with_every_reason():
    inp = gd.GramInputs(n=70, T=3, shared=5, segmented=4, add_one=False, dtype=torch.float64,
                        device=torch.device("meta"))
    with pytest.raises(ValueError, match="kernel='triton-fused' cannot run") as e:
        gd.choose(inp, kernel="triton-fused", backend="torch", method="ghost")
    msg = str(e.value)
    for reason in ("method='ghost' computes the ghost route", "backend='torch' rules out triton kernels",
                   "Triton cannot run here: ", "dtype torch.float64", "n = 70 samples > 32"):
        assert reason in msg, (reason, msg)


def test_a_forced_kernel_the_inputs_rule_out_raises_from_the_entry_points():
    x, dy = _inputs(65, 1, 3, 4, seed=1)
    with pytest.raises(ValueError, match=r"triton-local: n = 65 samples > 64"):
        mk.estimate_lambda_max(x, dy, kernel="triton-local")
    with pytest.raises(ValueError, match=r"method='ghost' computes the ghost route; torch-psg is a psg kernel"):
        mk.estimate_lambda_max(x, dy, kernel="torch-psg", method="ghost")  # refused by GramOptions, before any work
    with pytest.raises(ValueError, match=r"backend='torch' rules out triton kernels"):
        mk.GramOptions(kernel="triton-psg", backend="torch")
    with pytest.raises(ValueError, match="method='sketch' computes the psg route; triton-ghost is a ghost kernel"):
        mk.GramOptions(kernel="triton-ghost", method="sketch")


def test_an_unknown_kernel_names_the_choices():
    for call in (lambda: mk.GramOptions(kernel="fused"), lambda: mk.layer_grams(*_inputs(2, 1, 3, 4, 0), kernel="x"),
                 lambda: gd.choose(gd.GramInputs.of(torch.zeros(2, 1, 3), [4], False), kernel="psg")):
        with pytest.raises(ValueError, match="kernel must be one of") as e:
            call()
        assert all(name in str(e.value) for name in gd.KERNEL_CHOICES)


# --------------------------------------------------------------------------------------------------------------
# auto
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,T,shared,segmented,add_one", [(1, 1, 9, 12, True), (8, 1, 32, 32, False),
                                                          (4, 64, 16, 16, True), (40, 16, 33, 70, True),
                                                          (70, 128, 769, 2304, True)])
@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
def test_auto_picks_the_cheapest_supported(n, T, shared, segmented, add_one, backend):
    """``auto``: the fewest multiply-adds (the route_costs of the route), then Triton before PyTorch, then the
    shortest predicted time; the choice lists every candidate, its cost and its reasons."""
    if backend == "triton" and not (TRITON_RUNS or DEVICE == "cuda"):
        pytest.skip("Triton cannot run on CPU tensors here")
    inp = gd.GramInputs(n, T, shared, segmented, add_one, torch.float32, torch.device(DEVICE))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback warning where Triton cannot run
        choice = gd.choose(inp, backend=backend)
    supported = [(c, impl.BACKEND != "triton", s or 0.0) for k, c, s, r in choice.candidates if not r
                 for impl in [gd.KERNELS[k]]]
    assert len(choice.candidates) == len(gd.KERNELS) and supported
    assert (choice.cost, gd.KERNELS[choice.kernel].BACKEND != "triton") == min(supported)[:2]
    assert choice.cost == min(gd.route_costs(n, T, shared + add_one, segmented).values())
    assert backend == "auto" or gd.KERNELS[choice.kernel].BACKEND == backend
    assert choice.kernel in choice.reason
    for k, cost, _, reasons in choice.candidates:  # the ruled out ones say why
        assert bool(reasons) == (cost is None)
        if backend != "auto" and gd.KERNELS[k].BACKEND != backend:
            assert any("rules out" in r for r in reasons)


def test_a_fallback_to_pytorch_is_inspectable(monkeypatch):
    monkeypatch.setattr(_backend, "triton_unusable", lambda device: "no Triton in this test")
    monkeypatch.setattr(_backend, "_WARNED", set())
    inp = gd.GramInputs(4, 8, 10, 12, True, torch.float32, torch.device("cpu"))
    with pytest.warns(UserWarning, match="no Triton in this test"):
        choice = gd.choose(inp)
    assert choice.kernel == "torch-psg" and choice.backend == "torch"
    assert all("no Triton in this test" in " ".join(r) for k, _, _, r in choice.candidates if k.startswith("triton"))


# --------------------------------------------------------------------------------------------------------------
# FLOPs: the op's formula is the dispatcher's cost; FlopCounterMode counts measurements
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kernel", KERNELS)
def test_the_flop_formula_is_the_cost_function(kernel):
    a, b = _inputs(5, 3, 7, 9, seed=2)
    mode = FlopCounterMode(display=False)
    with mode:
        segment_grams(a, b, [0, 4], [4, 5], [0, 1], True, kernel, False, 1 << 20)
    counted = mode.get_flop_counts()["Global"]
    want = 2 * gd.route_costs(5, 3, 8, 9)[gd.KERNELS[kernel].ROUTE]
    assert counted == {torch.ops.mat_kernels.segment_grams: want}  # the op alone: nothing inside it counted twice
    assert gd.flops(kernel, gd.GramInputs.of(a, [4, 5], True)) == want


@pytest.mark.parametrize("bias", [True, False])
def test_a_sketched_layer_is_counted_as_route_costs_prices_it(bias):
    """The sketch's projection (a GEMM the counter sees) and the psg kernel on the projection (the op's formula) add
    up to route_costs' sketch price, the bias direction added, not multiplied."""
    x, dy = _inputs(3, 5, 20, 6, seed=7)
    counted, _ = count_flops(mk.layer_grams, x, dy, row_blocks=2, bias=bias, method="sketch", sketch_size=8)
    assert counted == 2 * gd.route_costs(3, 5, 20 + bias, 6, sketch_size=8, bias=bias)["sketch"]


# (what MAT.measure() put in the ledger at each route, before the Grams were counted through the op's formula:
# FlopCounterMode's count of the probe passes + the capture's gram_flops (2 × route_costs) + eigvalsh), plus the
# criterion's sums now charged with the solve: n² per module, 14 modules, n = 4
SUMS = 14 * 4 ** 2
TINYLM_MEASUREMENT_FLOPS = {"auto": 263074 + SUMS, "psg": 270234 + SUMS, "ghost": 284354 + SUMS}
# the sketch's projection is a GEMM that FlopCounterMode counted and gram_flops counted again (bias column included):
# 2·n·T·k·shared less per layout and layer, n = 4, T = 5, k = 8, shared = 13 (qkv, ffn_in: d + bias), 12 (attn_out's
# columns: dy), 11 (ffn_out: ffn + bias)
TINYLM_SKETCH_FLOPS = 293354 - 2 * 4 * 5 * 8 * (2 * (13 + 13 + 12 + 11)) + SUMS


@pytest.mark.parametrize("backend", ["torch", "triton"] if TRITON_RUNS else ["torch"])
@pytest.mark.parametrize("method", ["auto", "psg", "ghost", "sketch"])
def test_a_measurement_is_counted_as_before(backend, method):
    """MAT.measure()'s ledger entry is FlopCounterMode's count (probe passes, Grams) + eigvalsh + the criterion's
    sums: for the exact routes, what the parallel bookkeeping it replaced recorded (pinned) + the sums; the sketch's
    projection now counted once."""
    torch.manual_seed(0)
    model = TinyLM(layers=2)
    probe = torch.randint(0, 23, (4, 5), generator=torch.Generator().manual_seed(99))
    mat = mk.MAT(model, torch.optim.SGD(model.parameters(), lr=0.1), warmup_steps=0, interval=1,
                 probe=(probe, probe), lambda_kwargs={"backend": backend, "method": method, "sketch_size": 8})
    try:
        mat.measure()
    finally:
        mat.close()
    want = TINYLM_SKETCH_FLOPS if method == "sketch" else TINYLM_MEASUREMENT_FLOPS[method]
    assert mat.ledger.measure == [(0, want)]


def test_model_lambda_max_is_counted_with_its_grams():
    """A CNN (grouped convolutions: one Gram call per group) measured under count_flops: the probe passes + the
    Grams, as the probe count (41904) + gram_flops (37224) of the bookkeeping this replaced."""
    torch.manual_seed(0)
    x, y = torch.randn(3, 2, 8, 8), torch.tensor([0, 1, 2])
    counted, _ = count_flops(mk.model_lambda_max, small_cnn(), x, labels=y, output="loss", backend="torch",
                             loss_fn=lambda logits, batch: F.cross_entropy(logits, y, reduction="none"))
    assert counted == 41904 + 37224


def test_measuring_from_the_training_backward_is_counted_as_before():
    """probe=None: the Grams run inside the training backward, which count_step counts; with base_key the measuring
    step's extra (Grams, exact backward) is the measurement's, MAT adds eigvalsh; the totals are those of the
    bookkeeping this replaced (340337)."""
    torch.manual_seed(14)
    model = TinyLM(layers=1)
    ledger = FlopsLedger()
    mat = mk.MAT(model, torch.optim.SGD(model.parameters(), lr=0.1), interval=3, warmup_steps=1, probe=None,
                 ledger=ledger, lambda_kwargs={"backend": "torch"})
    try:
        for s in range(2):
            ids = torch.randint(0, 23, (4, 5), generator=torch.Generator().manual_seed(30 + s))
            key = mat.flops_key()

            def fwd_bwd():
                with mat.measure_step(loss_scale=1 / 20):
                    mat.backward(F.cross_entropy(model(ids).flatten(0, 1), ids.flatten()))

            ledger.count_step(key, fwd_bwd, base_key=(key[0], False))
            mat.step()
            mat.zero_grad()
    finally:
        mat.close()
    eig = len(mat.specs) * 4 * 4 ** 3 // 3  # eigvalsh, n = 4
    sums = len(mat.specs) * 4 ** 2  # the criterion's sums, charged with the solve since
    assert ledger.train == [145440, 145440] and ledger.measure == [(1, 49457 - eig), (1, eig + sums)]
    assert ledger.total() == 340337 + sums
