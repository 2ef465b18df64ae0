#!/usr/bin/env python
"""Probe (NOTES.md section 13): what frozen rows' gradients cost a layer's forward + backward on the CPU. Three
providers per layer and mask, interleaved rounds in rotating order, each ``lin(x).backward(dy)`` then gradients
dropped:

- ``returned``: the default sparse backward, a full-size dW returned to autograd (frozen rows allocated and zeroed
  at every backward), ``.grad`` set to None afterwards;
- ``buffer``: ``accumulate_grad=True`` into a persistent ``.grad`` whose frozen rows are zero from its allocation
  on; the active rows are zeroed afterwards (one ``index_fill_``), nothing else is written per step;
- ``dense``: ``F.linear`` (reference).

    python benchmarks/probe_grad_buffer.py [--rounds 15] [--threads 1] [--tokens 4096]
"""
from __future__ import annotations

import argparse
import statistics

import _harness  # benchmarks/_harness.py, this script's folder
import torch

import mat_kernels as mk
from mat_kernels.ops.sparse_grad import block_mask

CASES = {  # name: (d_in, d_out, sparse-layer keywords, active modules of 12)
    "bert-qkv 1/4": (768, 2304, dict(row_blocks=mk.fused_qkv_heads(12, 64)), 3),
    "bert-qkv 3/4": (768, 2304, dict(row_blocks=mk.fused_qkv_heads(12, 64)), 9),
    "bert-ffn-in 1/4": (768, 3072, dict(row_blocks=12), 3),
    "bert-out 1/4": (768, 768, dict(col_blocks=12), 3),
}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=4096)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    for name, (d_in, d_out, kw, k) in CASES.items():
        x = torch.randn(a.tokens, d_in, generator=g).requires_grad_(True)
        dy = torch.randn(a.tokens, d_out, generator=g)
        mask = torch.zeros(12, dtype=torch.bool)
        mask[torch.randperm(12, generator=g)[:k]] = True
        ret = mk.SparseUpdateLinear(d_in, d_out, **kw)
        buf = mk.SparseUpdateLinear(d_in, d_out, accumulate_grad=True, **kw)
        dense = torch.nn.Linear(d_in, d_out)
        for lin in (ret, buf):
            lin.set_active(mask)
        lay = buf.layout
        rows = block_mask(mask, lay.starts, lay.sizes, lay.owners, d_out if lay.dim == 0 else d_in,
                          device="cpu", dtype=torch.bool).nonzero().flatten()

        def run_returned():
            ret(x).backward(dy)
            ret.weight.grad = ret.bias.grad = x.grad = None

        def run_buffer():
            buf(x).backward(dy)
            buf.weight.grad.index_fill_(lay.dim, rows, 0.0)  # the active rows back to zero; frozen ones never written
            if buf.bias.grad is not None:
                buf.bias.grad.zero_()
            x.grad = None

        def run_dense():
            dense(x).backward(dy)
            dense.weight.grad = dense.bias.grad = x.grad = None

        t = _harness.interleaved_times({"dense": run_dense, "returned": run_returned, "buffer": run_buffer},
                                       a.rounds, rotate=True)
        td = statistics.median(t["dense"])
        ratio = statistics.median(b / r for b, r in zip(t["buffer"], t["returned"]))
        print(f"{name:16s} dense {td:7.1f} ms  returned {statistics.median(t['returned']):7.1f}  buffer "
              f"{statistics.median(t['buffer']):7.1f}  buffer/returned {ratio:.3f}", flush=True)


if __name__ == "__main__":
    main()
