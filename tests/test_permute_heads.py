"""MAT(permute_heads=True): at each decision interchangeable heads are reordered so that the active ones are
contiguous. Oracle: the same training without permutation (same initial weights, batches and decisions) in
float64; the permuted run must give the same parameters, optimizer state and step counts in the original order
(state_dict), keep the function unchanged, leave one run of active heads per weight section, and move everything
back on close()."""
import copy

import pytest
import torch
import torch.nn.functional as F
from models import MHAModel, TinyLM, hf_bert, hf_family  # noqa: E402

import mat_kernels as mk
from mat_kernels.testing.tolerances import PERMUTED_RTOL


def _lm(model, ids):
    out = model(ids)
    logits = out.logits if hasattr(out, "logits") else out
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids.reshape(-1))


def _mha_loss(model, x):
    return model(x).square().mean()


CASES = {  # name: (model builder, batch builder, loss)
    "fused_qkv": (lambda: TinyLM(d=12, heads=4, layers=2), lambda g: torch.randint(0, 23, (3, 7), generator=g), _lm),
    "hf_bert": (lambda: hf_bert(), lambda g: torch.randint(0, 40, (3, 7), generator=g), _lm),
    "llama_gqa": (lambda: hf_family("llama"), lambda g: torch.randint(0, 40, (3, 7), generator=g), _lm),
    "qwen2_gqa": (lambda: hf_family("qwen2"), lambda g: torch.randint(0, 40, (3, 7), generator=g), _lm),  # q bias
    "mha": (lambda: MHAModel(True, d=8, heads=4), lambda g: torch.randn(3, 5, 8, generator=g, dtype=torch.float64),
            _mha_loss),
}


def _runs(mask: list[bool]) -> int:
    return sum(1 for i, a in enumerate(mask) if a and (i == 0 or not mask[i - 1]))


def _twins(case, **kw):
    build, batch, loss = CASES[case]
    torch.manual_seed(0)
    model = build().double().train()
    out = []
    for permute in (False, True):
        m = copy.deepcopy(model)
        opt = torch.optim.AdamW(m.parameters(), lr=0.05, weight_decay=0.1)
        out.append((m, mk.MAT(m, opt, warmup_steps=10 ** 6, gate_after=1, permute_heads=permute,
                              lambda_kwargs={"backend": "torch"}, **kw)))
    return out, batch, loss


def _close(a: dict, b: dict, where, dtype=torch.float64):
    """max |a - b| / max(max |b|, 1) per tensor (a bias that stays 0, e.g. BERT's key bias, is compared absolutely)."""
    for k in a:
        if torch.is_tensor(a[k]) and a[k].is_floating_point():
            err = ((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1.0)).item()
            assert err <= PERMUTED_RTOL[dtype], (where, k, err)


@pytest.mark.parametrize("case", list(CASES))
def test_permuted_training_equals_unpermuted(case):
    ((plain, mat0), (perm, mat1)), batch, loss = _twins(case)
    g = torch.Generator().manual_seed(1)
    M = len(mat0.specs)
    moved = 0
    for step in range(6):
        x = batch(g)
        for m, mat in ((plain, mat0), (perm, mat1)):
            mat.backward(loss(m, x))
            mat.step()
            mat.zero_grad()
        if step % 2 == 0:  # a decision from scripted λ (the same for both)
            lam = torch.rand(M, generator=g, dtype=torch.float64)
            mat0._decide(lam)
            mat1._decide(lam)
            moved = mat1._perm.moves
            assert torch.equal(mat0.active, mat1.active)
            # one run of active heads per weight section (grouped-query attention with two key/value groups: the
            # output projection's columns too, its query heads reordered within their groups)
            for layer, order, extra in mat1.sparse_layers:
                if {mat1.kinds[i] for i in order} <= {"head", "head_group", "head_out"}:
                    starts = [ranges[0][0] for _, ranges in layer.layout.entries()]
                    mask = [a for _, a in sorted(zip(starts, layer.active.tolist()[:len(order)]))]
                    assert _runs(mask) <= 1, (case, step, mask)
        _close(perm.state_dict(), plain.state_dict(), (case, step, "model"))
        s1, s0 = mat1.optimizer.optimizer.state_dict()["state"], mat0.optimizer.optimizer.state_dict()["state"]
        for i in s0:
            _close(s1[i], s0[i], (case, step, "optimizer", i))
        assert torch.equal(mat1.state_dict()["block_steps"], mat0.state_dict()["block_steps"])
        assert torch.equal(mat1.optimizer.state_dict()["block_steps"], mat0.optimizer.state_dict()["block_steps"])
    assert moved > 0, "no decision moved any head: the test would not test anything"
    x = batch(g)
    assert torch.allclose(loss(perm, x), loss(plain, x), rtol=PERMUTED_RTOL[torch.float64])  # the function is unchanged
    mat1.close()
    mat0.close()
    _close(dict(perm.named_parameters()), dict(plain.named_parameters()), (case, "closed"))  # moved back in place


