"""MAT decisions (threshold policies, temporal rule) on scripted λ sequences, and the optimizer step that keeps
frozen slices bit-for-bit unchanged."""
import copy

import pytest
import torch

from mat_kernels import WeightBlocks
from mat_kernels.testing.tolerances import FUSED_RTOL
from mat_kernels.train.optim import FrozenSliceOptimizer
from mat_kernels.train.policy import TemporalRule, threshold_mask


# --------------------------------------------------------------------------------------------------------------
# thresholds
# --------------------------------------------------------------------------------------------------------------
def test_threshold_policies():
    lam = torch.tensor([1.0, 4.0, 2.0, 9.0])
    act, tau = threshold_mask(lam)  # alpha * mean = 4
    assert tau == 4.0 and act.tolist() == [False, False, False, True]
    act, tau = threshold_mask(lam, "mean", alpha=0.5)
    assert tau == 2.0 and act.tolist() == [False, True, False, True]
    act, tau = threshold_mask(lam, "max", alpha=0.4)
    assert tau == pytest.approx(3.6) and act.tolist() == [False, True, False, True]
    act, tau = threshold_mask(lam, "quantile", q=0.5)
    assert tau == 3.0 and act.tolist() == [False, True, False, True]
    act, _ = threshold_mask(torch.tensor([3.0, 5.0, 5.0, 1.0]), "top_k", k=2)
    assert act.tolist() == [False, True, True, False]
    act, _ = threshold_mask(torch.tensor([5.0, 5.0, 5.0]), "top_k", k=1)  # ties: lowest index
    assert act.tolist() == [True, False, False]


@pytest.mark.parametrize("kwargs,match", [
    (dict(policy="median"), "policy must be one of"), (dict(policy="quantile", q=1.5), "q must be"),
    (dict(policy="top_k", k=0), "k must be"), (dict(policy="top_k"), "k must be"),
])
def test_threshold_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        threshold_mask(torch.tensor([1.0, 2.0]), **kwargs)
    with pytest.raises(ValueError, match="NaN"):
        threshold_mask(torch.tensor([1.0, float("nan")]))


# --------------------------------------------------------------------------------------------------------------
# temporal rule
# --------------------------------------------------------------------------------------------------------------
def test_temporal_rule_on_scripted_sequences():
    """Module 0 keeps moving; module 1 stops moving after the third measurement (Δ stalls); module 2 never moves
    at the second measurement (Δ_1 = 0: the rule is undefined and never fires)."""
    seq = [
        [1.0, 1.0, 2.0],
        [2.0, 3.0, 2.0],   # Δ_1 = [1, 2, 0]
        [3.0, 4.0, 5.0],   # Δ = [2, 3, 3]; |ΔΔ|/Δ_1 = [1, 0.5, inf]
        [4.0, 4.0005, 9.0],  # Δ = [3, 3.0005, 7]: module 1 ratio 0.0005/2 = 2.5e-4 < 1e-3 -> converged
        [5.0, 9.0, 9.0],   # module 1 stays converged even though λ jumps again ("frozen for good")
    ]
    rule = TemporalRule(beta=1e-3)
    out = [rule.update(torch.tensor(s)).tolist() for s in seq]
    assert out[:3] == [[False] * 3] * 3
    assert out[3] == [False, True, False]
    assert out[4] == [False, True, False]
    sd = rule.state_dict()
    clone = TemporalRule()
    clone.load_state_dict(sd)
    assert clone.update(torch.tensor([6.0, 9.0, 9.0])).tolist() == rule.update(torch.tensor([6.0, 9.0, 9.0])).tolist()
    with pytest.raises(ValueError, match="modules"):
        rule.update(torch.tensor([1.0, 2.0]))


# --------------------------------------------------------------------------------------------------------------
# frozen optimizer step
# --------------------------------------------------------------------------------------------------------------
def _optimizers():
    out = [
        ("sgd_momentum_wd", lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.1)),
        ("sgd_nesterov", lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
        ("adam_l2", lambda ps: torch.optim.Adam(ps, lr=0.01, weight_decay=0.1)),
        ("adam_amsgrad", lambda ps: torch.optim.Adam(ps, lr=0.01, amsgrad=True)),
        ("adamw_foreach", lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1, foreach=True)),
        ("adamw_loop", lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1, foreach=False)),
        ("adamw_fused", lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1, fused=True)),
        ("sgd_fused", lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.1, fused=True)),
    ]
    return out


