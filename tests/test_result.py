"""LambdaMaxResult: the one result type of the layer entry point, the model level, the capture and MAT.measure."""

import pytest
import torch
import torch.nn.functional as F
from models import TinyLM

import mat_kernels as mk
from mat_kernels.testing.tolerances import MODEL_RTOL


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _check_common(res, level, n):
    assert isinstance(res, mk.LambdaMaxResult) and res.level == level and res.n == n
    assert res.values.dtype == torch.float32 and res.values.shape == (len(res.names),) == (len(res),)
    d = res.as_dict()
    assert list(d) == list(res.names) == list(res) == list(dict(res))
    assert list(d.values()) == res.values.tolist()  # same order, Python floats
    assert dict(res.items()) == d
    name = res.names[-1]
    assert name in res and res[name] == d[name] and res.index(name) == len(res) - 1
    if res.grams is not None:
        assert res.grams.shape == (len(res), n, n)
        torch.testing.assert_close(res.gram(name), res.grams[-1], rtol=0, atol=0)


def test_layer_result_names_rows_cols_and_weight():
    x, dy = torch.randn(5, 3, 12, generator=_gen(0)), torch.randn(5, 3, 9, generator=_gen(1))
    res = mk.estimate_lambda_max(x, dy, row_blocks=3, bias=True, backend="torch", return_grams=True)
    _check_common(res, "layer", 5)
    assert res.names == ("rows0", "rows1", "rows2") and res.routes and res.solver == "eigvalsh"
    assert mk.estimate_lambda_max(x, dy, col_blocks=2, backend="torch").names == ("cols0", "cols1")
    whole = mk.estimate_lambda_max(x, dy, backend="torch")
    assert whole.names == ("weight",) and whole.grams is None
    assert mk.layer_grams(x, dy, row_blocks=3, backend="torch").names == res.names


def test_model_capture_and_mat_results_agree():
    torch.manual_seed(0)
    model = TinyLM(layers=1).eval()
    ids = torch.randint(0, 23, (4, 5), generator=_gen(2))
    model_res = mk.model_lambda_max(model, ids, labels=ids, output="loss", backend="torch", return_grams=True)
    _check_common(model_res, "model", 4)
    assert model_res.names == tuple(s.name for s in model_res.specs) and model_res.output == "loss"

    with mk.capture_lambda_max(model, loss_scale=1 / 4, backend="torch") as cap:
        F.cross_entropy(model(ids).flatten(0, 1), ids.flatten(), reduction="none").view(4, 5).sum(1).mean().backward()
    cap_res = cap.lambda_max()
    _check_common(cap_res, "capture", 4)
    assert cap_res.names == model_res.names
    torch.testing.assert_close(cap_res.values, model_res.values, rtol=MODEL_RTOL, atol=0)

    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    mat = mk.MAT(model, opt, warmup_steps=0, interval=1, probe=(ids, ids), output="loss",
                 lambda_kwargs={"backend": "torch"})
    mat_res = mat.measure()
    _check_common(mat_res, "mat", 4)
    assert mat_res.names == tuple(mat.names) and mat_res.scores.dtype == torch.float64
    torch.testing.assert_close(mat_res.values, model_res.values, rtol=MODEL_RTOL, atol=0)
    mat.close()


def test_result_errors_name_the_problem():
    res = mk.estimate_lambda_max(torch.randn(3, 4), torch.randn(3, 2), row_blocks=2, backend="torch")
    with pytest.raises(KeyError, match="no module named 'head0'.*rows0"):
        res["head0"]
    with pytest.raises(ValueError, match="return_grams=True"):
        res.gram("rows0")
    with pytest.raises(ValueError, match="one per name"):
        mk.LambdaMaxResult(("a", "b"), torch.ones(3))
    with pytest.raises(ValueError, match="distinct"):
        mk.LambdaMaxResult(("a", "a"), torch.ones(2))
    with pytest.raises(ValueError, match=r"\[M=2, n, n\]"):
        mk.LambdaMaxResult(("a", "b"), torch.ones(2), grams=torch.ones(3, 2, 2))
    with pytest.raises(ValueError, match="level"):
        mk.LambdaMaxResult(("a",), torch.ones(1), level="step")


def test_old_lambda_max_field_is_gone():
    """0.3 removed the deprecated ``.lambda_max`` field: ``values`` and ``as_dict()`` are the one way."""
    res = mk.estimate_lambda_max(torch.randn(3, 4), torch.randn(3, 2), row_blocks=2, backend="torch")
    assert not hasattr(res, "lambda_max")
    assert mk.lowest_heads(mk.LambdaMaxResult(("x.head0", "x.head1"), torch.tensor([2.0, 1.0])), 0.5,
                           keep_per_layer=1) == ["x.head1"]
