"""Test configuration.

Triton reads TRITON_INTERPRET when a kernel is decorated (at import of mat_kernels.kernels.triton_*), so it is set here,
before anything imports mat_kernels. On a machine with CUDA the kernels run natively instead.

Shared helpers and tolerances live in tests/helpers.py (``from helpers import ...``): a name imported from
``conftest`` would be ambiguous, since benchmarks/ has a conftest.py too.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    """Mark every test that runs on CUDA ``gpu`` (``pytest -m gpu``, benchmarks/gpu_check.sh): tests parametrised
    with a ``cuda`` device and tests skipped without a CUDA device."""
    for item in items:
        spec = getattr(item, "callspec", None)
        on_cuda = spec is not None and any(str(v).startswith("cuda") for v in spec.params.values())
        needs_cuda = any(m.name == "skipif" and "CUDA" in str(m.kwargs.get("reason", ""))
                         for m in item.iter_markers())
        if on_cuda or needs_cuda:
            item.add_marker(pytest.mark.gpu)


@pytest.fixture(params=["auto", "gather", "strided"])
def gemm_plan(request, monkeypatch):
    """The sparse ops' GEMM plans (csrc/sparse_grad.cpp): the cost model's choice, and each plan forced (CUDA takes
    `strided`; the CPU gathers when several runs would repack the shared operand)."""
    monkeypatch.setenv("MAT_KERNELS_GEMM_PLAN", request.param)
    return request.param


@pytest.fixture
def strided_plan(monkeypatch):
    """The strided-view plan (one GEMM per group of runs, no copies), what CUDA runs, forced on the CPU."""
    monkeypatch.setenv("MAT_KERNELS_GEMM_PLAN", "strided")
