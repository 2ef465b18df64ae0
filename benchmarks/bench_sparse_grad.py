"""Benchmark: backward of a linear layer when only a fraction of its modules is updated (MAT sparse update).

For each layer shape, dtype, active fraction f ∈ {0, 0.25, 0.5, 0.75, 1} of its 12 modules and activity pattern
(``contiguous``: the first k modules; ``interleaved``: k modules spread evenly), it times one backward pass (given
x, W, b and dY: dX in full, plus dW and db of the active modules) for the providers

* ``dense_autograd``: plain autograd of ``F.linear`` (computes all of dW);
* ``dx_only``: autograd asked for dX alone (the floor);
* ``gather``: the obvious workaround: dX, then ``index_select`` the active rows/columns, one GEMM, scatter back;
* ``mat_kernels``: :func:`mat_kernels.sparse_update_linear` (one GEMM per group of runs on strided views);
* ``ideal`` (computed, not timed): ``dx_only + f × (dense_autograd − dx_only)``.

Targets (H100): mat_kernels ≤ 1.05 × ideal everywhere; at f = 1, ≤ 1.03 × dense_autograd; at f = 0 within 3 % of
dx_only. Shapes are BERT-base layers at 4096 tokens: the fused QKV projection (768→2304, 12 heads = row blocks
of Q, K and V rows), the FFN input (768→3072) and output (3072→768) projections with 12 groups of 256 hidden
units (rows of the first, columns of the second).

On CUDA times come from ``triton.testing.do_bench`` (median and 20/80 % quantiles); on CPU from a
``time.perf_counter`` loop. Every row carries the gradient error against dense autograd (norm-wise relative, with
frozen blocks zeroed) and is appended to a CSV with device, date, torch version and commit.

    python benchmarks/bench_sparse_grad.py                    # GPU run, appends to benchmarks/results/
    python benchmarks/bench_sparse_grad.py --quick --device cpu   # CPU smoke test (small shapes)
"""
from __future__ import annotations

import argparse
import math
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if REPO not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, REPO)

import _harness  # noqa: E402  (benchmarks/ is on sys.path: this script's folder)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import mat_kernels as mk  # noqa: E402
from mat_kernels.ops.sparse_grad import block_mask  # noqa: E402

DEFAULT_CSV = os.path.join(HERE, "results", "bench_sparse_grad.csv")
FRACTIONS = (0.0, 0.25, 0.5, 0.75, 1.0)
PATTERNS = ("contiguous", "interleaved")
PROVIDERS = ("dense_autograd", "dx_only", "gather", "mat_kernels", "ideal")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# name: (tokens, d_in, d_out, layout spec). 12 modules each.
SHAPES = {
    "bert_base_qkv_4096tok": (4096, 768, 2304, dict(row_blocks=mk.fused_qkv_heads(12, 64))),
    "bert_base_ffn_in_4096tok": (4096, 768, 3072, dict(row_blocks=12)),
    "bert_base_ffn_out_4096tok": (4096, 3072, 768, dict(col_blocks=12)),
}
# --quick: the same layouts scaled down 8x (hidden 96, heads of 8) and 64 tokens.
QUICK_SHAPES = {
    "quick_qkv_64tok": (64, 96, 288, dict(row_blocks=mk.fused_qkv_heads(12, 8))),
    "quick_ffn_in_64tok": (64, 96, 384, dict(row_blocks=12)),
    "quick_ffn_out_64tok": (64, 384, 96, dict(col_blocks=12)),
}

CSV_FIELDS = [
    "date", "op", "git_commit", "device", "torch", "triton", "mat_kernels", "dtype", "shape", "tokens", "d_in", "d_out",
    "blocks", "pattern",
    "fraction", "active_modules", "provider", "ms", "ms_p20", "ms_p80", "ratio_vs_ideal", "ratio_vs_dense",
    "tflops", "peak_mem_mib", "max_rel_err",
]


def active_mask(num_modules: int, fraction: float, pattern: str) -> torch.Tensor:
    """bool [num_modules] (CPU) with round(fraction * num_modules) modules active."""
    k = round(fraction * num_modules)
    if pattern == "contiguous":
        return torch.arange(num_modules) < k
    if pattern == "interleaved":  # evenly spread: module m active iff floor((m+1)k/M) > floor(mk/M)
        m = torch.arange(num_modules)
        return (m + 1) * k // num_modules > m * k // num_modules
    raise ValueError(f"unknown pattern {pattern!r}")


def _gather_backward(x, w, dy, axis, idx):
    """The workaround the issue measured: dX in full, then gather the active slice, one GEMM, scatter."""
    dx = dy @ w
    dw = torch.zeros_like(w)
    db = torch.zeros(w.shape[0], dtype=dy.dtype, device=dy.device)
    if idx.numel() == 0:
        return dx, dw, (dy.sum(0) if axis == 1 else db)
    if axis == 0:
        dy_a = dy.index_select(1, idx)
        dw.index_copy_(0, idx, dy_a.t() @ x)
        db.index_copy_(0, idx, dy_a.sum(0))
    else:
        dw.index_copy_(1, idx, dy.t() @ x.index_select(1, idx))
    if axis == 1:  # a shared bias (column blocks) always gets its full gradient
        db = dy.sum(0)
    return dx, dw, db


