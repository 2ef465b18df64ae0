"""Bad input gets a clear TypeError/ValueError naming the argument; edge cases that must work do."""
import subprocess
import sys

import pytest
import torch

import mat_kernels as mk
from mat_kernels.testing.reference import reference_lambda_max


def _xy(n=3, T=4, d_in=8, d_out=6, dtype=torch.float32):
    return torch.randn(n, T, d_in, dtype=dtype), torch.randn(n, T, d_out, dtype=dtype)


@pytest.mark.parametrize(
    "make,exc,match",
    [
        (lambda: ([1.0], torch.randn(2, 3, 4)), TypeError, "x must be a torch.Tensor"),
        (lambda: (torch.randn(2, 3, 4), None), TypeError, "dy must be a torch.Tensor"),
        (lambda: (torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)), ValueError, "x must be"),
        (lambda: (torch.randn(5), torch.randn(5)), ValueError, "x must be"),
        (lambda: (torch.randn(2, 3, 4), torch.randn(2, 4)), ValueError, "same rank"),
        (lambda: (torch.randn(2, 3, 4), torch.randn(3, 3, 4)), ValueError, "number of samples"),
        (lambda: (torch.randn(2, 3, 4), torch.randn(2, 5, 4)), ValueError, "number of tokens"),
        (lambda: (torch.randn(0, 3, 4), torch.randn(0, 3, 4)), ValueError, "empty batch"),
        (lambda: (torch.randn(2, 0, 4), torch.randn(2, 0, 4)), ValueError, "T = 0"),
        (lambda: (torch.randn(2, 3, 0), torch.randn(2, 3, 4)), ValueError, "feature dimensions"),
        (lambda: (torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 3, 4, dtype=torch.float64)),
         TypeError, "x has dtype torch.float64"),
        (lambda: (torch.randint(0, 3, (2, 3, 4)), torch.randn(2, 3, 4)), TypeError, "x has dtype"),
        (lambda: (torch.randn(2, 3, 4), torch.randn(2, 3, 4, dtype=torch.float16)), TypeError, "same dtype"),
        (lambda: (torch.randn(2, 3, 4), torch.randn(2, 3, 4, device="meta")), ValueError, "same device"),
        (lambda: (torch.tensor([[[1.0, float("nan")]]]), torch.randn(1, 1, 2)), ValueError, "x contains NaN"),
        (lambda: (torch.randn(1, 1, 2), torch.tensor([[[1.0, float("inf")]]])), ValueError, "dy contains NaN"),
    ],
)
def test_bad_tensors(make, exc, match):
    x, dy = make()
    with pytest.raises(exc, match=match):
        mk.estimate_lambda_max(x, dy, backend="torch")


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(row_blocks=4), ValueError, "row_blocks=4 must be a positive number of equal blocks dividing 6"),
        (dict(row_blocks=0), ValueError, "row_blocks=0"),
        (dict(row_blocks=[(4, 3)]), ValueError, r"row_blocks\[0\]: range \[4, 7\) is out of bounds"),
        (dict(row_blocks=[(-1, 2)]), ValueError, "out of bounds"),
        (dict(row_blocks=[(0, 0)]), ValueError, "size must be positive"),
        (dict(row_blocks=[]), ValueError, "row_blocks is empty"),
        (dict(row_blocks=[[(0, 3), (2, 2)]]), ValueError, "overlap"),
        (dict(row_blocks=["a"]), TypeError, r"row_blocks\[0\]"),
        (dict(row_blocks=[(0.5, 2)]), TypeError, r"row_blocks\[0\]"),
        (dict(row_blocks=2.0), TypeError, "row_blocks must be"),
        (dict(col_blocks=[(0, 9)]), ValueError, r"col_blocks\[0\]: range \[0, 9\) is out of bounds for cols"),
        (dict(col_blocks=2, bias=True), ValueError, "bias=True is not defined for column blocks"),
        (dict(method="rsvd2"), ValueError, "method must be one of"),
        (dict(solver="lanczos"), ValueError, "solver must be"),
        (dict(backend="cuda"), ValueError, "backend must be"),
        (dict(sketch_size=0, method="sketch"), ValueError, "sketch_size"),
        (dict(scratch_bytes=0), ValueError, "scratch_bytes"),
    ],
)
def test_bad_options(kwargs, exc, match):
    x, dy = _xy()
    with pytest.raises(exc, match=match):
        mk.estimate_lambda_max(x, dy, **{"backend": "torch", **kwargs})


