"""Test configuration.

Triton reads TRITON_INTERPRET when a kernel is decorated (at import of mat_kernels.kernels.triton_*), so it is set here,
before anything imports mat_kernels. On a machine with CUDA the kernels run natively instead.

Shared helpers and tolerances live in tests/helpers.py (``from helpers import ...``): a name imported from
``conftest`` would be ambiguous, since benchmarks/ has a conftest.py too.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    """Mark every test that runs on CUDA ``gpu`` (``pytest -m gpu``, benchmarks/gpu_check.sh): tests parametrised
    with a ``cuda`` device and tests skipped without a CUDA device."""
    import pytest

    for item in items:
        spec = getattr(item, "callspec", None)
        on_cuda = spec is not None and any(str(v).startswith("cuda") for v in spec.params.values())
        needs_cuda = any(m.name == "skipif" and "CUDA" in str(m.kwargs.get("reason", ""))
                         for m in item.iter_markers())
        if on_cuda or needs_cuda:
            item.add_marker(pytest.mark.gpu)
