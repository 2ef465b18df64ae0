#!/usr/bin/env python
"""Time charged by a table of measured step times (issue 21, item 2; "reference system time" in Kaddour et al.
2023): every distinct active set a grid's runs used is benchmarked as the real training step of its task, all of
them and the dense step side by side in interleaved rounds (rotating order, medians), cached by active set; a run's
**bench time** at an evaluation step is then Σ over its steps of the table's time for that step's active set, plus
its measurements' seconds (as the clock gave them). Written into the grid's CSV as ``bench_s``, beside the clock's
``wall_s`` and the ledger's ``table_s`` (the run's own steps grouped by active set); the frontier summary charges
``bench_s`` where a row has it.

The runner writes each cell's active sets, run-length encoded, to ``<out>/masks/<task>_<arm>_s<seed>.json``
(python/reproduce.py). Run this after the grid, with nothing else running:

    python python/step_table.py --csv results/budget_mlm.csv --masks results/budget_mlm/masks [--rounds 10]

Dense runs need no mask file (every step is the dense step): rows of a ``dense`` arm without one are priced as
``step x`` the table's dense step. ``--csv`` may be given more than once (e.g. a dense frontier kept in another grid's
CSV); every CSV gets its rows' ``bench_s`` (dense rows without mask files already priced by another table are
priced again by this one, and named), and rows that can be priced by neither are named and left empty.

The table lands in ``<masks>/../step_table.csv`` (task, frozen_backward, mask, median ms, rounds, threads, machine,
date); active sets already in it are not measured again (the cache: a rerun after more cells measures only the new
sets, in rounds of their own, so compare bench times within one table's date).
"""
from __future__ import annotations

import argparse
import copy
import csv
import glob
import json
import os
import statistics
import sys
import time
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "benchmarks"))
import _harness  # noqa: E402  (benchmarks/_harness.py: the interleaved rounds every benchmark uses)
import tasks as task_registry  # noqa: E402
from summary import read_csv, upsert_csv  # noqa: E402

import mat_kernels as mk  # noqa: E402

TABLE_FIELDS = ["task", "heldout", "frozen_backward", "mask", "ms", "rounds", "threads", "machine", "date"]


def load_cells(masks_dir: str) -> list[dict]:
    """The runner's per-cell JSON files (task, arm, seed, heldout, steps = [[mask, count], ...])."""
    cells = []
    for path in sorted(glob.glob(os.path.join(masks_dir, "*.json"))):
        with open(path) as f:
            cells.append(json.load(f))
    if not cells:
        raise ValueError(f"--masks: no cell files (*.json) in {masks_dir}; run python/reproduce.py first (it writes "
                         "them next to its summary)")
    return cells


def frozen_backward_of(mat_kwargs: str) -> str:
    """The step-cost-relevant MAT keyword of an arm, from the CSV's ``mat_kwargs`` text (``k=v;k=v``)."""
    kw = dict(part.split("=", 1) for part in mat_kwargs.split(";") if "=" in part)
    return kw.get("frozen_backward", "dw")


def is_dense(row: dict) -> bool:
    """A row of a dense arm (``dense`` or ``dense@b``: no MAT keywords), whose every step is the dense step."""
    return row["arm"].split("@")[0] == "dense" and not row["mat_kwargs"]


def dense_cells(rows: list[dict], cells: list[dict], heldout: int | None) -> list[dict]:
    """Cells for the dense rows that have no mask file, of the tasks that have mask files (the others are left
    unpriced): ``steps = [["dense", last step]]``, with the held-out size of the task's mask files (all cells of a
    comparison share it) or ``heldout``."""
    have = {(c["task"], c["arm"], c["seed"]) for c in cells}
    held_of: dict = {}
    for c in cells:
        held_of.setdefault(c["task"], set()).add(int(c["heldout"]))
    last: dict = {}
    for r in rows:
        key = (r["task"], r["arm"], r["seed"])
        if is_dense(r) and key not in have and r["task"] in held_of:
            last[key] = max(last.get(key, 0), r["step"])
    out = []
    for (task, arm, seed), n in sorted(last.items()):
        held = held_of[task] if heldout is None else {heldout}
        if len(held) != 1:
            raise ValueError(f"--heldout: the dense rows of {task} have no mask file and the mask files give "
                             f"{sorted(held)} held-out sizes for it; pass --heldout N")
        out.append({"task": task, "arm": arm, "seed": seed, "heldout": next(iter(held)), "steps": [["dense", n]],
                    "no_mask_file": True})
    return out


def read_table(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path, newline="") as f:
        return {(r["task"], int(r["heldout"]), r["frozen_backward"], r["mask"]): r for r in csv.DictReader(f)}


def write_table(path: str, table: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=TABLE_FIELDS)
        w.writeheader()
        for r in table.values():
            w.writerow({k: r[k] for k in TABLE_FIELDS})
    os.replace(tmp, path)


def step_providers(task_name: str, heldout: int, needed: list[tuple[str, str]], *, tiny: bool = False) -> dict:
    """``{(frozen_backward, mask): step function}``: the task's real training step (forward, backward, optimizer
    step, zero_grad) on its first batch, dense or with MAT forced to ``mask`` (never measuring)."""
    task = task_registry.build(task_name, 0, tiny=tiny, heldout=heldout)
    batch = task.batch(0)
    provs = {}
    for fb, mask in needed:
        model = copy.deepcopy(task.model)
        opt = task.make_optimizer(model)
        if mask == "dense":
            def step(model=model, opt=opt):
                task.loss(model, batch).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                mat = mk.MAT(model, opt, warmup_steps=10 ** 9, frozen_backward=fb, probe=None)
            if len(mat.specs) != len(mask):
                raise ValueError(f"{task_name}: a mask of {len(mask)} modules, but MAT finds {len(mat.specs)}")
            mat.set_active(torch.tensor([c == "1" for c in mask]))

            def step(model=model, mat=mat):
                mat.backward(task.loss(model, batch))
                mat.step()
                mat.zero_grad()
        provs[(fb, mask)] = step
    return provs


