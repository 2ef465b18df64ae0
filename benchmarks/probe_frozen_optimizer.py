#!/usr/bin/env python
"""Probe (NOTES.md section 9): the frozen-slice optimizer step alone, at BERT-base layer shapes (fused QKV with 12
heads, output projection by column blocks, the FFN as one whole module, biases), AdamW, 1 thread, side by side
with torch's dense step and with the optimizer of an older commit (``git show <commit>:mat_kernels/train/optim.py``),
interleaved rounds in rotating order (``_harness.interleaved_ms``), medians as ratios to the dense step (the mean of two
identical dense providers, whose disagreement is printed: the noise floor).

    python benchmarks/probe_frozen_optimizer.py [--impl loop|foreach] [--old 7b4be1a] [--rounds 30]
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile

import _harness  # benchmarks/_harness.py, this script's folder
import torch

from mat_kernels import WeightBlocks, fused_qkv_heads
from mat_kernels.train.optim import FrozenSliceOptimizer

H, D, FFN = 12, 768, 3072
MASKS = {  # name: (mask over the 12 heads + the FFN module)
    "all": [True] * (H + 1),
    "heads0-5+ffn": [h < 6 for h in range(H)] + [True],
    "every4th_head": [h % 4 == 0 for h in range(H)] + [False],
}


def _old_optimizer(commit: str):
    src = subprocess.run(["git", "show", f"{commit}:mat_kernels/train/optim.py"], capture_output=True, text=True,
                         check=True, cwd=_harness.REPO).stdout
    path = os.path.join(tempfile.mkdtemp(), "optim_old.py")
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location("optim_old", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["optim_old"] = mod  # (dataclasses look their module up)
    spec.loader.exec_module(mod)
    return mod.FrozenSliceOptimizer


def _params():
    g = torch.Generator().manual_seed(0)
    shapes = [(3 * D, D), (3 * D,), (D, D), (D,), (FFN, D), (FFN,), (D, FFN), (D,)]
    return [torch.nn.Parameter(torch.randn(s, generator=g) * 0.02) for s in shapes]


def _blocks(ps):
    qkv = WeightBlocks("rows", fused_qkv_heads(H, D // H), (3 * D, D), bias_name="b")
    out = WeightBlocks("cols", [[(h * (D // H), D // H)] for h in range(H)], (D, D))
    ffn = WeightBlocks("all", [()], index=[H])
    return {ps[0]: qkv, ps[1]: qkv.for_bias(), ps[2]: out, ps[4]: ffn, ps[5]: ffn, ps[6]: ffn, ps[7]: ffn}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--impl", choices=("loop", "foreach"), default="loop")
    ap.add_argument("--old", default="7b4be1a", help="commit whose FrozenSliceOptimizer is the 'before'")
    ap.add_argument("--rounds", type=int, default=30)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    kw = dict(foreach=a.impl == "foreach")
    grads = [torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.01 for p in _params()]

    def provider(ps, step):
        own = [g.clone() for g in grads]  # private: an optimizer may write into its gradients (the old one zeroes
        # frozen rows in place, torch's fused kernels write too)

        def f():
            for p, gr in zip(ps, own):
                p.grad = gr
            step()
        return f

    fns = {}
    for name in ("dense", "dense_copy"):  # two identical dense providers: their ratio is the noise floor
        ps = _params()
        fns[name] = provider(ps, torch.optim.AdamW(ps, lr=1e-3, **kw).step)
    for tag, cls in (("before", _old_optimizer(a.old)), ("after", FrozenSliceOptimizer)):
        for name, mask in MASKS.items():
            ps = _params()
            fso = cls(torch.optim.AdamW(ps, lr=1e-3, **kw), _blocks(ps), num_modules=H + 1)
            fns[f"{tag}:{name}"] = provider(ps, lambda fso=fso, m=torch.tensor(mask): fso.step(m))
    res = _harness.interleaved_ms(fns, a.rounds, rotate=True)
    base = (res["dense"][0] + res["dense_copy"][0]) / 2  # the two identical dense providers differ by up to ~20 %
    sizes = [p.numel() for p in _params()]
    print(f"AdamW {a.impl}, 1 thread, {a.rounds} rounds; dense (mean of two identical providers) {base:.2f} ms, "
          f"the two: {res['dense'][0] / base:.3f} and {res['dense_copy'][0] / base:.3f}")
    for name, mask in MASKS.items():
        per_head = (3 * D * D + 3 * D + D * D) / H  # a head's QKV rows (+ bias) and output-projection columns
        share = (per_head * sum(mask[:H]) + (sum(sizes[4:]) if mask[H] else 0) + sizes[3]) / sum(sizes)
        print(f"{name:16s} active share {share:.3f}  before {res['before:' + name][0] / base:.3f}  "
              f"after {res['after:' + name][0] / base:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
