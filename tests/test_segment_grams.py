"""torch.library checks of mat_kernels::segment_grams, and property-based fuzzing of shapes."""
import pytest
import torch
from helpers import FP32_RTOL, backends, rel_err
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mat_kernels as mk
from mat_kernels.ops import segment_grams
from mat_kernels.ops.gram_dispatch import KERNELS
from mat_kernels.testing.reference import reference_lambda_max


def sample_inputs(device: str, backend: str) -> list[tuple]:
    """Arguments ``(a, b, seg_starts, seg_sizes, seg_owners, add_one, kernel)`` of ``mat_kernels::segment_grams`` on
    fresh random data: odd shapes, n = 1 and n > 16, modules made of several segments, unsorted, overlapping and
    far-apart segments, bias on and off, every implementation of ``backend`` (the Gram dispatcher's table).
    One list feeding the op's correctness and opcheck tests (the pattern of extension-cpp's test_extension.py)."""
    g = torch.Generator().manual_seed(0)
    cases = [  # n, T, DA, DB, starts, sizes, owners, add_one
        (3, 4, 7, 9, [0, 4], [4, 5], [0, 1], True),
        (1, 1, 5, 6, [0], [6], [0], False),
        (5, 3, 11, 12, [0, 3, 6, 9], [3, 3, 3, 3], [0, 1, 0, 1], True),
        (17, 2, 4, 8, [0, 5], [5, 3], [0, 0], False),
        # unsorted segments, far apart, and overlapping segments of two modules
        (4, 3, 6, 40, [30, 0, 3, 33], [6, 5, 4, 5], [1, 0, 1, 2], True),
    ]
    out = []
    for n, T, da, db, starts, sizes, owners, add_one in cases:
        a = torch.randn(n, T, da, generator=g).to(device)
        b = torch.randn(n, T, db, generator=g).to(device)
        out += [(a, b, starts, sizes, owners, add_one, k) for k, impl in KERNELS.items() if impl.BACKEND == backend]
    return out


def _oracle(a, b, starts, sizes, owners, add_one) -> torch.Tensor:
    """float64: G_i[seg] = b_i[:, seg]ᵀ [a_i, 1], module Gram = Σ over its segments of G Gᵀ."""
    a, b = a.double().cpu(), b.double().cpu()
    if add_one:
        a = torch.cat([a, torch.ones(a.shape[:2] + (1,), dtype=a.dtype)], -1)
    out = torch.zeros(1 + max(owners), a.shape[0], a.shape[0], dtype=torch.float64)
    for start, size, owner in zip(starts, sizes, owners):
        g = torch.einsum("itr,itc->irc", b[:, :, start:start + size], a).flatten(1)
        out[owner] += g @ g.T
    return out


@pytest.mark.parametrize("device,backend", backends())
def test_segment_grams_against_the_oracle(device, backend):
    for a, b, starts, sizes, owners, add_one, kernel in sample_inputs(device, backend):
        got = segment_grams(a, b, starts, sizes, owners, add_one, kernel, False, 1 << 20)
        assert got.dtype == torch.float32 and got.shape == (1 + max(owners), a.shape[0], a.shape[0])
        assert rel_err(got, _oracle(a, b, starts, sizes, owners, add_one)) <= FP32_RTOL, (kernel, a.shape)


@pytest.mark.parametrize("device,backend", backends())
def test_opcheck_segment_grams(device, backend):
    for a, b, starts, sizes, owners, add_one, kernel in sample_inputs(device, backend):
        torch.library.opcheck(segment_grams, (a, b, starts, sizes, owners, add_one, kernel, False, 1 << 20))


def test_segment_grams_under_torch_compile():
    """The fake kernel lets torch.compile trace the op without a graph break."""
    a, b = torch.randn(3, 4, 7), torch.randn(3, 4, 9)

    def f(a, b):
        return segment_grams(a, b, [0, 4], [4, 5], [0, 0], False, "torch-psg", False, 1 << 20) * 2

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