@pytest.mark.parametrize("name,make", _optimizers(), ids=[n for n, _ in _optimizers()])
def test_frozen_slices_unchanged_bit_for_bit(name, make):
    g = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.randn(9, 5, generator=g))       # rows: 3 heads of 3
    wt = torch.nn.Parameter(torch.randn(4, 6, generator=g))      # stored transposed: linear view [6, 4], cols blocks
    b = torch.nn.Parameter(torch.randn(9, generator=g))
    whole = torch.nn.Parameter(torch.randn(7, 3, generator=g))   # module 3: the whole tensor
    other = torch.nn.Parameter(torch.randn(4, generator=g))      # always trained
    try:
        opt = make([w, wt, b, whole, other])
    except (RuntimeError, TypeError) as e:  # fused not available for this build
        pytest.skip(str(e))
    heads = WeightBlocks("rows", [[(3 * h, 3)] for h in range(3)], (9, 5), bias_name="b")
    blocks = {
        w: heads,
        b: heads.for_bias(),
        wt: WeightBlocks("cols", [[(2 * h, 2)] for h in range(2)], (6, 4)),
        whole: WeightBlocks("all", [()], index=[3]),
    }
    fso = FrozenSliceOptimizer(opt, blocks, transposed={wt}, num_modules=4)
    masks = [[True] * 4, [True, False, True, False], [False, False, True, False], [True, False, False, False]]
    for step, mask in enumerate(masks * 2):
        before = {id(p): p.detach().clone() for p in (w, wt, b, whole, other)}
        state_before = {id(p): {k: v.clone() for k, v in opt.state.get(p, {}).items() if torch.is_tensor(v)}
                        for p in (w, wt, b, whole)}
        for p in (w, wt, b, whole, other):
            p.grad = torch.randn(p.shape, generator=g)
        fso.step(torch.tensor(mask))
        active = torch.tensor(mask)
        for h in range(3):
            rows = slice(3 * h, 3 * h + 3)
            if not active[h]:
                assert torch.equal(w[rows], before[id(w)][rows]) and torch.equal(b[rows], before[id(b)][rows])
                for k, v in state_before[id(w)].items():
                    if v.shape == w.shape:
                        assert torch.equal(opt.state[w][k][rows], v[rows]), (k, step)
            else:
                assert not torch.equal(w[rows], before[id(w)][rows])
        for h in range(2):
            cols = slice(2 * h, 2 * h + 2)  # columns of the linear view = rows of the stored tensor
            changed = not torch.equal(wt[cols], before[id(wt)][cols])
            assert changed == bool(active[h])
        assert torch.equal(whole, before[id(whole)]) != bool(active[3])
        assert not torch.equal(other, before[id(other)])  # always trained
    assert fso.block_steps.tolist() == [6, 2, 6, 2]


def _exact_optimizers():
    kw = [("sgd", dict(lr=0.1)), ("sgd_momentum_wd", dict(lr=0.1, momentum=0.9, weight_decay=0.1, dampening=0.1)),
          ("sgd_nesterov_max", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01, maximize=True)),
          ("adam_l2", dict(lr=0.01, weight_decay=0.1)),
          ("adam_amsgrad_max", dict(lr=0.01, amsgrad=True, maximize=True)),
          ("adamw", dict(lr=0.01, weight_decay=0.1)), ("adamw_amsgrad", dict(lr=0.01, weight_decay=0.1, amsgrad=True))]
    out = []
    for name, k in kw:
        cls = torch.optim.SGD if name.startswith("sgd") else torch.optim.AdamW if name.startswith("adamw") \
            else torch.optim.Adam
        for impl in ("loop", "foreach", "fused"):
            out.append((f"{name}_{impl}", cls, {**k, impl: True} if impl != "loop" else {**k, "foreach": False}))
    # fused Adam/AdamW once more with the masked kernel (Triton's CPU interpreter) updating the strided weight wr
    # and a whole tensor of its group as its companion
    out += [(f"{n}_masked", c, k) for n, c, k in out if n.endswith("_fused") and not n.startswith("sgd")]
    return out


