#!/usr/bin/env python
"""Orthogonal vs i.i.d. Gaussian sketch directions: median and max relative λmax error of the sketch route.

BERT-base fused QKV layer (768 -> 2304, 12 heads, bias), n=32, T=128, fp32, 6 seeds x 12 heads per row, on the
two synthetic data kinds of sketch_curve.py. Swaps ``mat_kernels.measure.layer._sketch_matrix`` for a Gaussian one
(scaled so that E[S Sᵀ] = I, like the orthogonal one). Records the choice made in ``_sketch_matrix``.

    python benchmarks/sketch_directions.py
"""
import importlib
import math
import os
import statistics
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sketch_curve import data  # noqa: E402

import mat_kernels as mk  # noqa: E402

est = importlib.import_module("mat_kernels.measure.layer")


def gaussian_directions(width, k, seed, device):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(width, k, generator=g, dtype=torch.float64) / math.sqrt(k)
    return s.to(device=device, dtype=torch.float32)


def main():
    warnings.filterwarnings("ignore", message="mat_kernels: Triton kernels unavailable")
    orthogonal = est._sketch_matrix
    blocks = dict(row_blocks=mk.fused_qkv_heads(12, 64), bias=True, check_finite=False, backend="torch")
    gen = torch.Generator().manual_seed(0)
    for kind in ("gaussian", "lowrank"):
        x, dy = data(kind, 32, 128, 768, gen, "cpu")
        exact = mk.estimate_lambda_max(x, dy, method="psg", **blocks).values.double()
        for k in (128, 192):
            for name, fn in (("gaussian", gaussian_directions), ("orthogonal", orthogonal)):
                est._sketch_matrix = fn
                errs = []
                for seed in range(6):
                    lam = mk.estimate_lambda_max(x, dy, method="sketch", sketch_size=k, seed=seed, **blocks)
                    errs += (lam.values.double() / exact - 1).abs().tolist()
                est._sketch_matrix = orthogonal
                print(f"data {kind:8s} k={k} {name:10s} directions: median {100 * statistics.median(errs):.2f}%"
                      f"  max {100 * max(errs):.2f}%", flush=True)


if __name__ == "__main__":
    main()
