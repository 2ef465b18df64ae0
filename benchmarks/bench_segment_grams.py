#!/usr/bin/env python
"""Benchmark: per-module mNTK λmax of one BERT-base encoder layer (25 MAT modules), mat_kernels vs PyTorch baselines.

Workload (one layer, d = 768, 12 heads of 64, FFN 3072), four linears with stored input ``x`` and output gradient
``dy`` (random normal, seeded, one fresh contiguous tensor each):

==========  =================  ============================================  =====================
linear      weight             modules                                       module indices
==========  =================  ============================================  =====================
qkv         768 -> 2304, bias  12 heads: rows of the fused QKV weight         0..11
                               (``fused_qkv_heads(12, 64)``) + their bias
attn_out    768 -> 768         12 heads: column blocks (``col_blocks=12``),   12..23
                               no bias (the bias belongs to no head)
ffn_in      768 -> 3072, bias  the FFN module: whole weight + bias            24 (Gram added to
ffn_out     3072 -> 768, bias  the FFN module: whole weight + bias            ffn_in's)
==========  =================  ============================================  =====================

Providers (each returns the 25 λmax, fp32):

* ``torch_func``: ``torch.func.vmap(grad)`` per-sample gradients of the four linears (scalar ``Σ⟨dy, y⟩``), sliced
  per module, Grams, batched ``eigvalsh``.
* ``einsum``: hand-written per-sample gradients ``G_i = Σ_t dy_it x_itᵀ`` with einsum (materialised), Grams,
  ``eigvalsh``.
* ``ghost_einsum``: hand-written ghost Grams ``Σ_{t,s} (a_it·a_js)(b_it·b_js)`` with einsum on ``[bi, n, T, T]``
  blocks (chunked over samples under ``--ghost-budget-mib``), one module at a time, ``eigvalsh``.
* ``mat_kernels_{psg,ghost,auto,sketch}``: ``mat_kernels.layer_grams(method=...)`` per linear (``check_finite=False``)
  then ``mat_kernels.lambda_max``; for fp32 also ``*_tf32`` (``allow_tf32=True``).

Baselines compute per-sample gradients (or token-pair products) in the input dtype, as a user would write them, and
form the Grams / final reductions in fp32 (``eigvalsh`` needs fp32). In bf16 their intermediates are therefore
rounded to bf16; mat_kernels accumulates in fp32 throughout. TF32 is off for the baselines.

Measured per (shape, dtype, provider): median and 20/80 % quantiles of the wall time (``triton.testing.do_bench``,
L2 flushed before each call, on CUDA; a ``perf_counter`` loop on CPU), peak extra device memory
(``max_memory_allocated`` after ``reset_peak_memory_stats`` minus what was allocated before the call, so inputs are
excluded; CUDA only), max relative error of the 25 λmax against a float64 oracle (``mat_kernels.testing.reference``: one
autograd backward per sample in float64 on the *same* rounded inputs, explicit Grams, ``eigvalsh``), and achieved
TFLOP/s of the route's useful work (2 × ``mat_kernels.route_costs`` multiply-adds, the symmetric half of each Gram;
not the FLOPs a baseline actually executes; ``eigvalsh`` not counted).

On a machine without CUDA the mat_kernels providers run their PyTorch fallback: the ``backend`` column says which
implementation ran. Such timings say nothing about the Triton kernels.

Examples::

    python benchmarks/bench_segment_grams.py                        # both BERT shapes, fp32 + bf16, all providers
    python benchmarks/bench_segment_grams.py --device cpu --quick   # tiny smoke run (n=4, T=16, real widths)
    python benchmarks/bench_segment_grams.py --shapes bert_base_layer_n32_t128 --dtypes bf16 \\
        --providers 'mat_kernels_*,torch_func' --csv results.csv
    python benchmarks/bench_segment_grams.py --costs                # FLOP / byte / roofline-floor table, no timing
"""
from __future__ import annotations

import argparse
import fnmatch
import gc
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

import mat_kernels as mk
from mat_kernels.ops import gram_dispatch
from mat_kernels.testing import reference as mk_ref

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness  # noqa: E402

# ---------------------------------------------------------------------------------------------------------------
# workload
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """One transformer encoder layer at batch size n and sequence length T. ``ffn=None``: attention only."""

    name: str
    n: int
    T: int
    d: int = 768
    heads: int = 12
    head_dim: int = 64
    ffn: int | None = 3072


