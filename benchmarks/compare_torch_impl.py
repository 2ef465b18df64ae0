#!/usr/bin/env python
"""Time the PyTorch backend's per-sample-gradient route against its version at another commit, side by side in one
process (interleaved rounds, medians), on one BERT-base fused QKV layer with bias.

    python benchmarks/compare_torch_impl.py --against 278f6a0 --threads 1

The old ``mat_kernels/kernels/torch_segment_grams.py`` (``mat_kernels/torch_impl.py`` before 0.2) is read with ``git show`` and loaded as a separate module.
"""
import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_old(commit: str):
    for path in ("mat_kernels/kernels/torch_segment_grams.py", "mat_kernels/torch_impl.py"):  # after / before 0.2
        r = subprocess.run(["git", "-C", ROOT, "show", f"{commit}:{path}"], capture_output=True, text=True)
        if r.returncode == 0:
            src = r.stdout
            break
    else:
        raise SystemExit(f"{commit} has no PyTorch segment-Gram implementation")
    path = os.path.join(tempfile.mkdtemp(), "torch_impl_old.py")
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location("torch_impl_old", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--against", required=True, help="the commit whose torch_impl.py is the baseline")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--shapes", default="32x128,8x32", help="comma-separated n x T")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    old = load_old(a.against)
    from mat_kernels.kernels import torch_segment_grams as new

    torch.manual_seed(0)
    starts, sizes = tuple(range(0, 2304, 64)), (64,) * 36
    print("| (n, T) | before | after | after / before | max relative difference |")
    print("|---|---:|---:|---:|---:|")
    for shape in a.shapes.split(","):
        n, T = (int(v) for v in shape.split("x"))
        x, dy = torch.randn(n, T, 768), torch.randn(n, T, 2304)
        ro = old.psg_segment_grams_torch(x, dy, starts, sizes, add_one=True)
        rn = new.psg_segment_grams_torch(x, dy, starts, sizes, add_one=True)
        err = ((ro - rn).abs().max() / ro.abs().max()).item()
        times = {"old": [], "new": []}
        for r in range(a.rounds):
            order = (("old", old), ("new", new)) if r % 2 == 0 else (("new", new), ("old", old))
            for name, mod in order:
                t0 = time.perf_counter()
                mod.psg_segment_grams_torch(x, dy, starts, sizes, add_one=True)
                times[name].append(time.perf_counter() - t0)
        to, tn = statistics.median(times["old"]), statistics.median(times["new"])
        print(f"| ({n}, {T}) | {to * 1e3:.1f} ms | {tn * 1e3:.1f} ms | {tn / to:.2f} | {err:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
