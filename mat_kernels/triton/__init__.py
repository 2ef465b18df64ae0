"""Triton kernels. Importing a submodule imports triton; mat_kernels only does so where Triton can run."""