def test_state_dicts_load_into_a_new_permuted_controller():
    """A checkpoint (model, optimizer, MAT; original order) resumes in a new permuted MAT as in the plain one."""
    ((plain, mat0), (perm, mat1)), batch, loss = _twins("fused_qkv")
    g = torch.Generator().manual_seed(2)
    for _ in range(4):  # train and decide until a decision moves heads
        lam = torch.rand(len(mat0.specs), generator=g, dtype=torch.float64)
        x = batch(g)
        for mat, m in ((mat0, plain), (mat1, perm)):
            mat.backward(loss(m, x))
            mat.step()
            mat.zero_grad()
            mat._decide(lam)
        if mat1._perm.moves:
            break
    assert mat1._perm.moves > 0
    for _ in range(2):  # steps under the moved mask: the modules' step counts differ, so their order shows
        x = batch(g)
        for mat, m in ((mat0, plain), (mat1, perm)):
            mat.backward(loss(m, x))
            mat.step()
            mat.zero_grad()
    steps = mat0.state_dict()["block_steps"]
    assert len(set(steps.tolist())) > 1 and not torch.equal(mat1._perm.to_slots(steps), steps)
    ckpt = (perm.state_dict(), mat1.optimizer.optimizer.state_dict(), mat1.state_dict(), mat1.optimizer.state_dict())
    assert torch.equal(ckpt[3]["block_steps"], mat0.optimizer.state_dict()["block_steps"])  # original order
    x = batch(g)
    resumed = []
    for wrapper in (False, True):  # the torch optimizer's state_dict, or the wrapper's (what a Trainer saves)
        saved = copy.deepcopy(ckpt)  # (a state_dict holds the live tensors; a saved checkpoint does not)
        fresh = copy.deepcopy(CASES["fused_qkv"][0]().double())
        opt = torch.optim.AdamW(fresh.parameters(), lr=0.05, weight_decay=0.1)
        mat2 = mk.MAT(fresh, opt, warmup_steps=10 ** 6, gate_after=1, permute_heads=True,
                      lambda_kwargs={"backend": "torch"})
        fresh.load_state_dict(saved[0])
        mat2.load_state_dict(saved[2])  # MAT's state first, then the optimizer's (the order once mattered)
        if wrapper:
            mat2.optimizer.load_state_dict(saved[3])
        else:
            opt.load_state_dict(saved[1])
        assert torch.equal(mat2.state_dict()["block_steps"], mat0.state_dict()["block_steps"])
        resumed.append((mat2, fresh))
    for mat, m in [(mat0, plain)] + resumed:
        mat.backward(loss(m, x))
        mat.step()
        mat.zero_grad()
    for mat2, fresh in resumed:
        _close(fresh.state_dict(), plain.state_dict(), "resumed")


def test_refusals():
    transformers = pytest.importorskip("transformers")
    bloom = transformers.BloomForCausalLM(transformers.BloomConfig(vocab_size=40, hidden_size=16, n_layer=1,
                                                                   n_head=4))
    with pytest.raises(ValueError, match="not interchangeable.*ALiBi"):
        mk.MAT(bloom, torch.optim.SGD(bloom.parameters(), lr=0.1), permute_heads=True)
    model = TinyLM()
    with pytest.raises(ValueError, match="out_proj='none'"):
        mk.MAT(model, torch.optim.SGD(model.parameters(), lr=0.1), out_proj="none", permute_heads=True)
    with pytest.raises(TypeError, match="permute_heads must be a bool"):
        mk.MAT(model, torch.optim.SGD(model.parameters(), lr=0.1), permute_heads="yes")


