"""Test configuration.

Triton reads TRITON_INTERPRET when a kernel is decorated (at import of mat_kernels.triton.*), so it is set here,
before anything imports mat_kernels. On a machine with CUDA the kernels run natively instead.

Shared helpers and tolerances live in tests/helpers.py (``from helpers import ...``): a name imported from
``conftest`` would be ambiguous, since benchmarks/ has a conftest.py too.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
