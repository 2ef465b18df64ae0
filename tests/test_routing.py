"""mat_kernels.routing: the one interception of F.linear (a measurement's recorder outside the sparse updates' router
of nn.MultiheadAttention weights) and the one exact-backward scope, entered by the capture."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mat_kernels as mk
from mat_kernels import routing

TORCH_LINEAR = torch._C._nn.linear


class _Attn(nn.Module):
    """One self-attention (nn.MultiheadAttention: 2 heads of 4 in one packed in_proj_weight) and a head."""

    def __init__(self, attention_cls=nn.MultiheadAttention):
        super().__init__()
        self.attn = attention_cls(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.attn(x, x, x, need_weights=False)[0]).mean(1)


class _InterruptedAttention(nn.MultiheadAttention):
    """Interrupted (Ctrl-C) in the middle of its forward, after its F.linear calls: module hooks with
    ``always_call=True`` do not run for a KeyboardInterrupt."""

    interrupt = True

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        if self.interrupt:
            raise KeyboardInterrupt
        return out


def _data(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


def _frozen_head_rows(d=8, heads=2, h=1):
    hd = d // heads
    return [r for part in range(3) for r in range(part * d + h * hd, part * d + (h + 1) * hd)]


@pytest.fixture(autouse=True)
def _no_handler_left():
    yield
    assert routing.linear_handlers() == 0, "a test left an F.linear handler registered"


def _mat(model, **kw):
    x, y = _data(seed=9)
    mat = mk.MAT(model, torch.optim.SGD(model.parameters(), lr=0.1), warmup_steps=0, interval=1,
                 lambda_kwargs={"backend": "torch"}, **{"probe": (x, y), **kw})
    assert mat.report()["masked_weights"] == []  # routed, not merely masked
    names = list(mat.names)
    active = torch.ones(len(names), dtype=torch.bool)
    active[names.index("attn.head1")] = False
    active[names.index("attn.head1.out")] = False
    mat.set_active(active)
    return mat


def test_a_measurement_records_the_sparse_route_of_a_routed_attention():
    """A measuring training step (probe=None) of MAT on nn.MultiheadAttention: the capture's recorder sits outside
    the sparse router, so the frozen head gets no weight gradient (before, the recording F.linear replaced the
    router and computed the full dW), and its λ is the float64 oracle's."""
    torch.manual_seed(3)
    model = _Attn()
    plain = copy.deepcopy(model)
    mat = _mat(model, probe=None)
    x, y = _data()
    with mat.measure_step(loss_scale=1 / len(x)):
        mat.backward(F.cross_entropy(model(x), y))
    frozen = _frozen_head_rows()
    gw = model.attn.in_proj_weight.grad
    assert gw is not None and gw[frozen].abs().max() == 0 and gw.abs().sum() > 0
    assert model.attn.out_proj.weight.grad[:, 4:].abs().max() == 0
    try:
        mat.step()
    finally:
        mat.close()
    got = mat.log[-1]["lambda"]
    ref = mk.model_lambda_max(plain, x, labels=y, specs=mat.specs, output="loss", backend="torch")
    for name, lam in zip(mat.names, got):
        assert abs(lam - ref[name]) <= 1e-5 * ref[name], name


def test_a_probe_measurement_of_a_routed_attention_computes_no_weight_gradient():
    torch.manual_seed(4)
    model = _Attn()
    mat = _mat(model)
    mat.measure()
    assert all(p.grad is None for p in model.parameters())
    mat.close()


def test_an_interrupted_capture_leaves_linear_and_hooks_as_they_were():
    model = _Attn(_InterruptedAttention)
    x, y = _data()
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    with pytest.raises(KeyboardInterrupt):
        mk.model_lambda_max(model, x, labels=y, backend="torch")
    assert F.linear is TORCH_LINEAR and routing.linear_handlers() == 0
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks


def test_an_interrupted_routed_attention_keeps_its_routing_and_then_ends_it():
    torch.manual_seed(5)
    model = _Attn(_InterruptedAttention)
    mat = _mat(model)
    x, y = _data()
    with pytest.raises(KeyboardInterrupt):
        model(x)
    assert routing.linear_handlers() == 1  # only MAT's router: nothing the interrupted forward entered is left
    model.attn.interrupt = False
    F.cross_entropy(model(x), y).backward()
    gw = model.attn.in_proj_weight.grad
    assert gw[_frozen_head_rows()].abs().max() == 0 and gw.abs().sum() > 0  # still routed
    mat.close()
    assert F.linear is TORCH_LINEAR and routing.linear_handlers() == 0


def test_handlers_chain_recorders_outside_routers():
    calls = []

    def make(tag):
        def handler(nxt, x, w, b=None):
            calls.append(tag)
            return nxt(x, w, b)
        return handler

    x, w = torch.randn(2, 3), torch.randn(4, 3)
    with routing.linear_handler(make("route"), routing.ROUTE), routing.linear_handler(make("record"), routing.RECORD):
        assert torch.equal(F.linear(x, w), x @ w.T)
    assert calls == ["record", "route"] and F.linear is TORCH_LINEAR
    with pytest.raises(ValueError, match="role"):
        routing.add_linear_handler(make("x"), 7)
