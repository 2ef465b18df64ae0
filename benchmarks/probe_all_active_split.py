#!/usr/bin/env python
"""Probe (NOTES.md section 11): an all-active MAT step against the dense step, split into forward + backward and the
optimizer step, on the step-level models of ``bench_frozen_step.py``; interleaved rounds in rotating order
(``_harness.interleaved_times``), the median of per-round ratios MAT / dense.

    python benchmarks/probe_all_active_split.py [--rounds 20] [--threads 1] mlm-small hf-bert hf-gpt2
"""
from __future__ import annotations

import argparse
import copy
import statistics
import warnings

import _harness  # benchmarks/_harness.py, this script's folder
import torch
from bench_frozen_step import _step_models

import mat_kernels as mk


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", choices=["mlm-small", "hf-bert", "hf-gpt2"])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    models = _step_models(False)
    for name in a.models:
        model0, make_opt, batch, loss_fn = models[name]
        dense = copy.deepcopy(model0)
        dense_opt = make_opt(dense)
        model = copy.deepcopy(model0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            mat = mk.MAT(model, make_opt(model), warmup_steps=10 ** 9)  # never measures: every module active

        def dense_fb():
            dense_opt.zero_grad(set_to_none=True)
            loss_fn(dense, batch).backward()

        def mat_fb():
            mat.zero_grad()
            mat.backward(loss_fn(model, batch))

        dense_fb(), mat_fb()  # gradients for the optimizer-only providers
        provs = {"dense_fb": dense_fb, "mat_fb": mat_fb, "dense_opt": dense_opt.step, "mat_opt": mat.step}
        t = _harness.interleaved_times(provs, a.rounds, rotate=True)
        for d, m in (("dense_fb", "mat_fb"), ("dense_opt", "mat_opt")):
            ratio = statistics.median(y / x for x, y in zip(t[d], t[m]))
            print(f"{name} {m[4:]}: dense {statistics.median(t[d]):.2f} ms, MAT {statistics.median(t[m]):.2f} ms, "
                  f"MAT / dense {ratio:.3f}", flush=True)
        mat.close()


if __name__ == "__main__":
    main()
