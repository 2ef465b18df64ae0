"""MAT training semantics: what is always trained stays trained, partial backpropagation against an explicitly
detached model, the ablation policies, sturdier decisions, modules gated by requires_grad, the ledger.

Tolerance: gradients of the same fp32 computation in another order, relative ≤ FP32_RTOL (helpers)."""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import FP32_RTOL, rel_err
from models import TinyLM

import mat_kernels as mk
from mat_kernels.train.flops import FlopsLedger, count_flops
from mat_kernels.train.policy import TemporalRule, module_scores, threshold_mask


def _ids(seed, n=4, T=5, vocab=23):
    return torch.randint(0, vocab, (n, T), generator=torch.Generator().manual_seed(seed))


def _loss(model, ids):
    return F.cross_entropy(model(ids).flatten(0, 1), ids.flatten())


def _mat(model, lr=0.1, **kw):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    probe = _ids(99)
    kw.setdefault("lambda_kwargs", {"backend": "torch"})
    return mk.MAT(model, opt, **{"warmup_steps": 0, "patience": 1, **kw}, interval=1, probe=(probe, probe))


def _set(mat, active):
    """Impose a decision (as a measurement would) without measuring."""
    mat.active = torch.as_tensor(active, dtype=torch.bool).clone()
    mat._apply_masks()


# --------------------------------------------------------------------------------------------------------------
# always trained means trained
# --------------------------------------------------------------------------------------------------------------
def test_output_projection_bias_trains_when_every_head_out_is_frozen():
    torch.manual_seed(0)
    model = TinyLM(layers=1)
    mat = _mat(model)
    assert "blocks.0.attn_out.bias" in mat.always_trained
    lam = torch.tensor([3.0 if k != "head_out" else 1.0 for k in mat.kinds], dtype=torch.float64)
    lam[0] = 5.0  # heads differ, every head_out is equal: none is above its kind's mean
    for _ in range(2):
        mat._decide(lam)
    outs = [i for i, k in enumerate(mat.kinds) if k == "head_out"]
    assert not mat.active[outs].any()
    bias = model.blocks[0].attn_out.bias
    before = bias.detach().clone()
    mat.backward(_loss(model, _ids(1)))
    assert bias.grad is not None and bias.grad.abs().sum() > 0
    mat.optimizer.step(mat.active)
    assert not torch.equal(bias.detach(), before)
    assert model.blocks[0].attn_out.weight.grad is None  # the columns themselves are all frozen


def test_entries_no_module_owns_keep_training():
    torch.manual_seed(1)
    model = TinyLM(layers=1)
    dense = copy.deepcopy(model)
    specs = mk.discover_modules(model, include=[r"blocks\.0\.head0$"]).specs
    mat = _mat(model, specs=specs)
    layer = model.blocks[0].qkv
    assert isinstance(layer, mk.SparseUpdateLinear) and layer.num_modules == 2  # head 0, and the rest
    _set(mat, [False])
    w0 = layer.weight.detach().clone()
    mat.backward(_loss(model, _ids(2)))
    _loss(dense, _ids(2)).backward()
    head0 = torch.zeros(36, dtype=torch.bool)
    for sl in specs[0].slices:  # its Q, K and V rows
        for start, size in sl.ranges:
            head0[start:start + size] = True
    assert int(head0.sum()) == 12
    ref = dense.blocks[0].qkv
    for got, want in ((layer.weight.grad, ref.weight.grad), (layer.bias.grad, ref.bias.grad)):
        assert rel_err(got[~head0], want[~head0]) <= FP32_RTOL  # rows no module owns: their full gradient
        assert not got[head0].any()
    mat.step()
    changed = (layer.weight.detach() != w0).any(1)
    assert not changed[head0].any()  # the frozen module's rows: bit-for-bit
    assert changed[~head0].all()  # rows no module owns: trained like everything outside modules


def test_bias_of_a_whole_weight_module_that_does_not_own_it_trains():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    spec = mk.ModuleSpec.whole("first", "0.weight")  # the bias is not part of the module
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(5, 6)
    mat = mk.MAT(model, opt, specs=[spec], warmup_steps=0, interval=1, probe=(x, torch.zeros(5, dtype=torch.long)),
                 lambda_kwargs={"backend": "torch"})
    assert "0.bias" in mat.always_trained
    _set(mat, [False])
    mat.backward(model(x).square().sum())
    assert model[0].weight.grad is None and model[0].bias.grad is not None


