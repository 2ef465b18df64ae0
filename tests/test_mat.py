"""The MAT controller on small real training loops: masks reach the sparse-update layers, frozen slices stay
bit-for-bit frozen, decisions survive a state_dict round trip, every probe mode, DDP."""
import copy
import os
import sys
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import assert_moved_iff_active
from models import TinyLM

import mat_kernels as mk
from mat_kernels import routing

transformers = pytest.importorskip("transformers")


def _batches(seed, count, n=8, T=6, vocab=23):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n, T), generator=g) for _ in range(count)]


def _loss(model, ids):
    return F.cross_entropy(model(ids).flatten(0, 1), ids.flatten())


def _make(seed=0, **kw):
    torch.manual_seed(seed)
    model = TinyLM(layers=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    probe = _batches(99, 1)[0]
    mat = mk.MAT(model, opt, **{"warmup_steps": 0, "patience": 1, **kw}, interval=2, probe=(probe, probe),
                 lambda_kwargs={"backend": "torch"})
    return model, opt, mat


def test_masks_reach_layers_and_frozen_slices_stay_frozen():
    model, opt, mat = _make()
    assert mat.report()["sparse_backward_layers"] == 8 and mat.report()["masked_weights"] == []
    qkv = model.blocks[0].qkv
    assert isinstance(qkv, mk.SparseUpdateLinear) and qkv.num_modules == 3  # a head = its Q, K and V ranges
    params = dict(model.named_parameters())
    froze_something = False
    for ids in _batches(1, 8):
        before = {k: v.detach().clone() for k, v in params.items()}
        active = mat.active.clone()
        mat.backward(_loss(model, ids))
        mat.step()
        mat.zero_grad()
        froze_something |= assert_moved_iff_active(mat.specs, params, before, active)
        for name in mat.always_trained:
            if name != "emb.weight":  # rows of unused tokens keep a zero gradient: only weight decay moves them
                assert not torch.equal(params[name], before[name]), name
        # each sparse layer's mask is the controller's decision for its modules
        for layer, order, extra in mat.sparse_layers:
            assert extra == 0 and torch.equal(layer.active, mat.active[order])
    assert froze_something and len(mat.log) == 4
    assert mat.log[0]["active"] == [True] * len(mat.specs)  # no gating before two measurements


def test_group_by_kind_thresholds_each_kind_against_itself():
    _, _, mat = _make()
    lam = torch.tensor([1.0, 1.0, 2.0, 1.0, 3.0, 1.0, 100.0] * 2, dtype=torch.float64)
    mat._decide(lam)
    mat._decide(lam)
    heads = [i for i, s in enumerate(mat.specs) if s.kind == "head"]
    assert any(mat.active[heads])  # a global mean (dominated by the FFNs' 100) would freeze every head
    _, _, glob = _make(group_by="all")
    glob._decide(lam)
    glob._decide(lam)
    assert not any(glob.active[heads])


def test_temporal_rule_freezes_for_good_and_stop_when_converged():
    _, _, mat = _make(stop_when_converged=True)
    M = len(mat.specs)
    base = torch.arange(1.0, M + 1, dtype=torch.float64)
    for t, lam in enumerate([base, base + 1, base + 2, base + 2.0001]):
        mat._decide(lam)
    assert bool(mat.converged.all()) and mat.should_stop and not bool(mat.active.any())
    assert not mat.measuring_now()


def test_state_dict_round_trip_makes_the_same_decisions():
    batches = _batches(2, 10)
    model, opt, mat = _make(seed=3)
    for ids in batches[:5]:
        mat.backward(_loss(model, ids))
        mat.step()
        mat.zero_grad()
    saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()), copy.deepcopy(mat.state_dict()))
    for ids in batches[5:]:
        mat.backward(_loss(model, ids))
        mat.step()
        mat.zero_grad()
    model2, opt2, mat2 = _make(seed=4)  # other init: everything must come from the saved state
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    mat2.load_state_dict(saved[2])
    for ids in batches[5:]:
        mat2.backward(_loss(model2, ids))
        mat2.step()
        mat2.zero_grad()
    assert mat2.log == mat.log and torch.equal(mat2.active, mat.active)
    for (k, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert torch.equal(a, b), k
    with pytest.raises(ValueError, match="other modules"):
        _make(out_proj="merge")[2].load_state_dict(saved[2])


def test_measuring_from_the_training_backward():
    torch.manual_seed(5)
    model = TinyLM(layers=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    mat = mk.MAT(model, opt, warmup_steps=0, interval=3, probe=None, lambda_kwargs={"backend": "torch"})
    ids = _batches(6, 1, n=4)[0]
    with pytest.raises(ValueError, match="measure_step"):
        mat.backward(_loss(model, ids))
    opt.zero_grad()
    ref = mk.model_lambda_max(model, ids, labels=ids, output="loss", specs=mat.specs, backend="torch").as_dict()
    with mat.measure_step(loss_scale=1 / 4):
        loss = F.cross_entropy(model(ids).flatten(0, 1), ids.flatten(), reduction="none").view(4, -1).sum(1).mean()
        mat.backward(loss)
    mat.step()
    mat.zero_grad()
    with mat.measure_step(loss_scale=1 / 4):  # not a measuring step: a plain backward
        mat.backward(_loss(model, ids))
    mat.step()
    assert len(mat.log) == 1
    got = dict(zip(mat.names, mat.log[0]["lambda"]))
    for k in ref:
        assert abs(got[k] - ref[k]) <= 1e-5 * ref[k]


def test_bad_configurations():
    model = TinyLM(layers=1)
    opt = torch.optim.Adam(model.parameters())
    with pytest.raises(TypeError, match="unsupported optimizer"):
        mk.MAT(model, torch.optim.RMSprop(model.parameters()))
    with pytest.raises(ValueError, match="not declared always trained"):
        mk.MAT(model, opt, always_trained=[r"^emb\."])
    with pytest.raises(ValueError, match="interval"):
        mk.MAT(model, opt, interval=0)
    with pytest.raises(ValueError, match="group_by"):
        mk.MAT(model, opt, group_by="block")
    with pytest.raises(ValueError, match="policy must be"):
        mk.MAT(model, opt, policy="median")


def test_gpt2_conv1d_layers_get_sparse_updates():
    """GPT-2's Conv1D weights ([d_in, d_out] storage) are swapped for SparseUpdateConv1D: frozen slices compute no
    weight gradient and stay frozen; active ones get exactly dense autograd's gradient."""
    torch.manual_seed(7)
    cfg = transformers.GPT2Config(vocab_size=30, n_embd=16, n_layer=1, n_head=2, n_positions=8, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager")
    model = transformers.GPT2LMHeadModel(cfg)
    dense = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 30, (4, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is merely masked any more
        mat = mk.MAT(model, opt, warmup_steps=0, interval=1, patience=1, probe=({"input_ids": ids}, ids),
                     lambda_kwargs={"backend": "torch", "causal": True})
    assert mat.report()["masked_weights"] == []
    assert isinstance(model.transformer.h[0].attn.c_attn, mk.SparseUpdateConv1D)
    assert isinstance(model.transformer.h[0].mlp.c_fc, mk.SparseUpdateConv1D)
    w = model.transformer.h[0].attn.c_attn.weight
    froze = False
    for _ in range(4):
        before, active = w.detach().clone(), mat.active.clone()
        mat.backward(model(input_ids=ids, labels=ids).loss)
        dense.zero_grad()
        dense(input_ids=ids, labels=ids).loss.backward()
        ref = dense.transformer.h[0].attn.c_attn.weight.grad
        for m, spec in enumerate(mat.specs):
            for sl in spec.slices:
                if sl.weight.endswith("c_attn.weight"):
                    for a, n in sl.ranges:  # linear rows = stored columns
                        if active[m]:
                            torch.testing.assert_close(w.grad[:, a:a + n], ref[:, a:a + n], rtol=1e-5, atol=1e-7)
                        else:
                            assert w.grad is None or not w.grad[:, a:a + n].any()
        mat.step()
        mat.zero_grad()
        for m, spec in enumerate(mat.specs):
            for sl in spec.slices:
                if sl.weight.endswith("c_attn.weight") and not active[m]:
                    froze = True
                    for a, n in sl.ranges:
                        assert torch.equal(w[:, a:a + n], before[:, a:a + n])
        dense.load_state_dict(model.state_dict())
    assert froze


class _Seq2Seq(nn.Module):
    """nn.TransformerDecoderLayer (self-attention: one packed in_proj call; cross-attention: Q and K/V row views of
    in_proj_weight) and an nn.MultiheadAttention with kdim/vdim (separate q/k/v weights)."""

    def __init__(self, d=8, heads=2):
        super().__init__()
        self.dec = nn.TransformerDecoderLayer(d, heads, 12, dropout=0.0, batch_first=True)
        self.kv = nn.MultiheadAttention(d, heads, kdim=6, vdim=5, batch_first=True)
        self.head = nn.Linear(d, 5)

    def forward(self, x, mem, k, v):
        h = self.dec(x, mem)
        return self.head(h + self.kv(h, k, v, need_weights=False)[0]).mean(1)


def test_multihead_attention_projections_get_sparse_updates():
    torch.manual_seed(8)
    model = _Seq2Seq()
    dense = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(3)
    x, mem, k, v = (torch.randn(4, T, d, generator=g) for T, d in ((5, 8), (3, 8), (3, 6), (3, 5)))
    y = torch.tensor([0, 1, 4, 2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is merely masked
        mat = mk.MAT(model, opt, warmup_steps=10**6, probe=((x, mem, k, v), y),
                     lambda_kwargs={"backend": "torch"})
    assert mat.report()["masked_weights"] == []
    names = dict(model.named_parameters())
    ids = {id(p): n for n, p in names.items()}
    gated = {ids[id(layer.weight)] for layer, _, _ in mat.sparse_layers}
    assert {"dec.self_attn.in_proj_weight", "dec.multihead_attn.in_proj_weight", "dec.self_attn.out_proj.weight",
            "kv.q_proj_weight", "kv.k_proj_weight", "kv.v_proj_weight", "kv.out_proj.weight"} <= gated
    for step in range(3):
        active = torch.rand(len(mat.specs), generator=g) < 0.5
        mat.active = active.clone()
        mat._apply_masks()
        before = {n: p.detach().clone() for n, p in names.items()}
        mat.backward(F.cross_entropy(model(x, mem, k, v), y))
        dense.zero_grad()
        F.cross_entropy(dense(x, mem, k, v), y).backward()
        ref = dict(dense.named_parameters())
        for m, spec in enumerate(mat.specs):
            for sl in spec.slices:
                grad = names[sl.weight].grad
                for a, n in sl.ranges or ((0, None),):
                    pick = (lambda t: t) if sl.axis == "all" else (
                        (lambda t, a=a, n=n: t[a:a + n]) if sl.axis == "rows" else (lambda t, a=a, n=n: t[:, a:a + n]))
                    if active[m]:
                        torch.testing.assert_close(pick(grad), pick(ref[sl.weight].grad), rtol=1e-5, atol=1e-7)
                    else:
                        assert grad is None or not pick(grad).any(), (spec.name, sl.weight)
        mat.step()
        mat.zero_grad()
        for m, spec in enumerate(mat.specs):
            for sl in spec.slices:
                if not active[m] and sl.axis == "rows":
                    for a, n in sl.ranges:
                        assert torch.equal(names[sl.weight][a:a + n], before[sl.weight][a:a + n])
        dense.load_state_dict(model.state_dict())


def test_multihead_attention_routing_bypassed_by_torch_compile_is_an_error():
    """torch.compile traces nn.MultiheadAttention with the original F.linear: the sparse routing would be silently
    off (frozen heads with a full weight gradient), so the forward says so instead."""
    torch.manual_seed(10)
    model = _Seq2Seq()
    g = torch.Generator().manual_seed(5)
    x, mem, k, v = (torch.randn(2, T, d, generator=g) for T, d in ((5, 8), (3, 8), (3, 6), (3, 5)))
    mat = mk.MAT(model, torch.optim.SGD(model.parameters(), lr=0.1), warmup_steps=10**6,
                 probe=((x, mem, k, v), torch.tensor([0, 1])), lambda_kwargs={"backend": "torch"})
    model(x, mem, k, v)  # eager: routed
    with pytest.raises(RuntimeError, match="were bypassed"):
        torch.compile(model.kv, backend="aot_eager")(x, k, v, need_weights=False)
    assert routing.linear_handlers() == 1 and mat.report()["masked_weights"] == []  # the routing, while MAT lives
    mat.close()
    assert F.linear is torch._C._nn.linear and routing.linear_handlers() == 0
    torch._dynamo.reset()


def test_multihead_attention_routing_ends_with_its_controller():
    import gc

    from mat_kernels.nn.sparse_mha import _MHA_WEIGHTS

    torch.manual_seed(9)
    model = _Seq2Seq()
    g = torch.Generator().manual_seed(4)
    x, mem, k, v = (torch.randn(2, T, d, generator=g) for T, d in ((5, 8), (3, 8), (3, 6), (3, 5)))
    gc.collect()
    before = len(_MHA_WEIGHTS)
    mat = mk.MAT(model, torch.optim.SGD(model.parameters(), lr=0.1), warmup_steps=10**6,
                 probe=((x, mem, k, v), torch.tensor([0, 1])), lambda_kwargs={"backend": "torch"})
    assert len(_MHA_WEIGHTS) == before + 8  # two attentions of the decoder layer (in and out) + kv's four
    del mat
    gc.collect()
    assert len(_MHA_WEIGHTS) == before  # the attention trains through plain F.linear again
    assert routing.linear_handlers() == 0 and F.linear is torch._C._nn.linear  # the router went with the states
    model(x, mem, k, v).sum().backward()
    assert model.kv.q_proj_weight.grad is not None and F.linear is torch.nn.functional.linear


def _ddp_worker(rank, world, path, port):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    warnings.simplefilter("ignore")
    torch.manual_seed(0)  # same init on every rank
    model = TinyLM(layers=1)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-2, weight_decay=0.1)
    probe = _batches(50 + rank, 1)[0]  # different probe data per rank: λ differ until all-reduced
    mat = mk.MAT(ddp, opt, warmup_steps=0, interval=2, probe=(probe, probe), lambda_kwargs={"backend": "torch"})
    for ids in _batches(10 + rank, 6):
        mat.backward(_loss(ddp, ids))
        mat.step()
        mat.zero_grad()
    torch.save({"state": model.state_dict(), "log": mat.log}, os.path.join(path, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_ddp_two_processes_make_the_same_decisions(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, str(tmp_path), port), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert r0["log"] == r1["log"] and len(r0["log"]) == 3
    assert any(not all(e["active"]) for e in r0["log"])  # something was frozen
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k


@pytest.mark.parametrize("frozen_backward", ["dw", "detach"])
def test_close_restores_the_model(frozen_backward):
    """close(): the original layers are back, nothing is routed or gated, the model trains densely again."""
    from mat_kernels.nn.sparse_mha import _MHA_WEIGHTS

    torch.manual_seed(11)
    model = _Seq2Seq()
    types = {n: type(m) for n, m in model.named_modules()}
    g = torch.Generator().manual_seed(6)
    batch = tuple(torch.randn(2, T, d, generator=g) for T, d in ((5, 8), (3, 8), (3, 6), (3, 5)))
    y = torch.tensor([0, 1])
    mat = mk.MAT(model, torch.optim.SGD(model.parameters(), lr=0.1), warmup_steps=10**6, probe=(batch, y),
                 frozen_backward=frozen_backward, lambda_kwargs={"backend": "torch"})
    mat.active = torch.zeros(len(mat.specs), dtype=torch.bool)
    mat._apply_masks()
    n_routed = len(_MHA_WEIGHTS)
    assert isinstance(model.dec.linear1, mk.SparseUpdateLinear)
    mat.close()
    mat.close()  # idempotent
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert len(_MHA_WEIGHTS) == n_routed - 8 and all(p.requires_grad for p in model.parameters())
    dense = copy.deepcopy(model)
    F.cross_entropy(model(*batch), y).backward()
    F.cross_entropy(dense(*batch), y).backward()
    for (name, p), q in zip(model.named_parameters(), dense.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-8)
    with pytest.raises(RuntimeError, match="was closed"):
        mat.step()


def test_close_removes_requires_grad_gates():
    torch.manual_seed(12)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding="same"), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    x, y = torch.randn(4, 1, 6, 6), torch.tensor([0, 1, 2, 0])
    mat = mk.MAT(model, torch.optim.SGD(model.parameters(), lr=0.1), warmup_steps=10**6, probe=(x, y),
                 frozen_backward="detach", lambda_kwargs={"backend": "torch"})
    assert mat.report()["gated_weights"] == ["0.weight", "0.bias"]
    mat.active = torch.zeros(len(mat.specs), dtype=torch.bool)
    mat._apply_masks()
    assert not model[0].weight.requires_grad
    mat.close()
    assert model[0].weight.requires_grad and model[0].bias.requires_grad and not model[0]._forward_pre_hooks
    F.cross_entropy(model(x), y).backward()
    assert model[0].weight.grad is not None
