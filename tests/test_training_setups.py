"""MAT in the training setups people use: autocast (bf16, fp16), GradScaler loss scaling, gradient accumulation and
torch.compile (Lightning: test_lightning.py; the HF Trainer with gradient_accumulation_steps=2: test_hf_trainer.py).

Tolerances (mat_kernels/testing/tolerances.py, stated once): λ under autocast against the fp32 λ of the same weights
and batch, norm-wise over the modules, ≤ AUTOCAST_RTOL[dtype]; the Gram of what a 16-bit GEMM multiplied, and the
Grams over accumulated micro-batches, against float64 oracles ≤ GRAM_RTOL[float32] / MODEL_RTOL.
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import HAS_CUDA, assert_moved_iff_active, rel_err
from models import TinyLM, hf_bert, hf_family, small_cnn
from oracle import oracle

import mat_kernels as mk
from mat_kernels.testing.reference import model_per_sample_grads, reference_model_grams
from mat_kernels.testing.tolerances import AUTOCAST_RTOL, GRAM_RTOL, MODEL_RTOL

transformers = pytest.importorskip("transformers")

LOW = [torch.bfloat16, torch.float16]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _gpt2():
    cfg = transformers.GPT2Config(vocab_size=40, n_embd=16, n_layer=2, n_head=2, n_positions=16, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager")
    return transformers.GPT2LMHeadModel(cfg).eval()


def _case(name, seed=0, n=6):
    """(model, batch, labels, causal, per-sample-summed training loss of a batch: loss = (1/n) Σ_i s_i)."""
    torch.manual_seed(seed)
    g = _gen(seed)
    if name == "cnn":
        model = small_cnn()
        x, y = torch.randn(n, 2, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)
        return model, x, y, False, lambda m, b: F.cross_entropy(m(b[0]).float(), b[1], reduction="sum") / len(b[1])
    model = {"bert": hf_bert, "gpt2": _gpt2, "llama": lambda: hf_family("llama")}[name]()
    causal = name != "bert"
    ids = torch.randint(0, 40, (n, 8), generator=g)
    return model, ids, ids, causal, lambda m, b: _lm_loss(m, b[0], causal)


def _lm_loss(model, ids, causal):
    out = model(input_ids=ids).logits.float()
    tgt = ids
    if causal:
        out, tgt = out[:, :-1], ids[:, 1:]
    per = F.cross_entropy(out.flatten(0, 1), tgt.flatten(), reduction="none").view(ids.shape[0], -1).sum(1)
    return per.mean()


def _captured(model, batch, loss_fn, dtype, device="cpu", backend="torch"):
    with torch.autocast(device, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        with mk.capture_lambda_max(model, loss_scale=1 / len(batch[1]), backend=backend) as cap:
            loss_fn(model, batch).backward()
    model.zero_grad()
    return cap.lambda_max().values.double()


# --------------------------------------------------------------------------------------------------------------
# autocast
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("name", ["bert", "gpt2", "llama", "cnn"])
def test_lambda_under_autocast_agrees_with_fp32(name, dtype):
    """capture_lambda_max (training backward) and model_lambda_max (probe) under CPU autocast, against fp32."""
    model, x, y, causal, loss_fn = _case(name, seed=1)
    fp32, low = _captured(model, (x, y), loss_fn, None), _captured(model, (x, y), loss_fn, dtype)
    assert rel_err(low, fp32) <= AUTOCAST_RTOL[dtype]
    kw = dict(labels=y, causal=causal, backend="torch")
    ref = mk.model_lambda_max(model, x, **kw).values
    with torch.autocast("cpu", dtype=dtype):
        got = mk.model_lambda_max(model, x, **kw).values
    assert rel_err(got, ref) <= AUTOCAST_RTOL[dtype]


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("name", ["bert", "llama", "cnn"])
def test_lambda_under_cuda_autocast_agrees_with_fp32(name, dtype):
    """The same on a GPU, with the native Triton kernels (their 16-bit numerics cannot be checked on CPU)."""
    model, x, y, causal, loss_fn = _case(name, seed=1)
    model, x, y = model.cuda(), x.cuda(), y.cuda()
    fp32 = _captured(model, (x, y), loss_fn, None, "cuda", "triton")
    low = _captured(model, (x, y), loss_fn, dtype, "cuda", "triton")
    assert rel_err(low.cpu(), fp32.cpu()) <= AUTOCAST_RTOL[dtype]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", LOW)
def test_autocast_gram_is_built_from_what_the_gemm_multiplied(dtype, backend):
    """One linear (odd sizes, bias) under autocast: its Gram equals the float64 Gram of per-sample gradients formed
    from the autocast-cast input and the 16-bit output gradient, to fp32 accumulation."""
    torch.manual_seed(3)
    lin = nn.Linear(7, 5)
    x = torch.randn(3, 9, 7)
    spec = mk.ModuleSpec("rows", (mk.ParamSlice("weight", "rows", ((1, 3),), "bias"),))
    seen = {}
    with torch.autocast("cpu", dtype=dtype):
        with mk.capture_lambda_max(lin, [spec], backend=backend) as cap:
            y = lin(x)
            y.register_hook(lambda g: seen.setdefault("dy", g))
            (y.float() ** 2).sum().backward()
    assert seen["dy"].dtype == dtype
    xc, dy = x.to(dtype).double(), seen["dy"].double()[..., 1:4]
    gw = torch.einsum("ntr,ntd->nrd", dy, xc).flatten(1)
    g = torch.cat([gw, dy.sum(1)], 1)
    res = cap.lambda_max()
    assert rel_err(res.gram("rows"), g @ g.T) <= GRAM_RTOL[torch.float32]


def test_autocast_with_an_unsupported_gemm_dtype_is_refused():
    """A layer whose output dtype differs from its input's in a way no autocast GEMM produces is named."""

    class Upcast(nn.Linear):
        def forward(self, x):
            return super().forward(x).double()

    lin = Upcast(4, 3)
    spec = mk.ModuleSpec.whole("w", "weight", "bias")
    with pytest.raises(TypeError, match="weight.*autocast dtype torch.float64"):
        with mk.capture_lambda_max(lin, [spec], backend="torch"):
            lin(torch.randn(2, 4)).sum().backward()