@pytest.mark.parametrize("case", ["fused_qkv", "hf_bert"])
def test_measured_decisions_with_permutation_equal_unpermuted(case):
    """End to end: λ captured from the training backward every 2 steps, thresholds, masks; the permuted run logs the
    same λ per module (original names and order) and ends with the same parameters."""
    build, batch, loss = CASES[case]
    torch.manual_seed(0)
    model = build().train()  # fp32: the Gram kernels take fp32/bf16/fp16
    runs = []
    for permute in (False, True):
        m = copy.deepcopy(model)
        # SGD: in fp32, Adam turns rounding-level gradients of entries whose exact gradient is 0 (BERT's key bias)
        # into steps of ~lr·noise/ε that differ between any two summation orders
        mat = mk.MAT(m, torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), warmup_steps=1, interval=2,
                     gate_after=1, permute_heads=permute, temporal_rule=False, lambda_kwargs={"backend": "torch"})
        g = torch.Generator().manual_seed(4)
        for _ in range(9):
            x = batch(g)
            with mat.measure_step(loss_scale="mean"):
                mat.backward(loss(m, x))
            mat.step()
            mat.zero_grad()
        runs.append((m, mat))
    (plain, mat0), (perm, mat1) = runs
    assert mat1._perm.moves > 0
    assert len(mat0.log) == len(mat1.log) >= 3
    for a, b in zip(mat1.log, mat0.log):
        assert a["active"] == b["active"]
        err = max(abs(x - y) for x, y in zip(a["lambda"], b["lambda"])) / max(max(map(abs, b["lambda"])), 1.0)
        assert err <= PERMUTED_RTOL[torch.float32], err
    _close(perm.state_dict(), plain.state_dict(), case, torch.float32)


def test_per_head_parameters_are_refused():
    """A norm weight over every head's channels beside the projections would not move with its head."""
    model = TinyLM(d=12, heads=4)
    model.blocks[0].q_norm = torch.nn.LayerNorm(12)  # per channel of all heads: tied to head positions
    with pytest.raises(ValueError, match=r"not interchangeable \(blocks.0.q_norm.weight"):
        mk.MAT(model, torch.optim.SGD(model.parameters(), lr=0.1), permute_heads=True)


def _column_runs(order, first_partial, cats, outs_on):
    """The output projection's activity, column block by column block, after HeadPermuter's arrangement."""
    mask = []
    for k in order:
        on = outs_on[k]
        mask += sorted(on, key=lambda a: a == (k == first_partial))
    return _runs(mask)


def test_group_order_bounds_the_output_projection_runs():
    """Key/value groups of query heads (fuzzed categories and activities): the output projection's active columns
    form at most one run per partly active group, and one run when at most one group is partly active; Q/K/V rows of
    the groups stay one run (categories in order)."""
    from mat_kernels.train.permute import HeadPermuter

    g = torch.Generator().manual_seed(3)
    for _ in range(2000):
        G, q = int(torch.randint(1, 7, (1,), generator=g)), int(torch.randint(2, 5, (1,), generator=g))
        head_on = torch.rand(G, generator=g) < 0.5
        outs_on = [(torch.rand(q, generator=g) < float(torch.rand(1, generator=g))).tolist() for _ in range(G)]
        cats = [(0 if any(o) and not h else 1 if any(o) else 2 if h else 3) for h, o in zip(head_on.tolist(), outs_on)]
        order, first_partial = HeadPermuter._order_groups(cats, outs_on)
        assert sorted(order) == list(range(G))
        assert [cats[k] for k in order] == sorted(cats)
        partial = sum(0 < sum(o) < q for o in outs_on)
        runs = _column_runs(order, first_partial, cats, outs_on)
        assert runs <= max(1, partial), (cats, outs_on, order)
        if partial <= 1:
            assert runs <= 1, (cats, outs_on, order)


def test_query_heads_are_reordered_within_their_key_value_group():
    """Llama, two key/value groups of two query heads, both groups active, output projections of the first query
    head of group 0 and the second of group 1 active: unpermuted the output projection's active columns are two
    runs ([1, 0, 0, 1]); query heads reordered within their groups (each with its Q rows) make them one, and the
    function and a training step stay those of the unpermuted model."""
    ((plain, mat0), (perm, mat1)), batch, loss = _twins("llama_gqa")
    mask = torch.tensor([True, True, False, True, False, True, True])  # group0, head0.out, head1.out, group1, ...
    for mat in (mat0, mat1):
        mat.set_active(mask)
    o_proj = next(layer for layer, order, _ in mat1.sparse_layers if {mat1.kinds[i] for i in order} == {"head_out"})
    starts = [ranges[0][0] for _, ranges in o_proj.layout.entries()]
    cols = [a for _, a in sorted(zip(starts, o_proj.active.tolist()))]
    assert _runs(cols) == 1 and sum(cols) == 2, cols
    assert mat1._perm.module_at.tolist() != list(range(7))  # the query heads moved
    g = torch.Generator().manual_seed(5)
    x = batch(g)
    assert torch.allclose(loss(perm, x), loss(plain, x), rtol=PERMUTED_RTOL[torch.float64])
    for m, mat in ((plain, mat0), (perm, mat1)):
        mat.backward(loss(m, x))
        mat.step()
        mat.zero_grad()
    _close(perm.state_dict(), plain.state_dict(), "gqa within groups")
    mat1.close()
    _close(dict(perm.named_parameters()), dict(plain.named_parameters()), "gqa closed")