@pytest.mark.parametrize("name,cls,kw", _exact_optimizers(), ids=[n for n, _, _ in _exact_optimizers()])
def test_active_blocks_are_what_torch_gives_each_block_alone(name, cls, kw, monkeypatch):
    """Each block (rows of a weight and its bias, columns of a transposed weight, a whole tensor, a tensor no module
    owns) against torch's own optimizer, same class and settings, run on a copy of that block alone and stepped
    only while it is active: parameters and every state tensor equal bit for bit, frozen or not, over masks that
    freeze and thaw."""
    if name.endswith("_masked"):
        pytest.importorskip("triton")
        from mat_kernels import backend as _backend
        from mat_kernels.train import optim

        if _backend.kernel_unusable(torch.device("cpu")) is not None:
            pytest.skip("Triton cannot run on the CPU here (TRITON_INTERPRET unset)")
        monkeypatch.setattr(optim, "TRITON_DEVICES", {"cpu"})
    g = torch.Generator().manual_seed(3)
    w = torch.nn.Parameter(torch.randn(9, 5, generator=g))
    wt = torch.nn.Parameter(torch.randn(4, 6, generator=g))     # stored transposed ([d_in, d_out])
    b = torch.nn.Parameter(torch.randn(9, generator=g))
    whole = torch.nn.Parameter(torch.randn(7, 3, generator=g))
    other = torch.nn.Parameter(torch.randn(4, generator=g))
    wr = torch.nn.Parameter(torch.randn(5, 9, generator=g))     # transposed, row blocks: strided storage columns
    params = [w, wt, b, whole, other, wr]
    opt = cls(params, **kw)
    heads = WeightBlocks("rows", [[(3 * h, 3)] for h in range(3)], (9, 5), bias_name="b")
    fso = FrozenSliceOptimizer(opt, {w: heads, b: heads.for_bias(), whole: WeightBlocks("all", [()], index=[3]),
                                     wt: WeightBlocks("cols", [[(2 * h, 2)] for h in range(2)], (6, 4)),
                                     wr: WeightBlocks("rows", [[(3 * h, 3)] for h in range(3)], (9, 5))},
                               transposed={wt, wr}, num_modules=4)
    # (tensor, index into it, module or None = always trained); columns of wt's linear view [6, 4] are stored rows
    pieces = [(w, slice(3 * h, 3 * h + 3), h) for h in range(3)] + [(b, slice(3 * h, 3 * h + 3), h) for h in range(3)]
    pieces += [(wt, slice(2 * h, 2 * h + 2), h) for h in range(2)]
    pieces += [(wr, (slice(None), slice(3 * h, 3 * h + 3)), h) for h in range(3)]
    pieces += [(whole, slice(None), 3), (other, slice(None), None)]
    refs = [torch.nn.Parameter(t.detach()[ix].clone()) for t, ix, _ in pieces]
    ref_opts = [cls([r], **kw) for r in refs]
    masks = [[True] * 4, [True, False, True, False], [False, False, True, True], [True, True, False, True],
             [True, True, True, True], [False, True, False, False]]

    def same(got, want, where):
        if "fused" not in name or where[-1] == 0:  # step 0: whole tensors, as torch's own step takes them
            assert torch.equal(got, want), where
        else:  # FUSED_RTOL: the fused kernels' bits depend on where a block falls in the tensor it is updated in
            err = ((got - want).abs().max() / want.abs().max()).item()
            assert err <= FUSED_RTOL, (where, err)

    for step, mask in enumerate(masks * 2):
        grads = {id(p): torch.randn(p.shape, generator=g) for p in params}
        for p in params:
            p.grad = grads[id(p)].clone()  # (torch's fused kernels may write into the gradients)
        fso.step(torch.tensor(mask))
        if name.endswith("_masked") and not all(mask[:3]):  # wr's active segments are strided storage columns
            assert fso.routes[wr] == ("masked kernel", None)
            assert fso._plan.groups[0][1][-1].masked.companion is not None
        elif "fused" in name and not name.startswith("sgd") and not all(mask[:3]):
            assert fso.routes[wr][0] == "segment copies" and "TRITON_DEVICES" in fso.routes[wr][1]
        for (t, ix, m), r, ro in zip(pieces, refs, ref_opts):
            if m is None or mask[m]:
                r.grad = grads[id(t)][ix].clone()
                ro.step()
        for (t, ix, m), r, ro in zip(pieces, refs, ref_opts):
            same(t.detach()[ix], r.detach(), (name, m, mask, step))
            for k, v in ro.state.get(r, {}).items():
                if torch.is_tensor(v) and v.dim():
                    same(opt.state[t][k][ix], v, (name, k, m, mask, step))