def _mat_steps(model, batches, loss_fn, *, dtype=None, steps=20, scaler=None, micro=1, micro_batches="first",
               **kw):
    """Train ``steps`` MAT steps; return the MAT and, per step, whether some module was frozen (asserting that frozen
    slices did not move and active ones did)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    kw = {"warmup_steps": 0, "interval": 5, "lambda_kwargs": {"backend": "torch"}, **kw}
    mat = mk.MAT(model, opt, **kw)
    params = dict(mat.module.named_parameters())
    froze = []
    for step in range(steps):
        before = {k: v.detach().clone() for k, v in params.items()}
        active = mat.active.clone()
        batch = batches[step % len(batches)]
        parts = [tuple(t[i::micro] for t in batch) for i in range(micro)]
        with mat.measure_step(loss_scale="mean", micro_batches=micro_batches):
            for part in parts:
                with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                    loss = loss_fn(mat.module, part) / micro
                mat.backward(scaler.scale(loss) if scaler is not None else loss)
        taken = mat.optimizer.steps_taken
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            mat.step(scaler=scaler)  # a probe measurement runs under autocast too
        if scaler is not None:
            scaler.update()
        if mat.optimizer.steps_taken > taken:
            froze.append(assert_moved_iff_active(mat.specs, params, before, active))
        mat.zero_grad()
    return mat, froze


@pytest.mark.parametrize("probe", [False, True])
@pytest.mark.parametrize("dtype", LOW)
def test_mat_trains_under_autocast(dtype, probe):
    """20 steps of MAT under CPU autocast: 4 measurements, gating from the second, frozen slices bit-for-bit
    unchanged; the first λ agrees with the fp32 λ of the same weights and batch."""
    model, x, y, causal, loss_fn = _case("bert", seed=2, n=4)
    batches = [(torch.randint(0, 40, (4, 8), generator=_gen(10 + i)),) * 2 for i in range(5)]
    batches[0] = (x, y)
    kw = {"probe": (x, y)} if probe else {}
    if probe:  # a probe is measured after the step's update: the reference is on the weights after one step
        one, _ = _mat_steps(copy.deepcopy(model), batches, loss_fn, dtype=dtype, steps=1, **kw)
        ref = mk.model_lambda_max(one.module, x, labels=y, specs=one.specs, backend="torch").values
        first = one.log[0]["lambda"]
    else:
        ref = _captured(copy.deepcopy(model), (x, y), loss_fn, None)
    mat, froze = _mat_steps(model, batches, loss_fn, dtype=dtype, **kw)
    assert [e["step"] for e in mat.log] == [1, 6, 11, 16] and len(mat.ledger.measure) == 4
    assert any(froze) and not all(mat.log[-1]["active"])
    if not probe:
        first = mat.log[0]["lambda"]
    assert rel_err(torch.tensor(first), ref) <= AUTOCAST_RTOL[dtype]


# --------------------------------------------------------------------------------------------------------------
# loss scaling
# --------------------------------------------------------------------------------------------------------------
def test_grad_scaler_skips_overflowing_steps_without_measuring_and_unscales_lambda():
    """fp16 autocast with a GradScaler that starts too high: the overflowing steps are skipped by the scaler and
    take no measurement, decision or ledger entry; the measurement then taken is unscaled (it agrees with the same
    step measured without loss scaling)."""
    model, x, y, causal, loss_fn = _case("bert", seed=4, n=4)
    batches = [(torch.randint(0, 40, (4, 8), generator=_gen(20 + i)),) * 2 for i in range(6)]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 24)
    mat, froze = _mat_steps(copy.deepcopy(model), batches, loss_fn, dtype=torch.float16, steps=20, scaler=scaler)
    taken = mat.optimizer.steps_taken
    assert 5 <= taken < 20  # some steps overflowed at 2^24 and were skipped
    assert mat.step_count == taken  # skipped steps are not counted ...
    measured = [e["step"] for e in mat.log]
    assert measured == [s + 1 for s in range(0, taken, 5)]  # ... and measured at the next taken step
    assert len(mat.ledger.measure) == len(mat.log) and any(froze)
    # unscaled λ: one scaled measuring step against the same step without a scaler, same weights and batch
    lam = {}
    for scale in (None, 2.0 ** 12):
        m = copy.deepcopy(model)
        sc = torch.amp.GradScaler("cpu", init_scale=scale) if scale else None
        mt, _ = _mat_steps(m, [(x, y)], loss_fn, dtype=torch.float16, steps=1, scaler=sc)
        lam[scale] = torch.tensor(mt.log[0]["lambda"])
    assert rel_err(lam[2.0 ** 12], lam[None]) <= AUTOCAST_RTOL[torch.float16]


def test_grad_scaler_with_clipping_and_bad_scalers():
    model, x, y, causal, loss_fn = _case("bert", seed=5, n=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mat = mk.MAT(model, opt, warmup_steps=0, interval=1, lambda_kwargs={"backend": "torch"})
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)

    def backward():
        with mat.measure_step(loss_scale="mean"):
            with torch.autocast("cpu", dtype=torch.float16):
                loss = loss_fn(model, (x, y))
            mat.backward(scaler.scale(loss))

    backward()
    scaler.unscale_(mat.optimizer)  # unscale for clipping, then step: unscaled once
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    mat.step(scaler=scaler)
    scaler.update()
    assert mat.step_count == 1 and len(mat.log) == 1
    mat.zero_grad()
    backward()
    scaler.unscale_(opt)  # the optimizer MAT was built with, not MAT's: unscaled twice, or a bypassed step
    with pytest.raises(ValueError, match="scaler: .*another optimizer"):
        mat.step(scaler=scaler)
    with pytest.raises(TypeError, match="scaler must be a torch.amp.GradScaler"):
        mat.step(scaler=object())
    with pytest.raises(ValueError, match="not both"):
        mat.step(scaler=scaler, grad_scale=2.0)
    with pytest.raises(ValueError, match="grad_scale"):
        mat.step(grad_scale=0.0)


def test_non_finite_grams_without_a_scaler_are_an_error():
    model, x, y, causal, loss_fn = _case("bert", seed=6, n=4)
    mat = mk.MAT(model, torch.optim.SGD(model.parameters(), lr=0.1), warmup_steps=0,
                 lambda_kwargs={"backend": "torch"})
    with mat.measure_step(loss_scale="mean"):
        mat.backward(loss_fn(model, (x, y)) * float("inf"))
    with pytest.raises(ValueError, match="NaN/Inf"):
        mat.step()


# --------------------------------------------------------------------------------------------------------------
# gradient accumulation
# --------------------------------------------------------------------------------------------------------------
def _oracle_over(model, parts, specs):
    """float64 λmax per module over the samples of all micro-batches: whole-model per-sample gradients of s_i = the
    sample's summed token loss, per micro-batch, concatenated (so micro-batches may differ in length)."""
    names = sorted({p for s in specs for p in s.param_names()})

    def s_fn(f, b):
        ids = b[0]
        return F.cross_entropy(f(ids).flatten(0, 1), ids.flatten(), reduction="sum")

    grads = [model_per_sample_grads(model, (p,), s_fn, names) for p in parts]
    cat = {k: torch.cat([g[k] for g in grads]) for k in names}
    return torch.linalg.eigvalsh(reference_model_grams(model, cat, specs))[..., -1]