def test_bad_grams_for_solver():
    with pytest.raises(TypeError, match="grams must be a torch.Tensor"):
        mk.lambda_max([[1.0]])
    with pytest.raises(ValueError, match="square"):
        mk.lambda_max(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="empty batch"):
        mk.lambda_max(torch.randn(2, 0, 0))
    with pytest.raises(ValueError, match="NaN"):
        mk.lambda_max(torch.full((2, 2), float("nan")))
    with pytest.raises(TypeError, match="float32 or float64"):
        mk.lambda_max(torch.eye(2, dtype=torch.bfloat16))


def test_n_equal_one_works():
    x, dy = _xy(n=1)
    res = mk.estimate_lambda_max(x, dy, row_blocks=2, bias=True, backend="torch")
    lam_ref, _ = reference_lambda_max(x, dy, row_blocks=2, bias=True)
    torch.testing.assert_close(res.values.double(), lam_ref, rtol=1e-5, atol=0)


def test_check_finite_can_be_disabled():
    x, dy = _xy()
    x[0, 0, 0] = float("nan")
    res = mk.layer_grams(x, dy, backend="torch", check_finite=False)
    assert torch.isnan(res.grams).any()
    with pytest.raises(ValueError, match="x contains NaN"):
        mk.layer_grams(x, dy, backend="torch")


def test_inputs_requiring_grad_are_fine():
    x, dy = _xy()
    x.requires_grad_(True)
    res = mk.estimate_lambda_max(x, dy, backend="torch")
    assert not res.values.requires_grad


def test_fused_qkv_heads_layout():
    assert mk.fused_qkv_heads(2, 3) == [[(0, 3), (6, 3), (12, 3)], [(3, 3), (9, 3), (15, 3)]]
    with pytest.raises(ValueError):
        mk.fused_qkv_heads(0, 3)
    with pytest.raises(TypeError):
        mk.fused_qkv_heads(2.0, 3)


def test_python_m_mat_kernels_reports():
    out = subprocess.run([sys.executable, "-m", "mat_kernels"], capture_output=True, text=True, check=True).stdout
    for key in ("torch", "Triton kernels", "C++ extension", "mat_kernels::segment_grams"):
        assert key in out


# ---------------------------------------------------------------------------------------------------------------
# GramOptions: one options object, validated where it is built
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,exc,match", [
    ({"method": "fast"}, ValueError, "method must be one of"),
    ({"backend": "cuda"}, ValueError, "backend must be one of"),
    ({"sketch_size": 0}, ValueError, "sketch_size must be a positive int"),
    ({"scratch_bytes": 1.5}, ValueError, "scratch_bytes must be a positive int"),
    ({"check_finite": 1}, TypeError, "check_finite must be a bool"),
    ({"sketchsize": 4}, TypeError, r"unknown Gram option\(s\) \['sketchsize'\]"),
    ({"kernel": "cuda"}, ValueError, r"kernel must be one of \('auto', 'triton-fused', 'triton-local', 'triton-psg'"),
    ({"kernel": "torch-ghost", "method": "psg"}, ValueError, "torch-ghost is a ghost kernel"),
])
def test_gram_options_are_validated_once(kw, exc, match):
    with pytest.raises(exc, match=match):
        mk.GramOptions.of(**kw)


def test_gram_options_object_and_keywords():
    x, dy = torch.randn(3, 4, 5), torch.randn(3, 4, 6)
    opts = mk.GramOptions(method="ghost", backend="torch")
    a = mk.estimate_lambda_max(x, dy, row_blocks=2, options=opts)
    b = mk.estimate_lambda_max(x, dy, row_blocks=2, method="ghost", backend="torch")
    assert a.routes == b.routes == ("torch-ghost",) and torch.equal(a.values, b.values)
    with pytest.raises(ValueError, match="not both"):
        mk.layer_grams(x, dy, options=opts, method="psg")
    assert mk.GramOptions.of(opts, seed=3).seed == 3 and mk.GramOptions.of(opts) is opts


def test_mat_validates_its_gram_settings_at_construction():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="method must be one of"):
        mk.MAT(model, opt, specs=[mk.ModuleSpec.whole("a", "0.weight")], sparse_backward=False,
               lambda_kwargs={"method": "nope"})
    with pytest.raises(ValueError, match="kernel must be one of"):
        mk.MAT(model, opt, specs=[mk.ModuleSpec.whole("a", "0.weight")], sparse_backward=False,
               lambda_kwargs={"kernel": "fused"})
