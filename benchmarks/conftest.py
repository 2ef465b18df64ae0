"""Benchmarks run by pytest (pytest-benchmark microbenchmarks, smoke runs of the GPU scripts).

Same rule as tests/conftest.py: Triton reads TRITON_INTERPRET when kernels are decorated, so it is set before
anything imports mat_kernels. The microbenchmarks themselves time the PyTorch backend on CPU (the interpreter's
speed means nothing); on a CUDA machine they time the Triton kernels.
"""
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