@pytest.mark.parametrize("mode", ["first", "all"])
def test_capture_over_micro_batches_against_the_oracle(mode):
    """Three micro-batches of 3 samples (the last one shorter: zero-padded tokens add nothing) in one capture; the
    loss of each is its mean over samples divided by 3 (loss_scale="mean")."""
    torch.manual_seed(7)
    model = TinyLM(layers=1).eval()
    parts = [torch.randint(0, 23, (3, T), generator=_gen(30 + i)) for i, T in enumerate((5, 5, 4))]
    with mk.capture_lambda_max(model, loss_scale="mean", micro_batches=mode, backend="torch") as cap:
        for ids in parts:
            per = F.cross_entropy(model(ids).flatten(0, 1), ids.flatten(), reduction="none").view(3, -1).sum(1)
            (per.mean() / 3).backward()
    res = cap.lambda_max()
    assert res.n == (3 if mode == "first" else 9)
    ref = _oracle_over(model, parts[:1] if mode == "first" else parts, res.specs)
    assert ((res.values.double() - ref).abs() / ref).max() <= MODEL_RTOL
    if mode == "first":  # the first micro-batch's Gram is exactly what one capture of it alone gives
        alone = oracle(model, parts[0], parts[0], res.specs, output="loss")
        assert ((res.values.double() - alone).abs() / alone).max() <= MODEL_RTOL


