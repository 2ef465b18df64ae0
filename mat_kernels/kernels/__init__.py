"""Implementations behind the ops: Triton kernels (and their autotuning) and the PyTorch fallback."""
