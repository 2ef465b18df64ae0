#!/usr/bin/env python
"""Benchmark: the psg Gram kernels side by side, to check the Gram dispatcher's choice on a GPU (NOTES.md §7).

Providers, each computing the module Grams of one linear layer of BERT-base (n samples, T tokens):
``fused`` (the fused per-sample-gradient + Gram kernel, n ≤ 32), ``local`` (the tile-local one, n ≤ 64),
``two_kernel`` (per-sample gradients to a scratch, then
the Gram kernel), ``ghost``. Rows: shape, dtype, provider, median / 20% / 80% ms, what the dispatcher
(``mat_kernels.ops.gram_dispatch.choose``, psg route, Triton) predicted and chose, the max relative difference to
``two_kernel``.

    python benchmarks/bench_psg_variants.py --csv out.csv            # CUDA: BERT-base QKV and FFN-in, T = 32, 128
    python benchmarks/bench_psg_variants.py --quick --csv out.csv    # CPU smoke run in the Triton interpreter
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel is defined

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import _harness  # noqa: E402  (benchmarks/_harness.py, this script's folder)

import mat_kernels as mk  # noqa: E402
from mat_kernels.kernels import triton_segment_grams as tg  # noqa: E402
from mat_kernels.kernels import triton_segment_grams_fused as tf  # noqa: E402
from mat_kernels.ops import gram_dispatch  # noqa: E402

# (name, n, T, d_in, d_out, row blocks as (starts, sizes, owners), bias)
_QKV = mk.WeightBlocks.build(2304, 768, row_blocks=mk.fused_qkv_heads(12, 64)).segments()
SHAPES = {
    "qkv_n32_t128": (32, 128, 768, 2304, _QKV, True),
    "qkv_n32_t32": (32, 32, 768, 2304, _QKV, True),
    "ffn_in_n32_t128": (32, 128, 768, 3072, ((0,), (3072,), (0,)), True),
    "ffn_in_n16_t32": (16, 32, 768, 3072, ((0,), (3072,), (0,)), True),
}
QUICK = {"tiny_n5_t7": (5, 7, 24, 36, ((0, 12, 24), (12, 12, 12), (0, 1, 0)), True)}
PROVIDERS = {
    "fused": lambda a, b, s, bias, tf32: tf.fused_segment_grams(a, b, *s, add_one=bias, allow_tf32=tf32),
    "local": lambda a, b, s, bias, tf32: tf.local_segment_grams(a, b, *s, add_one=bias, allow_tf32=tf32),
    "two_kernel": lambda a, b, s, bias, tf32: tg.psg_segment_grams(a, b, s[0], s[1], add_one=bias, allow_tf32=tf32,
                                                                   seg_owners=s[2]),
    "ghost": lambda a, b, s, bias, tf32: tg.ghost_segment_grams(a, b, s[0], s[1], add_one=bias, allow_tf32=tf32,
                                                                seg_owners=s[2]),
}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--dtypes", default="fp32,tf32,bf16")
    p.add_argument("--csv")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = QUICK if args.quick or device.type == "cpu" else SHAPES
    dtypes = {"fp32": (torch.float32, False), "tf32": (torch.float32, True), "bf16": (torch.bfloat16, False)}
    env = {**_harness.env_row(device), "op": "segment_grams_psg_variants"}
    rows = []
    for shape, (n, T, d_in, d_out, segs, bias) in shapes.items():
        for dname in args.dtypes.split(","):
            dtype, tf32 = dtypes[dname]
            if device.type == "cpu" and dtype != torch.float32:
                continue  # the interpreter computes bf16 wrongly
            g = torch.Generator().manual_seed(0)
            a = torch.randn(n, T, d_in, generator=g).to(device=device, dtype=dtype)
            b = torch.randn(n, T, d_out, generator=g).to(device=device, dtype=dtype)
            choice = gram_dispatch.choose(gram_dispatch.GramInputs.of(a, [d_out], bias), backend="triton",
                                          method="psg")
            predicted = {k: s for k, _, s, _ in choice.candidates}
            ref = PROVIDERS["two_kernel"](a, b, segs, bias, tf32)
            for prov, fn in PROVIDERS.items():
                if (prov == "fused" and n > tf.FUSED_MAX_N) or (prov == "local" and n > tf.LOCAL_MAX_N):
                    continue
                out = fn(a, b, segs, bias, tf32)
                err = float((out - ref).abs().max() / ref.abs().max())
                (med, lo, hi), _ = _harness.time_ms(lambda: fn(a, b, segs, bias, tf32), device, quick=args.quick,
                                                    min_reps=3, budget_s=0)
                row = {**env, "shape": shape, "dtype": dname,
                       "provider": prov, "ms": round(med, 4), "ms_p20": round(lo, 4), "ms_p80": round(hi, 4),
                       "plan": choice.kernel, "plan_fused_us": round(1e6 * (predicted["triton-fused"] or 0), 1),
                       "plan_local_us": round(1e6 * (predicted["triton-local"] or 0), 1),
                       "plan_two_kernel_us": round(1e6 * (predicted["triton-psg"] or 0), 1),
                       "max_rel_diff_to_two_kernel": f"{err:.2e}"}
                rows.append(row)
                print(row, flush=True)
    if args.csv:
        _harness.upsert_csv(args.csv, rows)
    return rows


if __name__ == "__main__":
    main()