def test_micro_batches_of_different_sizes_are_refused():
    model = TinyLM(layers=1).eval()
    with pytest.raises(ValueError, match="micro_batches: micro-batch 1 of this step has 2 samples, the first had 3"):
        with mk.capture_lambda_max(model, backend="torch"):
            for n in (3, 2):
                ids = torch.randint(0, 23, (n, 4))
                F.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
    with pytest.raises(ValueError, match="micro_batches must be one of"):
        mk.capture_lambda_max(model, micro_batches="mean")
    with pytest.raises(ValueError, match="loss_scale"):
        mk.capture_lambda_max(model, loss_scale="sum")


@pytest.mark.parametrize("micro_batches", ["first", "all"])
def test_mat_with_gradient_accumulation(micro_batches):
    """Two micro-batches per optimizer step: λ of the first measurement against the oracle over the samples the
    mode says; training gates and keeps frozen slices frozen."""
    torch.manual_seed(8)
    model = TinyLM(layers=1).eval()
    batches = [(torch.randint(0, 23, (4, 5), generator=_gen(40 + i)),) for i in range(4)]
    first = batches[0][0]
    parts = [first[0::2], first[1::2]]  # how _mat_steps splits a batch into micro-batches

    def loss_fn(m, b):
        ids = b[0]
        return F.cross_entropy(m(ids).flatten(0, 1), ids.flatten(), reduction="none").view(len(ids), -1).sum(1).mean()

    specs = mk.discover_modules(model).specs
    ref = _oracle_over(model, parts[:1] if micro_batches == "first" else parts, specs)
    mat, froze = _mat_steps(model, batches, loss_fn, micro=2, micro_batches=micro_batches)
    got = torch.tensor(mat.log[0]["lambda"], dtype=torch.float64)
    assert ((got - ref).abs() / ref).max() <= MODEL_RTOL
    assert len(mat.log) == 4 and any(froze)