def _adam_reference(p0, grads, lr, betas, eps, wd, decoupled):
    """Plain Adam/AdamW on one tensor with its own step count (the block's history)."""
    p, m, v = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)
    for t, gr in enumerate(grads, 1):
        if not decoupled:
            gr = gr + wd * p
        else:
            p = p * (1 - lr * wd)
        m = betas[0] * m + (1 - betas[0]) * gr
        v = betas[1] * v + (1 - betas[1]) * gr * gr
        p = p - lr / (1 - betas[0] ** t) * m / ((v / (1 - betas[1] ** t)).sqrt() + eps)
    return p


@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW])
def test_adam_bias_correction_counts_steps_per_block(cls):
    """A head frozen during steps 2-3 has taken 3 of 5 steps: its update must equal plain Adam run on that head
    alone for its 3 steps (with the stale moments kept), not a tensor-level count of 5."""
    g = torch.Generator().manual_seed(1)
    w = torch.nn.Parameter(torch.randn(4, 3, generator=g, dtype=torch.float64))
    opt = cls([w], lr=0.05, weight_decay=0.1, foreach=False)
    fso = FrozenSliceOptimizer(opt, {w: WeightBlocks("rows", [[(0, 2)], [(2, 2)]])}, num_modules=2)
    p0 = w.detach().clone()
    masks = [[True, True], [True, False], [True, False], [True, True], [True, True]]
    grads_block1 = []
    for mask in masks:
        gr = torch.randn(4, 3, generator=g, dtype=torch.float64)
        w.grad = gr.clone()
        if mask[1]:
            grads_block1.append(gr[2:])
        fso.step(torch.tensor(mask))
    want = _adam_reference(p0[2:], grads_block1, 0.05, (0.9, 0.999), 1e-8, 0.1, cls is torch.optim.AdamW)
    torch.testing.assert_close(w.detach()[2:], want, rtol=1e-12, atol=1e-12)


def test_unsupported_optimizer_is_refused():
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(TypeError, match="unsupported optimizer RMSprop"):
        FrozenSliceOptimizer(torch.optim.RMSprop([p]), {p: WeightBlocks("all", [()])}, num_modules=1)
    with pytest.raises(ValueError, match="not in the optimizer"):
        FrozenSliceOptimizer(torch.optim.SGD([p], lr=0.1),
                             {torch.nn.Parameter(torch.zeros(1)): WeightBlocks("all", [()])}, num_modules=1)
    with pytest.raises(ValueError, match=r"built for shape \(3, 1\)"):  # blocks of another tensor
        FrozenSliceOptimizer(torch.optim.SGD([p], lr=0.1), {p: WeightBlocks("rows", [[(0, 1)]], (3, 1))},
                             num_modules=1)
    with pytest.raises(ValueError, match="out of bounds for rows of length 2"):  # checked against the parameter
        FrozenSliceOptimizer(torch.optim.SGD([p], lr=0.1), {p: WeightBlocks("rows", [[(1, 2)]])}, num_modules=1)
    with pytest.raises(ValueError, match="module index is outside"):
        FrozenSliceOptimizer(torch.optim.SGD([p], lr=0.1), {p: WeightBlocks("all", [()], index=[1])},
                             num_modules=1)
    with pytest.raises(TypeError, match="must be WeightBlocks"):
        FrozenSliceOptimizer(torch.optim.SGD([p], lr=0.1), {p: [(0, 1)]}, num_modules=1)
    fso = FrozenSliceOptimizer(torch.optim.SGD([p], lr=0.1), {p: WeightBlocks("all", [()])}, num_modules=1)
    with pytest.raises(ValueError, match="active must have shape"):
        fso.step(torch.tensor([True, False]))


