"""Accuracy/cost curve of the sketch route (method="sketch") on the BERT-base QKV layer.

For each sketch size k: median and 90th-percentile relative λmax error over the 12 heads × several seeds,
against the exact per-sample-gradient route, on two kinds of synthetic data (i.i.d. Gaussian, and low-rank
"common features" plus noise, closer to real hidden states), the multiply-add ratio exact/sketch from
mat_kernels.route_costs, and the wall-time ratio measured on whatever device runs it.

    python benchmarks/sketch_curve.py [--device cuda] [--seeds 5] [--backend torch] [--out docs/sketch_accuracy.md]
"""
import argparse
import datetime
import platform
import statistics
import subprocess
import time
import warnings

import torch

import mat_kernels as mk


def data(kind, n, T, d, gen, device):
    if kind == "gaussian":
        x, dy = torch.randn(n, T, d, generator=gen), torch.randn(n, T, 3 * d, generator=gen)
    else:
        r = 16
        x = torch.randn(n, T, r, generator=gen) @ torch.randn(r, d, generator=gen) \
            + 0.3 * torch.randn(n, T, d, generator=gen) + torch.randn(d, generator=gen)
        dy = 0.5 * torch.randn(n, T, r, generator=gen) @ torch.randn(r, 3 * d, generator=gen) \
            + 0.2 * torch.randn(n, T, 3 * d, generator=gen)
    return x.to(device), dy.to(device)


def timed(fn, reps):
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--sizes", default="64,96,128,192,256,384")
    p.add_argument("--backend", default="auto", choices=("auto", "triton", "torch"), help="mat_kernels backend")
    p.add_argument("--out", default=None, help="write the markdown table to this file")
    a = p.parse_args(argv)
    warnings.filterwarnings("ignore", message="mat_kernels: Triton kernels unavailable")
    n, T, d = a.n, a.seq_len, 768
    blocks = dict(row_blocks=mk.fused_qkv_heads(12, 64), bias=True, check_finite=False, backend=a.backend)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for kind in ("gaussian", "lowrank"):
        x, dy = data(kind, n, T, d, gen, a.device)
        exact = mk.estimate_lambda_max(x, dy, method="psg", **blocks)
        backend = exact.backend
        t_exact = timed(lambda: mk.estimate_lambda_max(x, dy, method="psg", **blocks), 3)
        for k in [int(s) for s in a.sizes.split(",")]:
            errs = []
            for seed in range(a.seeds):
                lam = mk.estimate_lambda_max(x, dy, method="sketch", sketch_size=k, seed=seed, **blocks).values
                errs += ((lam.double() / exact.values.double() - 1).abs()).tolist()
            errs.sort()
            t_sk = timed(lambda: mk.estimate_lambda_max(x, dy, method="sketch", sketch_size=k, **blocks), 3)
            c = mk.route_costs(n, T, d + 1, 3 * d, sketch_size=k)
            rows.append((kind, k, statistics.median(errs), errs[int(0.9 * (len(errs) - 1))],
                         c["psg"] / c["sketch"], t_exact / t_sk))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dev = torch.cuda.get_device_name() if a.device == "cuda" else f"CPU ({platform.processor() or platform.machine()})"
    lines = [
        f"Sketch accuracy/cost, BERT-base fused QKV layer (768→2304, 12 heads, bias), n={n}, T={T}, fp32; "
        f"{a.seeds} seeds × 12 heads per row.",
        f"Measured {datetime.date.today()} on {dev}, backend {backend}, commit {commit}, command: "
        f"`python benchmarks/sketch_curve.py --device {a.device} --seeds {a.seeds} --backend {a.backend}`",
        "",
        "| data | k | median λ error | p90 λ error | MAC ratio exact/sketch | time ratio exact/sketch |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {r[0]} | {r[1]} | {100 * r[2]:.2f}% | {100 * r[3]:.2f}% | {r[4]:.2f}× | {r[5]:.2f}× |" for r in rows]
    text = "\n".join(lines)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