SHAPES = {
    s.name: s
    for s in (
        Shape("bert_base_layer_n32_t128", n=32, T=128),
        Shape("bert_base_layer_n8_t512", n=8, T=512),
        # --quick: the same layer widths, tiny n and T (a smoke run, not a measurement)
        Shape("bert_base_layer_n4_t16", n=4, T=16),
        Shape("bert_base_layer_n8_t32", n=8, T=32),
    )
}
FULL_SHAPES = ("bert_base_layer_n32_t128", "bert_base_layer_n8_t512")
QUICK_SHAPES = ("bert_base_layer_n4_t16",)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Linear:
    """One linear layer of the workload and the MAT modules it holds parameters of.

    ``group``: the module group its Grams belong to; Grams of linears of the same group are added (the FFN module
    spans ffn_in and ffn_out). ``bias``: the modules include the bias entries of their rows.
    """

    name: str
    d_in: int
    d_out: int
    bias: bool
    group: str
    row_blocks: object = None
    col_blocks: object = None

    def blocks(self) -> mk.WeightBlocks:
        if self.col_blocks is not None:
            return mk.resolve_blocks(self.col_blocks, self.d_in, axis="cols", name="col_blocks")
        spec = 1 if self.row_blocks is None else self.row_blocks
        return mk.resolve_blocks(spec, self.d_out, axis="rows", name="row_blocks", bias=self.bias)

    def widths(self) -> tuple[int, int]:
        """``(shared, segmented)`` widths in the sense of ``mat_kernels.route_costs`` (shared includes the +1)."""
        lb = self.blocks()
        segmented = sum(size for ranges in lb.modules for _, size in ranges)
        if lb.axis == "rows":
            return self.d_in + int(self.bias), segmented
        return self.d_out, segmented


def layer_linears(shape: Shape) -> list[Linear]:
    d, h, hd = shape.d, shape.heads, shape.head_dim
    assert h * hd == d, "heads * head_dim must equal d"
    lins = [
        Linear("qkv", d, 3 * d, True, "heads_qkv", row_blocks=mk.fused_qkv_heads(h, hd)),
        Linear("attn_out", d, d, False, "heads_out", col_blocks=h),
    ]
    if shape.ffn:
        lins += [
            Linear("ffn_in", d, shape.ffn, True, "ffn"),
            Linear("ffn_out", shape.ffn, d, True, "ffn"),
        ]
    return lins


def num_modules(shape: Shape) -> int:
    return 2 * shape.heads + (1 if shape.ffn else 0)


def assemble(linears: list[Linear], grams: list[torch.Tensor]) -> torch.Tensor:
    """Per-linear Grams ``[M_l, n, n]`` -> module Grams ``[M, n, n]``; linears of one group are added."""
    groups: dict[str, torch.Tensor] = {}
    for lin, g in zip(linears, grams):
        groups[lin.group] = g if lin.group not in groups else groups[lin.group] + g
    return torch.cat(list(groups.values()))