# --------------------------------------------------------------------------------------------------------------
# partial backpropagation
# --------------------------------------------------------------------------------------------------------------
def _detached_linear(x, w, b, mask, axis):
    """F.linear whose frozen rows (axis 0) / columns (axis 1) neither learn nor pass gradient: written out with
    explicit .detach(), independently of the library's kernels."""
    if axis == 0:
        live = F.linear(x, w, b)
        dead = F.linear(x.detach(), w.detach(), b.detach())
        return torch.where(mask, live, dead)
    live = F.linear(x * mask, w * mask)
    dead = F.linear((x * ~mask).detach(), (w * ~mask).detach())
    return live + dead + b


def _reference_forward(model, ids, active, specs):
    """TinyLM's forward with every frozen module's branch explicitly detached."""
    by_name = dict(zip((s.name for s in specs), active.tolist()))
    h = model.emb(ids)
    for i, blk in enumerate(model.blocks):
        n, T, d = h.shape
        H = blk.heads
        hd = d // H
        rows = torch.zeros(3 * d, dtype=torch.bool)
        cols = torch.zeros(d, dtype=torch.bool)
        for hh in range(H):
            if by_name[f"blocks.{i}.head{hh}"]:
                for p in range(3):
                    rows[p * d + hh * hd: p * d + (hh + 1) * hd] = True
            if by_name[f"blocks.{i}.head{hh}.out"]:
                cols[hh * hd:(hh + 1) * hd] = True
        qkv = _detached_linear(h, blk.qkv.weight, blk.qkv.bias, rows, 0)
        q, k, v = qkv.view(n, T, 3, H, hd).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), -1) @ v
        a = a.transpose(1, 2).reshape(n, T, d)
        h = blk.ln(h + _detached_linear(a, blk.attn_out.weight, blk.attn_out.bias, cols, 1))
        if by_name[f"blocks.{i}.ffn"]:
            h = h + blk.ffn_out(torch.tanh(blk.ffn_in(h)))
        else:
            f = F.linear(torch.tanh(F.linear(h.detach(), blk.ffn_in.weight.detach(), blk.ffn_in.bias.detach())),
                         blk.ffn_out.weight.detach(), blk.ffn_out.bias.detach())
            h = h + f
    return model.head(h)


@pytest.mark.parametrize("pattern", ["mixed", "all_frozen", "all_active"])
def test_detach_matches_explicitly_detached_model(pattern):
    torch.manual_seed(3)
    model = TinyLM(layers=2)
    ref_model = copy.deepcopy(model)
    mat = _mat(model, frozen_backward="detach")
    M = len(mat.specs)
    active = {"mixed": torch.tensor([i % 3 != 1 for i in range(M)]), "all_frozen": torch.zeros(M, dtype=torch.bool),
              "all_active": torch.ones(M, dtype=torch.bool)}[pattern]
    if pattern == "mixed":
        active[mat.names.index("blocks.1.ffn")] = False
        active[mat.names.index("blocks.0.ffn")] = True
    _set(mat, active)
    ids = _ids(4)
    mat.backward(_loss(model, ids))
    F.cross_entropy(_reference_forward(ref_model, ids, active, mat.specs).flatten(0, 1), ids.flatten()).backward()
    got = dict(model.named_parameters())
    for name, p in ref_model.named_parameters():
        g, want = got[name].grad, p.grad
        if want is None or not want.any():
            assert g is None or not g.any(), name
        else:
            assert g is not None and rel_err(g, want) <= FP32_RTOL, name
    # the embedding's gradient differs from the exact backward whenever something is frozen
    if pattern == "mixed":
        exact = copy.deepcopy(ref_model)
        exact.zero_grad()
        _loss(exact, ids).backward()
        assert rel_err(exact.emb.weight.grad, got["emb.weight"].grad) > 1e-3


