#!/usr/bin/env python
"""Wall time of one training step with MAT against the same dense step, side by side in one process.

Providers, on the ``mlm-small`` and ``cnn-small`` models of ``python/tasks.py`` (their real batch shapes):

* ``dense``: forward, backward, optimizer step;
* ``mat_all_active``: the same step through MAT with every module active and no measurement due (the host overhead of
  the sparse-update layers and the frozen-slice optimizer, nothing saved);
* ``mat_quarter_dw`` / ``mat_quarter_detach``: a quarter of the modules active (every fourth), frozen modules skipping
  their dW only / their dX too;
* ``measure``: one measuring step from the training backward (``probe=None``: the step plus the Grams).

Rounds are interleaved (one step of each provider per round) and the median per provider is reported with its 20/80
quantiles and its ratio to ``dense``. Nothing else should run on the machine meanwhile.

    python benchmarks/bench_mat_step.py [--rounds 30] [--tasks mlm-small,cnn-small] [--csv results/mat_step.csv]
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "python"))
import _harness  # noqa: E402  (benchmarks/_harness.py, this script's folder)
import tasks as task_registry  # noqa: E402

import mat_kernels as mk  # noqa: E402

PROVIDERS = ("dense", "mat_all_active", "mat_quarter_dw", "mat_quarter_detach", "measure")


def _setup(task_name: str):
    task = task_registry.build(task_name, 0)
    batch = task.batch(0)
    out = {}
    for prov in PROVIDERS:
        model = copy.deepcopy(task.model)
        opt = task.make_optimizer(model)
        if prov == "dense":
            out[prov] = (model, opt, None)
            continue
        kw = {"frozen_backward": "detach" if prov.endswith("detach") else "dw"}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            mat = mk.MAT(model, opt, probe=None, warmup_steps=0 if prov == "measure" else 10**9, interval=1, **kw)
        if "quarter" in prov:
            mat.active = torch.tensor([i % 4 == 0 for i in range(len(mat.specs))])
            mat._apply_masks()
        out[prov] = (model, opt, mat)
    return task, batch, out


def _step(task, batch, model, opt, mat):
    if mat is None:
        task.loss(model, batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return
    with mat.measure_step(loss_scale=task.loss_scale(batch)):
        mat.backward(task.loss(model, batch))
    mat.optimizer.step(mat.active)  # the frozen-slice step; decisions are not part of what is timed
    mat._pending = None
    mat.zero_grad()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--tasks", default="mlm-small,cnn-small")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--csv", default=None)
    a = ap.parse_args(argv)
    if a.rounds < 3:
        ap.error("--rounds must be >= 3")
    if a.threads:
        torch.set_num_threads(a.threads)
    rows = []
    env = {**_harness.env_row(torch.device("cpu")), "op": "mat_step", "dtype": "fp32"}
    for task_name in a.tasks.split(","):
        task, batch, setups = _setup(task_name)
        times = _harness.interleaved_ms({p: (lambda p=p: _step(task, batch, *setups[p])) for p in PROVIDERS},
                                        a.rounds)
        base = times["dense"][0]
        print(f"{task_name}: {a.rounds} interleaved rounds, {torch.get_num_threads()} threads")
        for p in PROVIDERS:
            med, p20, p80 = times[p]
            print(f"  {p:20s} {med:8.1f} ms  (p20 {p20:.1f}, p80 {p80:.1f})  x{med / base:.3f}")
            rows.append({**env, "shape": task_name, "provider": p, "ms": round(med, 3), "ms_p20": round(p20, 3),
                         "ms_p80": round(p80, 3), "ratio_vs_dense": round(med / base, 4), "rounds": a.rounds,
                         "threads": torch.get_num_threads()})
    if a.csv:
        _harness.upsert_csv(a.csv, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