def _rel_err(a, b) -> float:
    a = torch.zeros_like(b) if a is None else a
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def bench_shape(name, shape, dtype, device, fractions, patterns, providers, timer):
    tokens, d_in, d_out, spec = shape
    layout = mk.WeightBlocks.build(d_out, d_in, **spec)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, d_in, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    w = (torch.randn(d_out, d_in, generator=g) / math.sqrt(d_in)).to(device=device, dtype=dtype).requires_grad_(True)
    b = torch.randn(d_out, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    dy = torch.randn(tokens, d_out, generator=g).to(device=device, dtype=dtype)
    y_dense = F.linear(x, w, b)

    def dense():
        return torch.autograd.grad(y_dense, (x, w, b), dy, retain_graph=True)

    def dx_only():
        return torch.autograd.grad(y_dense, (x,), dy, retain_graph=True)

    ref_dx, ref_dw, ref_db = dense()
    t_dense = timer(dense)
    t_dx = timer(dx_only)
    mem_dense, mem_dx = _harness.peak_extra_mib(dense, device), _harness.peak_extra_mib(dx_only, device)
    rows = []
    flops_dx = 2 * tokens * d_in * d_out
    for pattern in patterns:
        for f in fractions:
            active = active_mask(layout.num_modules, f, pattern)
            axis_len = d_out if layout.dim == 0 else d_in
            vec = block_mask(active, layout.starts, layout.sizes, layout.owners, axis_len, device=device,
                             dtype=dtype)
            mask_w = vec[:, None] if layout.dim == 0 else vec[None, :]
            mask_b = vec if layout.dim == 0 else vec.new_ones(d_out)  # column blocks share the bias: always trained
            idx = vec.nonzero().flatten()
            y_sparse = mk.sparse_update_linear(x, w, b, active=active, layout=layout)

            def sparse():
                return torch.autograd.grad(y_sparse, (x, w, b), dy, retain_graph=True, allow_unused=True)

            def gather():
                return _gather_backward(x.detach(), w.detach(), dy, layout.dim, idx)

            fns = {"dense_autograd": dense, "dx_only": dx_only, "gather": gather, "mat_kernels": sparse}
            active_frac = vec.float().mean().item()
            ideal = t_dx[0] + active_frac * (t_dense[0] - t_dx[0])
            for prov in providers:
                if prov == "ideal":
                    ms, p20, p80, mem, err = ideal, float("nan"), float("nan"), float("nan"), float("nan")
                elif prov in ("dense_autograd", "dx_only"):
                    ms, p20, p80 = t_dense if prov == "dense_autograd" else t_dx
                    mem, err = (mem_dense if prov == "dense_autograd" else mem_dx), 0.0
                else:
                    fn = fns[prov]
                    gx, gw, gb = fn()
                    err = max(_rel_err(gx, ref_dx), _rel_err(gw, ref_dw * mask_w), _rel_err(gb, ref_db * mask_b))
                    ms, p20, p80 = timer(fn)
                    mem = _harness.peak_extra_mib(fn, device)
                dw_flops = {"dense_autograd": 1.0, "dx_only": 0.0}.get(prov, active_frac)
                flops = flops_dx * (1 + dw_flops)
                rows.append({
                    "dtype": str(dtype).replace("torch.", ""), "shape": name, "tokens": tokens, "d_in": d_in,
                    "d_out": d_out, "blocks": "rows" if layout.dim == 0 else "cols", "pattern": pattern,
                    "fraction": f, "active_modules": int(active.sum()), "provider": prov, "ms": ms,
                    "ms_p20": p20, "ms_p80": p80, "ratio_vs_ideal": ms / ideal if ideal > 0 else float("nan"),
                    "ratio_vs_dense": ms / t_dense[0], "tflops": flops / (ms * 1e-3) / 1e12, "peak_mem_mib": mem,
                    "max_rel_err": err,
                })
    return rows


def _print_table(rows) -> None:
    cols = ["dtype", "shape", "pattern", "fraction", "provider", "ms", "ms_p20", "ms_p80", "ratio_vs_ideal",
            "ratio_vs_dense", "max_rel_err"]

    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    table = [cols] + [[fmt(r[c]) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    for row in table:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=None,
                   help="default: bf16 fp32 (fp32 only with --quick)")
    p.add_argument("--shapes", nargs="+", default=None, help=f"default: all of {list(SHAPES)}")
    p.add_argument("--fractions", nargs="+", type=float, default=list(FRACTIONS))
    p.add_argument("--patterns", nargs="+", choices=PATTERNS, default=list(PATTERNS))
    p.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    p.add_argument("--quick", action="store_true", help="CPU smoke test: small shapes, few repetitions")
    p.add_argument("--csv", default=None, help=f"write rows here (upsert) (default {DEFAULT_CSV}; none with --quick)")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    names = args.shapes or list(shapes)
    unknown = [n for n in names if n not in shapes]
    if unknown:
        p.error(f"unknown shapes {unknown}; choose from {list(shapes)}")
    dtypes = [DTYPES[d] for d in (args.dtypes or (["fp32"] if args.quick else ["bf16", "fp32"]))]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 rows are fp32 GEMMs, as in dense autograd's default
    def timer(fn):
        return tuple(_harness.time_ms(fn, device, quick=args.quick, min_reps=5 if args.quick else 30)[0])

    rows = []
    for dtype in dtypes:
        for name in names:
            rows += bench_shape(name, shapes[name], dtype, device, args.fractions, args.patterns, args.providers,
                                timer)
    stamp = {"op": "sparse_grad", **_harness.env_row(device)}
    rows = [{**stamp, **r} for r in rows]
    _print_table(rows)
    path = args.csv if args.csv is not None else (None if args.quick else DEFAULT_CSV)
    if path:
        _harness.upsert_csv(path, rows, key=("op", "provider", "shape", "dtype", "device", "pattern", "fraction"),
                            fields=CSV_FIELDS)
        print(f"wrote {len(rows)} rows to {path}")
    return rows


if __name__ == "__main__":
    main()