def test_detach_skips_input_gradient_flops_as_executed():
    torch.manual_seed(5)
    models = [TinyLM(layers=2, d=12, heads=3, ffn=10) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    mats = [_mat(models[0]), _mat(models[1], frozen_backward="detach")]
    frozen = {"blocks.1.head1", "blocks.1.head2.out", "blocks.0.ffn"}
    active = [n not in frozen for n in mats[0].names]
    for mat in mats:
        _set(mat, active)
    ids = _ids(6, n=4, T=5)
    counts = [count_flops(lambda m=m, mm=mat: mm.backward(_loss(m, ids)))[0] for m, mat in zip(models, mats)]
    tokens, d, ffn = 20, 12, 10
    skipped = 2 * tokens * (3 * 4) * d    # head1's Q, K, V rows drop out of block 1's QKV dX product
    skipped += 2 * tokens * d * 4         # head2's output columns send no gradient back
    skipped += 2 * 2 * tokens * d * ffn   # block 0's FFN: neither linear computes dX
    assert counts[0] - counts[1] == skipped


def test_measurement_runs_the_exact_backward_under_detach():
    torch.manual_seed(7)
    model = TinyLM(layers=1)
    mat = _mat(model, frozen_backward="detach")
    _set(mat, [False] * len(mat.specs))
    plain = copy.deepcopy(model).eval()
    got = mat.measure().values
    # the sparse layers, frozen under detach, measure exactly inside any capture (model_lambda_max on the model)
    exact = mk.model_lambda_max(plain, mat.probe[0], labels=mat.probe[1], specs=mat.specs, backend="torch")
    for i, name in enumerate(mat.names):
        assert abs(got[i].item() - exact[name]) <= 1e-5 * exact[name]


# --------------------------------------------------------------------------------------------------------------
# modules gated by requires_grad (whole weights of layers that are not nn.Linear)
# --------------------------------------------------------------------------------------------------------------
class _CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 6, 3, padding=1)
        self.c3 = nn.Conv2d(6, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 4 * 4, 3)

    def forward(self, x):
        x = F.relu(self.c1(x))
        x = F.relu(self.c2(x))
        return self.fc(F.relu(self.c3(x)).flatten(1))