def make_inputs(shape: Shape, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """One fresh ``(x [n, T, d_in], dy [n, T, d_out])`` per linear: standard normal, drawn on the CPU (identical on
    every device) in fp32, then cast. bf16 inputs are the fp32 ones rounded."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for lin in layer_linears(shape):
        x = torch.randn(shape.n, shape.T, lin.d_in, generator=gen)
        dy = torch.randn(shape.n, shape.T, lin.d_out, generator=gen)
        out.append((x.to(device=device, dtype=dtype), dy.to(device=device, dtype=dtype)))
    return out


# ---------------------------------------------------------------------------------------------------------------
# float64 oracle
# ---------------------------------------------------------------------------------------------------------------


def oracle_lambda_max(shape: Shape, inputs, device: torch.device) -> torch.Tensor:
    """The 25 λmax in float64: per-sample gradients by one autograd backward per sample (mat_kernels.testing.reference,
    float64, on ``device``), explicit Grams, FFN Grams added, ``eigvalsh``. Returned on the CPU."""
    linears = layer_linears(shape)
    grams = []
    for lin, (x, dy) in zip(linears, inputs):
        _, g = mk_ref.reference_lambda_max(
            x.to(device), dy.to(device), row_blocks=lin.row_blocks, col_blocks=lin.col_blocks, bias=lin.bias,
            oracle="loop", dtype=torch.float64,
        )
        grams.append(g)
    return torch.linalg.eigvalsh(assemble(linears, grams))[..., -1].cpu()


# ---------------------------------------------------------------------------------------------------------------
# baselines
# ---------------------------------------------------------------------------------------------------------------


def _module_index(lb: mk.WeightBlocks, device) -> torch.Tensor | None:
    """``[M, R]`` indices of each module's rows/columns (modules of equal size), or None if it is the whole axis."""
    mods = [[i for start, size in ranges for i in range(start, start + size)] for ranges in lb.modules]
    if len(mods) == 1 and mods[0] == list(range(len(mods[0]))):
        return None
    if len({len(m) for m in mods}) != 1:
        raise NotImplementedError("baselines batch modules of equal size only")
    return torch.tensor(mods, dtype=torch.long, device=device)


def psg_module_grams(gw: torch.Tensor, gb: torch.Tensor | None, lb: mk.WeightBlocks,
                     idx: torch.Tensor | None) -> torch.Tensor:
    """Grams ``[M, n, n]`` (fp32) from materialised per-sample gradients ``gw [n, d_out, d_in]`` (+ ``gb [n, d_out]``),
    all modules of the layer batched: gather each module's slice, ``J Jᵀ`` in fp32."""
    n, d_out, _ = gw.shape
    if lb.axis == "rows":
        if idx is None:
            jw = gw.reshape(1, n, -1)
            jb = gb.reshape(1, n, -1) if lb.bias else None
        else:
            M = idx.shape[0]
            jw = gw.index_select(1, idx.flatten()).reshape(n, M, -1).transpose(0, 1)
            jb = gb.index_select(1, idx.flatten()).reshape(n, M, -1).transpose(0, 1) if lb.bias else None
    else:
        M = idx.shape[0]
        jw = gw.index_select(2, idx.flatten()).reshape(n, d_out, M, -1).permute(2, 0, 1, 3).reshape(M, n, -1)
        jb = None
    jw = jw.float()
    g = jw @ jw.transpose(1, 2)
    if jb is not None:
        jb = jb.float()
        g = g + jb @ jb.transpose(1, 2)
    return g


def _make_torch_func(wl: "Workload") -> Callable[[], torch.Tensor]:
    gen = torch.Generator(device="cpu").manual_seed(1)
    per_lin = []
    for lin in wl.linears:
        w = torch.randn(lin.d_out, lin.d_in, generator=gen).to(device=wl.device, dtype=wl.dtype)
        # the real attn_out has a bias too, but no head owns it: its gradient is not needed
        params = (w, torch.randn(lin.d_out, generator=gen).to(device=wl.device, dtype=wl.dtype)) if lin.bias else (w,)
        lb = lin.blocks()
        per_lin.append((params, lb, _module_index(lb, wl.device)))

    def s(params, xi, dyi):
        return (F.linear(xi, params[0], params[1] if len(params) > 1 else None) * dyi).sum()

    psg = torch.func.vmap(torch.func.grad(s), in_dims=(None, 0, 0))

    def fn():
        grams = []
        for (params, lb, idx), (x, dy) in zip(per_lin, wl.inputs):
            grads = psg(params, x, dy)
            grams.append(psg_module_grams(grads[0], grads[1] if len(grads) > 1 else None, lb, idx))
            del grads
        return torch.linalg.eigvalsh(assemble(wl.linears, grams))[..., -1]

    return fn


def _make_einsum(wl: "Workload") -> Callable[[], torch.Tensor]:
    per_lin = [(lin.blocks(), _module_index(lin.blocks(), wl.device)) for lin in wl.linears]

    def fn():
        grams = []
        for (lb, idx), (x, dy) in zip(per_lin, wl.inputs):
            gw = torch.einsum("ntr,ntc->nrc", dy, x)  # G_i = Σ_t dy_it x_itᵀ, materialised [n, d_out, d_in]
            gb = dy.sum(dim=1) if lb.bias else None
            grams.append(psg_module_grams(gw, gb, lb, idx))
            del gw, gb
        return torch.linalg.eigvalsh(assemble(wl.linears, grams))[..., -1]

    return fn


def ghost_grams_einsum(a: torch.Tensor, b: torch.Tensor, idx: torch.Tensor | None, add_one: bool,
                       budget_bytes: int) -> torch.Tensor:
    """Ghost Grams ``Θ_m[i, j] = Σ_{t,s} (a_it·a_js [+1]) (b_it[m]·b_js[m])`` (fp32 ``[M, n, n]``).

    Token-pair products by einsum in the input dtype on ``[bi, n, T, T]`` blocks (bi samples at a time so that one
    fp32 block stays under ``budget_bytes``), upcast to fp32 for the final reduction; one module at a time."""
    n, T, _ = a.shape
    bsel = [b] if idx is None else [b.index_select(2, idx[m]) for m in range(idx.shape[0])]
    out = torch.empty(len(bsel), n, n, dtype=torch.float32, device=a.device)
    bi = max(1, min(n, budget_bytes // (4 * n * T * T)))
    for i0 in range(0, n, bi):
        i1 = min(n, i0 + bi)
        p = torch.einsum("itk,jsk->ijts", a[i0:i1], a).float()
        if add_one:
            p += 1.0
        for m, bm in enumerate(bsel):
            dm = torch.einsum("itr,jsr->ijts", bm[i0:i1], bm).float()
            out[m, i0:i1] = torch.einsum("ijts,ijts->ij", p, dm)
            del dm
        del p
    return out


def _make_ghost_einsum(wl: "Workload") -> Callable[[], torch.Tensor]:
    per_lin = [(lin.blocks(), _module_index(lin.blocks(), wl.device)) for lin in wl.linears]
    budget = wl.ghost_budget_bytes

    def fn():
        grams = []
        for (lb, idx), (x, dy) in zip(per_lin, wl.inputs):
            a, b = (x, dy) if lb.axis == "rows" else (dy, x)
            grams.append(ghost_grams_einsum(a, b, idx, lb.bias, budget))
        return torch.linalg.eigvalsh(assemble(wl.linears, grams))[..., -1]

    return fn


# ---------------------------------------------------------------------------------------------------------------
# mat_kernels
# ---------------------------------------------------------------------------------------------------------------


def _make_mat_kernels(method: str, allow_tf32: bool):
    def make(wl: "Workload") -> Callable[[], torch.Tensor]:
        def fn():
            grams, routes, backend = [], [], None
            for lin, (x, dy) in zip(wl.linears, wl.inputs):
                r = mk.layer_grams(
                    x, dy, row_blocks=lin.row_blocks, col_blocks=lin.col_blocks, bias=lin.bias, method=method,
                    allow_tf32=allow_tf32, sketch_size=wl.sketch_size, seed=wl.seed, backend=wl.backend,
                    check_finite=False,
                )
                grams.append(r.grams)
                routes.extend(r.routes)
                backend = r.backend
            wl.info["routes"], wl.info["backend"] = tuple(routes), backend
            return mk.lambda_max(assemble(wl.linears, grams))

        return fn

    return make


@dataclass(frozen=True)
class Provider:
    name: str
    make: Callable[["Workload"], Callable[[], torch.Tensor]]
    route: str | None  # route whose cost is credited (None: the routes the call reports)
    fp32_only: bool = False
    exact: bool = True


PROVIDERS: list[Provider] = [
    Provider("torch_func", _make_torch_func, "psg"),
    Provider("einsum", _make_einsum, "psg"),
    Provider("ghost_einsum", _make_ghost_einsum, "ghost"),
]
for _tf32 in (False, True):
    for _method in ("psg", "ghost", "auto", "sketch"):
        PROVIDERS.append(Provider(
            f"mat_kernels_{_method}" + ("_tf32" if _tf32 else ""), _make_mat_kernels(_method, _tf32), None,
            fp32_only=_tf32, exact=_method != "sketch",
        ))
PROVIDER_NAMES = [p.name for p in PROVIDERS]


@dataclass
class Workload:
    shape: Shape
    dtype: torch.dtype
    device: torch.device
    inputs: list
    linears: list[Linear]
    sketch_size: int = mk.DEFAULT_SKETCH_SIZE
    seed: int = 0
    backend: str = "auto"
    ghost_budget_bytes: int = 256 << 20
    info: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------
# costs
# ---------------------------------------------------------------------------------------------------------------


def linear_route(lin: Linear, shape: Shape, method: str, sketch_size: int) -> str:
    """The route mat_kernels takes for ``method`` on this linear (the Gram dispatcher's choice)."""
    shared, segmented = lin.widths()
    if method == "sketch" and sketch_size < shared:
        return "sketch"
    inp = gram_dispatch.GramInputs(shape.n, shape.T, shared, segmented, False, torch.float32, torch.device("cpu"))
    return gram_dispatch.choose(inp, backend="torch", method=method).route


def route_flops(shape: Shape, routes: list[str], sketch_size: int) -> int:
    """2 × multiply-adds (``mat_kernels.route_costs``) of the layer, one route per linear."""
    total = 0
    for lin, route in zip(layer_linears(shape), routes):
        shared, segmented = lin.widths()
        total += 2 * mk.route_costs(shape.n, shape.T, shared, segmented, sketch_size)[route]
    return total


def compulsory_bytes(shape: Shape, elem_bytes: int) -> int:
    """Read every x and dy once, write the module Grams (fp32): the traffic no route can avoid."""
    n, T = shape.n, shape.T
    inputs = sum(n * T * (lin.d_in + lin.d_out) * elem_bytes for lin in layer_linears(shape))
    return inputs + num_modules(shape) * n * n * 4


def scratch_roundtrip_bytes(shape: Shape, routes: list[str], sketch_size: int) -> int:
    """psg/sketch as mat_kernels implements them: the fp32 per-sample gradients (``n × segmented × shared``, or
    ``× k`` for the sketch) go through HBM once (written by the psg kernel, read back by the Gram kernel). Nothing
    of size ``n·T²`` or ``n·D·A`` is stored by the ghost route: 0."""
    total = 0
    for lin, route in zip(layer_linears(shape), routes):
        shared, segmented = lin.widths()
        width = {"psg": shared, "sketch": sketch_size, "ghost": 0}[route]
        total += 2 * shape.n * segmented * width * 4
    return total


# peaks for the floor estimate (H100 SXM): see benchmarks/NOTES.md
PEAKS_TFLOPS = {"bf16": 790.0, "tf32": 400.0, "fp32": 60.0}
HBM_TBPS = 3.0


def print_costs(shapes: list[Shape], dtype_names: list[str], sketch_size: int) -> None:
    """Per route: useful FLOPs, compulsory bytes, and the floor time max(FLOPs / peak, bytes / HBM bandwidth)."""
    print(f"peaks: {PEAKS_TFLOPS} TFLOP/s, HBM {HBM_TBPS} TB/s")
    print("| shape | dtype (peak) | route | GFLOP | min MB (inputs + Grams) | psg scratch round-trip MB |"
          " FLOP floor ms | byte floor ms | floor ms |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for shape in shapes:
        lins = layer_linears(shape)
        for dn in dtype_names:
            elem = torch.tensor([], dtype=DTYPES[dn]).element_size()
            peaks = ["bf16"] if dn == "bf16" else ["fp32", "tf32"]
            for method in ("psg", "ghost", "auto", "sketch"):
                routes = [linear_route(lin, shape, method, sketch_size) for lin in lins]
                fl = route_flops(shape, routes, sketch_size)
                by = compulsory_bytes(shape, elem)
                sc = scratch_roundtrip_bytes(shape, routes, sketch_size)
                t_b = by / (HBM_TBPS * 1e12) * 1e3
                label = method if method != "auto" else f"auto ({'/'.join(routes)})"
                for pname in peaks:
                    t_f = fl / (PEAKS_TFLOPS[pname] * 1e12) * 1e3
                    print(f"| {shape.name} | {dn} ({pname}) | {label} | {fl / 1e9:.3f} | {by / 1e6:.2f} | "
                          f"{sc / 1e6:.1f} | {t_f:.4f} | {t_b:.4f} | {max(t_f, t_b):.4f} |")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CSV_FIELDS = [
    "date", "op", "device", "git_commit", "torch", "triton", "mat_kernels", "shape", "n", "T", "dtype", "provider",
    "backend", "routes", "timer", "median_ms", "p20_ms", "p80_ms", "peak_extra_mib", "max_rel_err", "route_gflop",
    "tflops", "status",
]


def _fmt(v, spec: str, none: str = "-") -> str:
    return none if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _routes_str(routes) -> str:
    if not routes:
        return "-"
    return f"{routes[0]}×{len(routes)}" if len(set(routes)) == 1 else ",".join(routes)


def print_table(rows: list[dict]) -> None:
    print("| shape | dtype | provider | backend | routes | median ms | p20 ms | p80 ms | peak extra MiB |"
          " max rel err | TFLOP/s |")
    print("|---|---|---|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if r["status"] != "ok":
            print(f"| {r['shape']} | {r['dtype']} | {r['provider']} | {r.get('backend') or '-'} | - | "
                  f"{r['status']} | | | | | |")
            continue
        print(f"| {r['shape']} | {r['dtype']} | {r['provider']} | {r['backend']} | {r['routes']} | "
              f"{r['median_ms']:.3f} | {r['p20_ms']:.3f} | {r['p80_ms']:.3f} | {_fmt(r['peak_extra_mib'], '.1f')} | "
              f"{r['max_rel_err']:.2e} | {_fmt(r['tflops'], '.3g')} |")


# ---------------------------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------------------------


def _split(value: str | None) -> list[str] | None:
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


def select_providers(patterns: list[str] | None) -> list[Provider]:
    if not patterns:
        return list(PROVIDERS)
    chosen = [p for p in PROVIDERS if any(fnmatch.fnmatchcase(p.name, pat) for pat in patterns)]
    for pat in patterns:
        if not any(fnmatch.fnmatchcase(p.name, pat) for p in PROVIDERS):
            raise SystemExit(f"--providers: {pat!r} matches none of {', '.join(PROVIDER_NAMES)}")
    return chosen


def run_one(wl: Workload, prov: Provider, ref: torch.Tensor, quick: bool) -> dict:
    row = {"provider": prov.name, "backend": None, "routes": "-", "status": "ok"}
    device = wl.device
    wl.info = {}
    try:
        fn = prov.make(wl)
        lam = fn()  # first call: compiles Triton kernels, checks the result
        _sync(device)
        lam = lam.detach().double().cpu()
        row["max_rel_err"] = float(((lam - ref).abs() / ref.abs().clamp_min(1e-300)).max())
        row["backend"] = wl.info.get("backend", "torch")
        if prov.route is None:  # the kernels that ran (GramResult.routes), credited by their route
            row["routes"] = _routes_str(list(wl.info["routes"]))
            routes = [gram_dispatch.route_of(r) for r in wl.info["routes"]]
        else:
            routes = [prov.route] * len(wl.linears)
            row["routes"] = _routes_str(routes)
        row["peak_extra_mib"] = _harness.peak_extra_mib(fn, device)
        (med, p20, p80), timer = _harness.time_ms(fn, device, quick=quick)
        row.update(median_ms=med, p20_ms=p20, p80_ms=p80, timer=timer)
        fl = route_flops(wl.shape, routes, wl.sketch_size)
        row["route_gflop"] = fl / 1e9
        row["tflops"] = fl / (med * 1e-3) / 1e12
    except torch.OutOfMemoryError:
        row["status"] = "OOM"
    except Exception as e:  # keep going; reported in the table and the exit code
        traceback.print_exc()
        row["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    ap.add_argument("--quick", action="store_true",
                    help=f"smoke run: shapes {', '.join(QUICK_SHAPES)} (unless --shapes), short timing")
    ap.add_argument("--shapes", default=None, help=f"comma-separated, from: {', '.join(SHAPES)}")
    ap.add_argument("--dtypes", default=None, help="comma-separated, from: fp32, bf16 (default both)")
    ap.add_argument("--providers", default=None,
                    help="comma-separated names or globs ('mat_kernels_*'), from: " + ", ".join(PROVIDER_NAMES))
    ap.add_argument("--csv", default=None, metavar="PATH", help="append one row per result to this CSV file")
    ap.add_argument("--backend", default="auto", choices=("auto", "triton", "torch"),
                    help="mat_kernels backend (default auto: Triton on CUDA, PyTorch fallback elsewhere)")
    ap.add_argument("--sketch-size", type=int, default=mk.DEFAULT_SKETCH_SIZE)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--oracle-device", default=None, help="device of the float64 oracle (default: --device)")
    ap.add_argument("--ghost-budget-mib", type=int, default=256,
                    help="ghost_einsum: bound on one fp32 [bi, n, T, T] block (MiB)")
    ap.add_argument("--costs", action="store_true", help="print the FLOP / byte / floor table and exit")
    args = ap.parse_args(argv)

    shape_names = _split(args.shapes) or list(QUICK_SHAPES if args.quick else FULL_SHAPES)
    for s in shape_names:
        if s not in SHAPES:
            raise SystemExit(f"--shapes: unknown shape {s!r}; known: {', '.join(SHAPES)}")
    dtype_names = _split(args.dtypes) or list(DTYPES)
    for d in dtype_names:
        if d not in DTYPES:
            raise SystemExit(f"--dtypes: unknown dtype {d!r}; known: {', '.join(DTYPES)}")
    if args.costs:
        print_costs([SHAPES[s] for s in shape_names], dtype_names, args.sketch_size)
        return 0
    providers = select_providers(_split(args.providers))

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    oracle_device = torch.device(args.oracle_device) if args.oracle_device else device
    torch.backends.cuda.matmul.allow_tf32 = False  # baselines: IEEE fp32 (mat_kernels sets TF32 per call)

    env = {"op": "segment_grams", **_harness.env_row(device)}
    mode, reason = mk.backend.triton_mode()
    print(f"# bench_segment_grams  {env['date']}  commit {env['git_commit']}")
    print(f"# device: {env['device']}  torch {env['torch']}  triton {env['triton']}  mat_kernels {env['mat_kernels']}")
    print(f"# mat_kernels Triton kernels: {mode} ({reason}); --backend {args.backend}")
    if device.type != "cuda":
        print("# NOTE: no CUDA device in use: mat_kernels_* run their PyTorch fallback (see the backend column);"
              " TF32 has no effect on CPU; peak memory is not measured on CPU.")
    t_all = time.perf_counter()

    rows = []
    for sname in shape_names:
        shape = SHAPES[sname]
        linears = layer_linears(shape)
        for dn in dtype_names:
            dtype = DTYPES[dn]
            inputs = make_inputs(shape, dtype, device, args.seed)
            t0 = time.perf_counter()
            try:
                ref = oracle_lambda_max(shape, inputs, oracle_device)
            except torch.OutOfMemoryError:
                print("# oracle OOM on", oracle_device, "-> computing it on the CPU")
                gc.collect()
                torch.cuda.empty_cache()
                ref = oracle_lambda_max(shape, inputs, torch.device("cpu"))
            print(f"# {sname} {dn}: n={shape.n} T={shape.T} d={shape.d} heads={shape.heads}x{shape.head_dim} "
                  f"ffn={shape.ffn}; {len(ref)} modules; float64 oracle on {oracle_device} in "
                  f"{time.perf_counter() - t0:.1f}s; λmax range [{float(ref.min()):.4g}, {float(ref.max()):.4g}]")
            wl = Workload(shape, dtype, device, inputs, linears, sketch_size=args.sketch_size, seed=args.seed,
                          backend=args.backend, ghost_budget_bytes=args.ghost_budget_mib << 20)
            for prov in providers:
                if prov.fp32_only and dtype != torch.float32:
                    continue
                row = run_one(wl, prov, ref, args.quick)
                row.update(env, shape=sname, n=shape.n, T=shape.T, dtype=dn)
                rows.append(row)
                status = row["status"] if row["status"] != "ok" else (
                    f"{row['median_ms']:.3f} ms, err {row['max_rel_err']:.1e}, backend {row['backend']}")
                print(f"#   {prov.name:<26} {status}", flush=True)
            del wl, inputs
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()

    print()
    print_table(rows)
    print()
    timers = sorted({r.get("timer") for r in rows if r.get("timer")})
    print(f"timer: {', '.join(timers)}; times in ms (median, 20th and 80th percentiles).")
    print("max rel err: max over the modules of |λ - λ_ref| / λ_ref, λ_ref = float64 oracle on the same inputs"
          " (sketch routes are approximate by design).")
    print("TFLOP/s: 2 x mat_kernels.route_costs multiply-adds of the route(s) shown / median time (useful work,"
          " symmetric Gram halves; eigvalsh not counted).")
    backends = sorted({r["backend"] for r in rows if r.get("backend") and r["provider"].startswith("mat_kernels")})
    if backends:
        print(f"mat_kernels backend(s) used: {', '.join(backends)}"
              + ("  (PyTorch fallback: these numbers do not measure the Triton kernels)" if "torch" in backends
                 else ""))
    print(f"total {time.perf_counter() - t_all:.1f}s")
    if args.csv:
        _harness.upsert_csv(args.csv, rows, key=("op", "provider", "shape", "dtype", "device"), fields=CSV_FIELDS)
        print(f"appended {len(rows)} rows to {args.csv}")
    return 1 if any(r["status"].startswith("error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