# --------------------------------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_model_never_recompiles_across_measurements_and_decisions(backend):
    """torch.compile(model): measuring steps run eagerly, the sparse layers' masks change in place, so after the
    first compiled step nothing recompiles (dynamo's error_on_recompile) or falls back to eager; frozen slices stay
    bit-for-bit unchanged; with aot_eager, the non-measuring steps' backward graph holds the sparse
    weight-gradient op. Inductor where a C++ compiler exists."""
    import shutil

    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    from torch._dynamo.utils import counters

    if backend == "inductor" and not (shutil.which("g++") or shutil.which("clang++")):
        pytest.skip("inductor on CPU needs a C++ compiler")
    graphs = []

    def keep(gm, _):
        graphs.append(str(gm.graph))
        return make_boxed_func(gm.forward)

    torch._dynamo.reset()
    counters.clear()
    model, x, y, causal, loss_fn = _case("bert", seed=9, n=4)
    model.train()
    compiled = torch.compile(model, backend=aot_autograd(fw_compiler=keep, bw_compiler=keep)
                             if backend == "aot_eager" else "inductor")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    mat = mk.MAT(compiled, opt, warmup_steps=0, interval=4, lambda_kwargs={"backend": "torch"})
    assert mat.module is model and mat.compiled
    params = dict(model.named_parameters())
    actives, froze = [], []
    try:
        for step in range(20):
            before, active = {k: v.detach().clone() for k, v in params.items()}, mat.active.clone()
            ids = torch.randint(0, 40, (4, 8), generator=_gen(50 + step))
            with mat.measure_step(loss_scale="mean"):
                mat.backward(_lm_loss(compiled, ids, False))
            mat.step()
            mat.zero_grad()
            froze.append(assert_moved_iff_active(mat.specs, params, before, active))
            actives.append(int(mat.active.sum()))
            if step == 1:  # the first compiled step is done: from here any recompilation raises
                torch._dynamo.config.error_on_recompile = True
                frames = dict(counters["frames"])
    finally:
        torch._dynamo.config.error_on_recompile = False
    assert len(mat.log) == 5 and len(set(actives)) > 1 and any(froze)  # measurements, decisions that gate
    assert dict(counters["frames"]) == frames and not counters["graph_break"]
    if backend == "aot_eager":
        assert any("mat_kernels.sparse_weight_grad" in g for g in graphs)
    torch._dynamo.reset()


def test_compiled_model_keeps_gated_weights_requiring_grad():
    """Conv2d weights are gated by requires_grad in eager models; under compile flipping it would recompile at each
    decision, so they keep requiring grad (said once) and the optimizer keeps them frozen."""
    model = small_cnn()
    with pytest.warns(UserWarning, match="compiled"):
        mat = mk.MAT(torch.compile(model, backend="eager"), torch.optim.SGD(model.parameters(), lr=0.1),
                     warmup_steps=10, lambda_kwargs={"backend": "torch"})
    mat.active[:] = False
    mat._apply_masks()
    conv = model[0].weight
    assert conv.requires_grad
    before = conv.detach().clone()
    x = torch.randn(2, 2, 8, 8)
    mat.backward(model(x).sum())
    mat.step()
    assert torch.equal(conv, before)