@pytest.mark.parametrize("frozen_backward", ["dw", "detach"])
def test_conv_modules_skip_their_weight_gradient(frozen_backward):
    torch.manual_seed(8)
    model = _CNN()
    x, y = torch.randn(5, 1, 4, 4), torch.randint(0, 3, (5,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    mat = mk.MAT(model, opt, warmup_steps=0, interval=1, probe=(x, y), frozen_backward=frozen_backward,
                 lambda_kwargs={"backend": "torch"})
    assert mat.report()["masked_weights"] == [] and len(mat.report()["gated_weights"]) == 6
    dense, _ = count_flops(lambda: F.cross_entropy(model(x), y).backward())
    model.zero_grad(set_to_none=True)
    _set(mat, [True, False, True])  # c2 frozen
    flops, _ = count_flops(lambda: mat.backward(F.cross_entropy(model(x), y)))
    def conv(c_in, c_out):  # one 3x3 convolution GEMM on 5 images of 4x4 (its forward, dX or dW)
        return 2 * 5 * 16 * c_in * c_out * 9

    if frozen_backward == "dw":
        assert flops == dense - conv(4, 6)  # c2's dW
        assert model.c1.weight.grad is not None
    else:  # nothing flows through c2: no dW or dX there, no dW in c1, and c3 need not compute its dX
        assert flops == dense - 2 * conv(4, 6) - conv(1, 4) - conv(6, 6)
        assert model.c1.weight.grad is None
    assert model.c2.weight.grad is None and model.c2.bias.grad is None
    before = model.c2.weight.detach().clone()
    mat.step()  # measures (interval=1): needs the gated weights back, then re-applies the decision
    assert torch.equal(model.c2.weight.detach(), before)
    assert all(p.requires_grad == bool(mat.active[i]) for i, c in enumerate((model.c1, model.c2, model.c3))
               for p in c.parameters())


def test_gating_leaves_parameters_the_user_froze_alone():
    torch.manual_seed(9)
    model = _CNN()
    model.c1.bias.requires_grad_(False)
    x, y = torch.randn(3, 1, 4, 4), torch.randint(0, 3, (3,))
    mat = mk.MAT(model, torch.optim.SGD(model.parameters(), lr=0.1), warmup_steps=0, interval=1,
                 probe=(x, y), lambda_kwargs={"backend": "torch"})
    _set(mat, [True, True, True])
    assert not model.c1.bias.requires_grad


# --------------------------------------------------------------------------------------------------------------
# policies, criteria, sturdier decisions
# --------------------------------------------------------------------------------------------------------------
def test_module_scores_from_grams():
    g = torch.randn(3, 5, 4, dtype=torch.float64)
    grams = g @ g.transpose(1, 2)
    assert torch.allclose(module_scores(grams, "trace"), torch.einsum("mii->m", grams))
    assert torch.allclose(module_scores(grams, "grad_norm"), g.sum(1).square().sum(-1))
    assert torch.allclose(module_scores(grams, "lambda"), torch.linalg.eigvalsh(grams)[:, -1])
    with pytest.raises(ValueError, match="criterion"):
        module_scores(grams, "norm")


def test_random_policy_keeps_the_mean_rules_count_and_is_seeded():
    lam = torch.tensor([1.0, 9.0, 2.0, 8.0, 3.0, 7.0])
    base, _ = threshold_mask(lam, "mean")
    picks = set()
    for seed in range(20):
        act, _ = threshold_mask(lam, "random", generator=torch.Generator().manual_seed(seed))
        assert int(act.sum()) == int(base.sum())
        picks.add(tuple(act.tolist()))
        again, _ = threshold_mask(lam, "random", generator=torch.Generator().manual_seed(seed))
        assert torch.equal(act, again)
    assert len(picks) > 5


def test_random_policy_in_mat_matches_the_lambda_rule_per_kind():
    torch.manual_seed(10)
    lam = None
    counts = []
    for policy in ("mean", "random"):
        _, _, mat = (None, None, _mat(TinyLM(layers=2), policy=policy, seed=3))
        if lam is None:
            lam = torch.rand(len(mat.specs), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        for _ in range(3):
            mat._decide(lam)
        counts.append({k: int(mat.active[idx].sum()) for k, idx in mat.groups.items()})
        if policy == "random":
            assert mat.log[-1]["active"] != mat.log[-2]["active"] or mat.log[-2]["active"] != mat.log[-3]["active"]
    assert counts[0] == counts[1]


def test_trace_criterion_decides_on_the_trace():
    torch.manual_seed(11)
    model = TinyLM(layers=1)
    mat = _mat(model, criterion="trace", temporal_rule=False)
    for _ in range(2):
        mat.step_count = 0
        m = mat.measure()
        mat._decide(m)
    res = mk.model_lambda_max(model.eval(), mat.probe[0], labels=mat.probe[1], specs=mat.specs, return_grams=True,
                              backend="torch")
    tr = torch.tensor([res.gram(n).double().trace().item() for n in mat.names], dtype=torch.float64)
    assert torch.allclose(torch.tensor(mat.log[-1]["score"], dtype=torch.float64), tr, rtol=1e-5)
    for kind, idx in mat.groups.items():
        want = tr[idx] > tr[idx].mean()
        assert torch.equal(mat.active[idx], want), kind


def test_hysteresis_and_smoothing():
    torch.manual_seed(12)
    mat = _mat(TinyLM(layers=1), hysteresis=0.2, temporal_rule=False, group_by="all")
    M = len(mat.specs)
    base = torch.ones(M, dtype=torch.float64)
    base[0] = 3.0
    mat._decide(base)
    mat._decide(base)  # gating starts: only module 0 is above the mean
    assert mat.active.tolist() == [True] + [False] * (M - 1)
    lam = torch.ones(M, dtype=torch.float64)
    lam[0], lam[1] = 1.5, 1.4  # mean 1.0 + 0.9 / M: both above τ
    mat._decide(lam)
    tau = mat.log[-1]["threshold"]["all"]
    assert lam[1] > tau * 1.2 and mat.active[1]  # above the band: re-enters
    lam[0] = tau * 0.9  # below τ but inside the band: an active module stays active ...
    lam[2] = tau * 1.1  # ... and a frozen one above τ but inside the band does not re-enter
    mat._decide(lam)
    tau = mat.log[-1]["threshold"]["all"]
    assert lam[0] < tau and lam[0] > 0.8 * tau and mat.active[0]
    assert lam[2] > tau and lam[2] < 1.2 * tau and not mat.active[2]
    smooth = _mat(TinyLM(layers=1), smoothing=0.5, temporal_rule=False)
    smooth._decide(base)
    smooth._decide(base * 3)
    assert smooth.log[-1]["score"] == pytest.approx((0.5 * base + 0.5 * 3 * base).tolist())


def test_patience_needs_consecutive_small_steps():
    rule = TemporalRule(beta=1e-3, patience=2)
    seq = [[1.0], [2.0], [3.0], [3.0001], [4.0], [4.0001], [4.0002]]
    out = [rule.update(torch.tensor(s)).item() for s in seq]
    assert out == [False, False, False, False, False, False, True]


def test_empty_kind_is_logged():
    mat = _mat(TinyLM(layers=1), temporal_rule=False)
    lam = torch.ones(len(mat.specs), dtype=torch.float64)  # all equal: nothing is above the mean
    mat._decide(lam)
    mat._decide(lam)
    assert set(mat.log[-1]["empty_kinds"]) == {"head", "head_out", "ffn"}
    assert mat.log[0]["empty_kinds"] == []


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(frozen_backward="none"), ValueError, "frozen_backward must be one of"),
    (dict(criterion="norm"), ValueError, "criterion must be one of"),
    (dict(policy="coin"), ValueError, "policy must be one of"),
    (dict(smoothing=1.0), ValueError, "smoothing must be"),
    (dict(smoothing=-0.1), ValueError, "smoothing must be"),
    (dict(hysteresis=0.1, policy="random"), ValueError, "hysteresis applies"),
    (dict(hysteresis=float("nan")), ValueError, "hysteresis must be"),
    (dict(beta=-1.0), ValueError, "beta must be"),
    (dict(patience=0), ValueError, "patience must be"),
    (dict(seed=-1), ValueError, "seed must be"),
    (dict(gate_after=0), ValueError, "gate_after must be"),
    (dict(alpha=-1.0), ValueError, "alpha must be"),
    (dict(output="logits"), ValueError, "output must be"),
    (dict(ledger={}), TypeError, "ledger must be"),
])
def test_bad_arguments_are_named(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        _mat(TinyLM(layers=1), **kwargs)


# --------------------------------------------------------------------------------------------------------------
# the ledger
# --------------------------------------------------------------------------------------------------------------
def test_ledger_records_steps_and_measurements():
    torch.manual_seed(13)
    model = TinyLM(layers=1)
    ledger = FlopsLedger()
    mat = _mat(model, ledger=ledger)
    mat.interval = 2
    for s in range(4):
        ids = _ids(20 + s)
        ledger.count_step(((4, 5), mat.flops_key()), mat.backward, _loss(model, ids))
        mat.step()
        mat.zero_grad()
        ledger.add_seconds(0.01)
    assert len(ledger.train) == 4 and [s for s, _ in ledger.measure] == [0, 2]
    assert all(f > 0 for _, f in ledger.measure) and ledger.measurement_seconds() > 0
    assert ledger.total() == sum(ledger.train) + sum(f for _, f in ledger.measure)
    assert 0 < ledger.measurement_share() < 1 and ledger.seconds() == pytest.approx(0.04)


def test_measuring_from_the_training_backward_records_its_extra_cost():
    """probe=None under detach: the measuring step builds the Grams and runs the exact backward; what it costs
    beyond the same step's usual FLOPs is the measurement's (counted by count_step), and MAT adds eigvalsh."""
    torch.manual_seed(14)
    model = TinyLM(layers=1)
    ledger = FlopsLedger()
    mat = mk.MAT(model, torch.optim.SGD(model.parameters(), lr=0.1), interval=3, warmup_steps=1, probe=None,
                 frozen_backward="detach", ledger=ledger, lambda_kwargs={"backend": "torch"})
    _set(mat, [i % 2 == 0 for i in range(len(mat.specs))])
    keys = []
    for s in range(2):
        ids = _ids(30 + s)
        measuring = mat.measuring_now()
        key = mat.flops_key()
        base = (key[0], False)
        keys.append(key)

        def fwd_bwd():
            with mat.measure_step(loss_scale=1 / 20):
                mat.backward(_loss(model, ids))

        ledger.count_step(key, fwd_bwd, base_key=base)
        mat.step()
        mat.zero_grad()
        assert measuring == (s == 1)
    assert keys[1] == (keys[0][0], True)
    steps = [s for s, _ in ledger.measure]
    assert steps.count(1) == 2  # the Grams and the exact backward's extra dX (from count_step), eigvalsh (from MAT)
    assert ledger.train[1] == ledger.train[0]


def test_group_by_layer_thresholds_heads_within_their_layer():
    torch.manual_seed(15)
    mat = _mat(TinyLM(layers=2), group_by="layer", temporal_rule=False)
    assert set(mat.groups) == {"head@blocks.0", "head_out@blocks.0", "head@blocks.1", "head_out@blocks.1", "ffn"}
    lam = torch.tensor([1.0 if n.startswith("blocks.0") else 100.0 for n in mat.names], dtype=torch.float64)
    lam[mat.names.index("blocks.0.head1")] = 2.0  # layer 0's heads are small, one of them less so
    mat._decide(lam)
    mat._decide(lam)
    active = dict(zip(mat.names, mat.active.tolist()))
    assert active["blocks.0.head1"]  # above its own layer's mean, although far below layer 1's
    kind = _mat(TinyLM(layers=2), temporal_rule=False)
    kind._decide(lam)
    kind._decide(lam)
    assert not any(a for n, a in zip(kind.names, kind.active.tolist()) if n.startswith("blocks.0.head"))