def measure(provs: dict, rounds: int) -> dict:
    """Median ms per provider over ``rounds`` interleaved rounds in rotating order (after one warm-up call each)."""
    times = _harness.interleaved_times(provs, rounds, rotate=True)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_seconds(steps: list, ms: dict) -> list[float]:
    """Cumulative seconds after each step: ``steps`` run-length encoded ``[[mask, n], ...]``, ``ms[mask]``."""
    out, tot = [], 0.0
    for mask, n in steps:
        for _ in range(n):
            tot += ms[mask] / 1e3
            out.append(tot)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--csv", required=True, action="append", help="the grid's CSV (python/reproduce.py --csv); "
                    "repeat it to price rows kept in several CSVs (e.g. a shared dense frontier)")
    ap.add_argument("--masks", required=True, help="the folder of the runner's per-cell active sets (<out>/masks)")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--heldout", type=int, default=None, help="held-out size of dense rows without mask files "
                    "(default: that of the task's mask files)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: the most any row of the CSVs "
                    "ran with)")
    ap.add_argument("--tiny", action="store_true", help="the tasks' tiny versions (tests)")
    a = ap.parse_args(argv)
    if a.rounds < 3:
        ap.error("--rounds must be >= 3")
    if a.heldout is not None and a.heldout < 0:
        ap.error(f"--heldout must be >= 0, got {a.heldout}")
    rows_of = {}
    for path in a.csv:
        if not os.path.exists(path):
            ap.error(f"--csv: {path} does not exist")
        rows_of[path] = read_csv(path)
        if not rows_of[path]:
            ap.error(f"--csv: {path} has no rows; run python/reproduce.py --csv {path} first")
    rows = [r for rs in rows_of.values() for r in rs]
    cells = load_cells(a.masks)
    try:
        cells += dense_cells(rows, cells, a.heldout)
    except ValueError as e:
        ap.error(str(e))
    threads = a.threads or max(r["threads"] for r in rows)
    torch.set_num_threads(threads)
    fb_of = {(r["task"], r["arm"], r["seed"]): frozen_backward_of(r["mat_kwargs"]) for r in rows}
    table_path = os.path.join(os.path.dirname(os.path.abspath(a.masks)), "step_table.csv")
    table = read_table(table_path)
    machine, date = rows[0]["machine"], time.strftime("%Y-%m-%d")
    by_task: dict = {}
    for c in cells:
        fb = fb_of.get((c["task"], c["arm"], c["seed"]), "dw")
        for mask, _ in c["steps"]:
            key = (c["task"], int(c["heldout"]), "dw" if mask == "dense" else fb, mask)
            if key not in table:
                by_task.setdefault(key[:2], set()).add(key[2:])
    for (task_name, heldout), needed in sorted(by_task.items()):
        needed = sorted(needed | {("dw", "dense")})  # the dense step in every table's rounds
        print(f"{task_name}: {len(needed)} active sets, {a.rounds} rounds", flush=True)
        medians = measure(step_providers(task_name, heldout, needed, tiny=a.tiny), a.rounds)
        for (fb, mask), ms in medians.items():
            table.setdefault((task_name, heldout, fb, mask), {
                "task": task_name, "heldout": heldout, "frozen_backward": fb, "mask": mask, "ms": round(ms, 4),
                "rounds": a.rounds, "threads": threads, "machine": machine, "date": date})
        write_table(table_path, table)
    priced, repriced = set(), set()
    for c in cells:
        fb = fb_of.get((c["task"], c["arm"], c["seed"]), "dw")
        ms = {m: float(table[(c["task"], int(c["heldout"]), "dw" if m == "dense" else fb, m)]["ms"])
              for m, _ in c["steps"]}
        cum = bench_seconds(c["steps"], ms)
        cell_rows = [r for r in rows if (r["task"], r["arm"], r["seed"]) == (c["task"], c["arm"], c["seed"])]
        for r in cell_rows:
            old, r["bench_s"] = r["bench_s"], round((cum[r["step"] - 1] if r["step"] else 0.0) + r["measure_s"], 4)
            if c.get("no_mask_file") and old is not None and abs(old - r["bench_s"]) > 1e-3:
                repriced.add((c["task"], c["arm"], c["seed"]))
        priced.add((c["task"], c["arm"], c["seed"]))
    for path, rs in rows_of.items():
        if any((r["task"], r["arm"], r["seed"]) in priced for r in rs):
            upsert_csv(path, rs)  # every row, in the file's order
        unpriced = sorted({(r["task"], r["arm"], r["seed"]) for r in rs} - priced)
        if unpriced:
            print(f"{path}: no mask file, no bench_s for {len(unpriced)} cells: "
                  + ", ".join(f"{t} {arm} s{s}" for t, arm, s in unpriced))
    if repriced:
        print(f"priced again by this table (they had bench_s from another): {len(repriced)} dense cells without "
              "mask files: " + ", ".join(f"{t} {arm} s{s}" for t, arm, s in sorted(repriced)))
    print(f"bench_s of {len(priced)} cells -> {', '.join(a.csv)}; table ({len(table)} active sets) -> {table_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
