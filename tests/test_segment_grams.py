"""torch.library checks of mat_kernels::segment_grams, and property-based fuzzing of shapes."""
import pytest
import torch
from helpers import FP32_RTOL, backends, rel_err
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mat_kernels as mk
from mat_kernels.ops import segment_grams
from mat_kernels.testing.reference import reference_lambda_max


@pytest.mark.parametrize("device,backend", backends())
@pytest.mark.parametrize("route", ["psg", "ghost"])
def test_opcheck_segment_grams(device, backend, route):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 4, 7, generator=g).to(device)
    b = torch.randn(3, 4, 9, generator=g).to(device)
    torch.library.opcheck(segment_grams, (a, b, [0, 4], [4, 5], [0, 1], True, route, False, backend, 1 << 20))


def test_segment_grams_under_torch_compile():
    """The fake kernel lets torch.compile trace the op without a graph break."""
    a, b = torch.randn(3, 4, 7), torch.randn(3, 4, 9)

    def f(a, b):
        return segment_grams(a, b, [0, 4], [4, 5], [0, 0], False, "psg", False, "torch", 1 << 20) * 2

    got = torch.compile(f, fullgraph=True, backend="aot_eager")(a, b)
    torch.testing.assert_close(got, f(a, b))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 6),
    T=st.integers(1, 9),
    d_in=st.integers(1, 13),
    heads=st.integers(1, 4),
    head_dim=st.integers(1, 5),
    bias=st.booleans(),
    route=st.sampled_from(["psg", "ghost", "auto"]),
    seed=st.integers(0, 2**16),
)
def test_fuzz_shapes_torch_backend(n, T, d_in, heads, head_dim, bias, route, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, T, d_in, generator=g)
    dy = torch.randn(n, T, heads * head_dim, generator=g)
    res = mk.estimate_lambda_max(x, dy, row_blocks=heads, bias=bias, method=route, backend="torch",
                                 return_grams=True)
    lam_ref, grams_ref = reference_lambda_max(x, dy, row_blocks=heads, bias=bias)
    assert rel_err(res.grams, grams_ref) <= FP32_RTOL
