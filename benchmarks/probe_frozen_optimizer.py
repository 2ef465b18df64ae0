#!/usr/bin/env python
"""Probe (NOTES.md section 9): the frozen-slice optimizer step alone, at BERT-base layer shapes (fused QKV with 12
heads, output projection by columns, FFN whole), AdamW, 1 thread, against torch's dense step and against the
optimizer of an older commit, interleaved rounds, medians.

    python benchmarks/probe_frozen_optimizer.py loop|foreach [old-commit]
"""
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

torch.set_num_threads(1)
from mat_kernels import WeightBlocks, fused_qkv_heads
from mat_kernels.train.optim import FrozenSliceOptimizer as New
commit = sys.argv[2] if len(sys.argv) > 2 else "7b4be1a"
src = subprocess.run(["git", "show", f"{commit}:mat_kernels/train/optim.py"], capture_output=True, text=True, check=True,
                     cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))).stdout
path = os.path.join(tempfile.mkdtemp(), "optim_old.py")
open(path, "w").write(src)
spec = importlib.util.spec_from_file_location("optim_old", path)
old = importlib.util.module_from_spec(spec)
sys.modules["optim_old"] = old
spec.loader.exec_module(old)
Old = old.FrozenSliceOptimizer
H, d = 12, 768
def params(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(3*d, d), (3*d,), (d, d), (d,), (3072, d), (3072,), (d, 3072), (d,)]
    return [torch.nn.Parameter(torch.randn(s, generator=g) * 0.02) for s in shapes]
def blocks(ps):
    qkv = WeightBlocks("rows", fused_qkv_heads(H, d // H), (3*d, d), bias_name="b")
    out = WeightBlocks("cols", [[(h*64, 64)] for h in range(H)], (d, d), index=list(range(H)))
    return {ps[0]: qkv, ps[1]: qkv.for_bias(), ps[2]: out,
            ps[4]: WeightBlocks("all", [()], index=[H]), ps[5]: WeightBlocks("all", [()], index=[H]),
            ps[6]: WeightBlocks("all", [()], index=[H]), ps[7]: WeightBlocks("all", [()], index=[H])}
grads = [torch.randn(p.shape) * 0.01 for p in params(1)]
impl = sys.argv[1] if len(sys.argv) > 1 else "loop"
kw = dict(foreach=False) if impl == "loop" else dict(foreach=True)
masks = {"all": torch.ones(H + 1, dtype=torch.bool),
         "half_contig": torch.tensor([h < 6 for h in range(H)] + [True]),
         "quarter_inter": torch.tensor([h % 4 == 0 for h in range(H)] + [False])}
provs = {}
ps = params(); o = torch.optim.AdamW(ps, lr=1e-3, **kw)
def mk_dense(ps=ps, o=o):
    def f():
        for p, g in zip(ps, grads): p.grad = g
        o.step()
    return f
provs["dense"] = mk_dense()
for name, m in masks.items():
    for cls, tag in ((Old, "old"), (New, "new")):
        ps2 = params(); o2 = torch.optim.AdamW(ps2, lr=1e-3, **kw); fso = cls(o2, blocks(ps2), num_modules=H + 1)
        def f(ps2=ps2, fso=fso, m=m):
            for p, g in zip(ps2, grads): p.grad = g
            fso.step(m)
        provs[f"{tag}_{name}"] = f
for f in provs.values():
    for _ in range(3): f()
times = {k: [] for k in provs}
for r in range(15):
    for k, f in provs.items():
        t0 = time.perf_counter(); f(); times[k].append(time.perf_counter() - t0)
dense = statistics.median(times["dense"])
print(impl, "dense ms", round(dense * 1e3, 2))
for k, v in times.items():
    print(k, round(statistics.median(v) * 1e3, 2), "ratio", round(statistics.median(v) / dense, 3))