def test_adam_block_fix_uses_the_live_param_groups_after_load_state_dict():
    """load_state_dict replaces the optimizer's param_group dicts (where schedulers write lr): the per-block
    correction must read the live ones. With lr = 0 after the load, nothing may move."""
    g = torch.Generator().manual_seed(2)
    w = torch.nn.Parameter(torch.randn(4, 3, generator=g))
    opt = torch.optim.Adam([w], lr=0.1)
    fso = FrozenSliceOptimizer(opt, {w: WeightBlocks("rows", [[(0, 2)], [(2, 2)]])}, num_modules=2)
    for mask in ([True, True], [True, False]):
        w.grad = torch.randn(4, 3, generator=g)
        fso.step(torch.tensor(mask))
    sd = opt.state_dict()
    sd["param_groups"][0]["lr"] = 0.0
    opt.load_state_dict(sd)
    before = w.detach().clone()
    w.grad = torch.randn(4, 3, generator=g)
    fso.step(torch.tensor([True, True]))  # block 1 is behind: its update is recomputed, with lr = 0
    assert torch.equal(w.detach(), before)


def test_optimizer_state_loaded_after_block_steps_is_adopted():
    """A checkpoint resumed in the order "block steps (MAT's state) first, then the torch optimizer's state": the
    next step must take the loaded state's step count for entries no module owns (a bias here), as a resume in the
    other order does. (It once kept the count of the empty state it had adopted when block_steps was set: Adam's
    bias correction of step 1 instead of step 3.)"""
    g = torch.Generator().manual_seed(3)

    def make():
        w = torch.nn.Parameter(torch.randn(4, 3, generator=torch.Generator().manual_seed(0)))
        b = torch.nn.Parameter(torch.zeros(3))
        opt = torch.optim.Adam([w, b], lr=0.1)
        return w, b, opt, FrozenSliceOptimizer(opt, {w: WeightBlocks("rows", [[(0, 2)], [(2, 2)]])}, num_modules=2)

    w, b, opt, fso = make()
    for mask in ([True, True], [True, False]):
        w.grad, b.grad = torch.randn(4, 3, generator=g), torch.randn(3, generator=g)
        fso.step(torch.tensor(mask))
    saved = copy.deepcopy((w.detach(), b.detach(), opt.state_dict(), fso.block_steps))
    grads = torch.randn(4, 3, generator=g), torch.randn(3, generator=g)
    out = []
    for order in ("optimizer first", "block steps first"):
        w2, b2, opt2, fso2 = make()
        with torch.no_grad():
            w2.copy_(saved[0])
            b2.copy_(saved[1])
        sd = copy.deepcopy(saved[2])
        if order == "optimizer first":
            opt2.load_state_dict(sd)
            fso2.block_steps = saved[3]
        else:
            fso2.block_steps = saved[3]
            opt2.load_state_dict(sd)
        w2.grad, b2.grad = grads[0].clone(), grads[1].clone()
        fso2.step(torch.tensor([True, True]))
        out.append((w2.detach().clone(), b2.detach().clone()))
    with pytest.raises(ValueError, match="block_steps must have 2 entries"):
        fso2.load_state_dict({"optimizer": copy.deepcopy(saved[2]), "block_steps": torch.tensor([1, 2, 3])})
    w.grad, b.grad = grads
    fso.step(torch.tensor([True, True]))  # the run that was not interrupted
    for w2, b2 in out:
        assert torch.equal(w2, w.detach()) and torch.equal(b2, b.detach())


def test_random_policy_keeps_the_mean_count_among_eligible_modules():
    """policy="random" (the ablation): as many of the eligible modules as the mean rule keeps, picked among the
    eligible only (MAT passes those the temporal rule has not frozen for good): the one implementation of it."""
    lam = torch.tensor([1.0, 4.0, 2.0, 9.0, 8.0, 0.5])  # mean 4.08: the mean rule keeps modules 3 and 4
    eligible = torch.tensor([True, True, False, True, False, True])
    for seed in range(20):
        act, tau = threshold_mask(lam, "random", generator=torch.Generator().manual_seed(seed), eligible=eligible)
        assert int(act.sum()) == 1 and not bool((act & ~eligible).any()) and tau == pytest.approx(lam.mean().item())
    act, _ = threshold_mask(lam, "random", generator=torch.Generator().manual_seed(0))
    assert int(act.sum()) == 2
