"""The registry of layer types (mat_kernels.layers): a toy layer type declared in one file (tests/toy_layer.py)
gets discovery, λ against the float64 oracle (both backends) and MAT's frozen-FLOPs skipping."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from oracle import _gen, run_and_check
from toy_layer import ScaledLinear

import mat_kernels as mk
from mat_kernels import layers
from mat_kernels.train.flops import count_flops


def _model():
    torch.manual_seed(31)
    return nn.Sequential(ScaledLinear(6, 5), nn.Tanh(), ScaledLinear(5, 3, scale=1.5))


def test_the_toy_type_is_registered_before_the_built_in_ones():
    assert layers.layer_types()[0] == "toy_scaled_linear"
    assert layers.layer_type_of(ScaledLinear(2, 3), "kernel").name == "toy_scaled_linear"
    assert layers.layer_type_of(ScaledLinear(2, 3), "bias") is None
    assert layers.linear_shape(ScaledLinear(2, 3), "kernel", torch.zeros(2, 3)) == (3, 2)


def test_discovery_makes_each_toy_layer_a_module():
    disc = mk.discover_modules(_model())
    assert disc.names() == ["0", "2"] and {s.kind for s in disc.specs} == {"scaled"}
    assert disc.specs[0].slices[0] == mk.ParamSlice("0.kernel", "all", (), "0.bias") and disc.unclaimed == {}


@pytest.mark.parametrize("shape", [(4, 6), (3, 2, 6)])  # [n, d] and [n, T, d] inputs (odd sizes)
def test_toy_lambdas_match_the_oracle(shape):
    model = _model()
    x = torch.randn(*shape, generator=_gen(32))
    labels = torch.randint(0, 3, shape[:-1], generator=_gen(33))
    run_and_check(model, x, labels)


@pytest.mark.parametrize("frozen_backward", ["dw", "detach"])
def test_a_frozen_toy_layer_skips_its_weight_gradient(frozen_backward):
    model = _model()
    x, y = torch.randn(5, 6, generator=_gen(34)), torch.randint(0, 3, (5,), generator=_gen(35))
    mat = mk.MAT(model, torch.optim.SGD(model.parameters(), lr=0.1), warmup_steps=0, interval=1, probe=(x, y),
                 frozen_backward=frozen_backward, lambda_kwargs={"backend": "torch"})
    assert mat.report()["masked_weights"] == [] and len(mat.report()["gated_weights"]) == 4  # gated, 2 x (K, b)
    dense, _ = count_flops(lambda: F.cross_entropy(model(x), y).backward())
    model.zero_grad(set_to_none=True)
    mat.set_active(torch.tensor([False, True]))
    flops, _ = count_flops(lambda: mat.backward(F.cross_entropy(model(x), y)))
    # layer 0's dK GEMM, and layer 2's dX, which nothing needs any more (the input x does not require grad)
    assert flops == dense - 2 * 5 * 6 * 5 - 2 * 5 * 3 * 5
    assert model[0].kernel.grad is None and model[2].kernel.grad is not None
    before = model[0].kernel.detach().clone()
    mat.step()
    assert torch.equal(model[0].kernel.detach(), before)
    mat.close()


def test_registry_errors():
    with pytest.raises(ValueError, match="already registered"):
        layers.register_layer_type(type(layers.layer_type_of(ScaledLinear(2, 3), "kernel"))())
    with pytest.raises(TypeError, match="LayerType instance"):
        layers.register_layer_type(ScaledLinear)
    with pytest.raises(ValueError, match="no user layer type named 'linear'"):
        layers.unregister_layer_type("linear")
    with pytest.raises(ValueError, match="no registered layer type"):
        mk.model_lambda_max(nn.Sequential(nn.Embedding(4, 3), nn.Linear(3, 2)), torch.zeros(2, 1, dtype=torch.long),
                            labels=torch.zeros(2, 1, dtype=torch.long),
                            specs=[mk.ModuleSpec("e", (mk.ParamSlice("0.weight"),))])


def test_a_layer_type_must_say_what_it_matches():
    class NoMatch(layers.LayerType):
        name = "no_match"

    with pytest.raises(TypeError, match="abstract"):
        NoMatch()
