#!/usr/bin/env python
"""Probe (NOTES.md section 15): where a partly frozen MAT step's time goes, op by op, against the dense step. Both
steps (forward, backward, optimizer step, zero_grad) of a step-level model of ``bench_frozen_step.py`` are profiled
``--profiles`` times each, alternating; per aten op, the median over profiles of its summed self CPU time; the ops
whose time differs most are printed (dense ms, MAT ms, MAT − dense). It says which work the mask did not remove
(or added), i.e. what the step-level "saved / skippable" share misses.

    python benchmarks/probe_step_profile_diff.py hf-bert --mask quarter_detach [--threads 1] [--profiles 5]
"""
from __future__ import annotations

import argparse
import collections
import copy
import statistics
import warnings

import torch
from bench_frozen_step import STEP_PROVIDERS, _step_models

import mat_kernels as mk


def _op_ms(step) -> dict[str, float]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    out: dict[str, float] = collections.defaultdict(float)
    for ev in prof.key_averages():
        out[ev.key] += ev.self_cpu_time_total / 1e3
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", choices=["mlm-small", "hf-bert", "hf-gpt2"])
    ap.add_argument("--mask", default="quarter_detach", choices=sorted(STEP_PROVIDERS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--profiles", type=int, default=5)
    ap.add_argument("--top", type=int, default=15)
    a = ap.parse_args(argv)
    for name in ("threads", "profiles", "top"):
        if getattr(a, name) < 1:
            ap.error(f"--{name} must be >= 1, got {getattr(a, name)}")
    torch.set_num_threads(a.threads)
    model0, make_opt, batch, loss_fn = _step_models(False, (a.model,))[a.model]
    dense = copy.deepcopy(model0)
    dense_opt = make_opt(dense)
    model = copy.deepcopy(model0)
    rule, fb, *kw = STEP_PROVIDERS[a.mask]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        mat = mk.MAT(model, make_opt(model), warmup_steps=10 ** 9, frozen_backward=fb, **(kw[0] if kw else {}))
    M = len(mat.specs)
    mat.set_active(torch.tensor([rule(i, M) for i in range(M)]))

    def dense_step():
        loss_fn(dense, batch).backward()
        dense_opt.step()
        dense_opt.zero_grad(set_to_none=True)

    def mat_step():
        mat.backward(loss_fn(model, batch))
        mat.step()
        mat.zero_grad()

    for _ in range(2):
        dense_step()
        mat_step()
    runs = {"dense": [], "mat": []}
    for _ in range(a.profiles):
        runs["dense"].append(_op_ms(dense_step))
        runs["mat"].append(_op_ms(mat_step))
    keys = set().union(*runs["dense"], *runs["mat"])
    med = {k: {p: statistics.median(r.get(k, 0.0) for r in runs[p]) for p in runs} for k in keys}
    total = {p: statistics.median(sum(r.values()) for r in runs[p]) for p in runs}
    print(f"{a.model} {a.mask} ({a.threads} thread(s), {a.profiles} profiles each): dense {total['dense']:.1f} ms, "
          f"MAT {total['mat']:.1f} ms (self CPU time summed over ops, profiler overhead included)")
    print(f"{'op':44s} {'dense ms':>9s} {'MAT ms':>9s} {'MAT-dense':>10s}")
    for k in sorted(keys, key=lambda k: -abs(med[k]["mat"] - med[k]["dense"]))[:a.top]:
        d, m = med[k]["dense"], med[k]["mat"]
        print(f"{k[:44]:44s} {d:9.2f} {m:9.2f} {m - d:+10.2f}")
    mat.close()


if __name__ == "__main__":
    main()
