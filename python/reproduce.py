#!/usr/bin/env python
"""The experiment runner: tasks x arms x seeds -> one CSV, a summary table and a plot.

Every cell (task, arm, seed) trains the task's model from the seed's initial weights on the seed's batches (the same
for every arm), evaluates it every ``eval_every`` steps and appends one CSV row per evaluation to ``--csv``
(rows of a cell that is run again are replaced). The summary is computed from the CSV, so cells can be run in
separate invocations (one at a time, in the background) and summarised at the end.

Arms (``--arms``; add your own with ``--arm name=key:value,...``, MAT keyword arguments):

==============  =============================================================================================
``dense``       every parameter updated at every step (no MAT)
``mat``         ``mat_kernels.MAT`` with its shipped defaults (λmax measured from the training backward)
``random``      MAT's schedule and budget, modules chosen at random: as many per kind as the λ rule keeps
``trace``       the threshold on tr(Θ) = Σ_i ‖g_i‖² instead of λmax (a criterion that is not λ, same Grams)
``gradnorm``    the threshold on ‖Σ_i g_i‖² (the batch gradient's squared norm) instead of λmax
``dw``          MAT with ``frozen_backward="dw"``: frozen modules skip only their weight gradient
``detach``      MAT with ``frozen_backward="detach"``: no gradient flows through frozen modules either
``layer``       MAT with ``group_by="layer"``: heads thresholded against the heads of their own layer
``v0``          MAT with the defaults it had before this grid (first measurement at step 0, temporal rule patience 1)
``prune``       the paper's pruning extension (language tasks): dense until ``prune_at`` (default: a tenth of the
                steps), then the ``prune_fraction`` (0.5) of heads with the lowest λmax (a head = its Q/K/V rows and
                output columns, measured on that step's batch) are removed physically, and the rest trains with MAT
``shuffle``     MAT's own decisions, its count of active modules per layer and kind kept, the modules picked at
                random (the per-layer control)
``fixed``       MAT's first decision kept for the whole run
``coherence``   the criterion 1ᵀΘ1/(n·trΘ) (agreement without magnitude); ``offdiag``: its off-diagonal part
                (1ᵀΘ1 − trΘ)/((n−1)·trΘ); ``lamratio``: λmax/trΘ
``heldout``     ⟨ḡ_train, ḡ_heldout⟩ from a held-out probe (``--heldout N`` training samples kept out of every
                arm's batches), a module training while it is positive
==============  =============================================================================================

Keys of an arm that are not MAT's: ``prune_fraction`` and ``prune_at`` (the ``prune`` arm's).

Budgets (``--budgets 0.3,0.45,0.6,0.8,1``): every arm also runs at each fraction b of the task's steps as
``arm@b``, its learning rate warmed up as the task's and then decayed to zero within the budget (``--schedule``
linear or cosine) and MAT's ``warmup_steps`` and ``interval`` scaled by b (the same measurements per run);
``dense@b`` over the budgets is the dense frontier, and the summary gives each arm's best metric
against the frontier interpolated at the arm's own cost (FLOPs, and table time: each step charged the median time
of the steps with its active set), and against ``shuffle`` at the same budget.

Per evaluation the CSV holds: the step, the validation metric, cumulative training FLOPs (λ measurement included)
and the measurement's share of them, cumulative wall time of the training steps (measurement included; evaluation
excluded) and the measurement's share, the active module fraction. FLOPs are counted by
``torch.utils.flop_counter`` on the real steps (``mat_kernels.train.flops.FlopsLedger``): what ran is what is counted.

Summary per task and arm, mean ± std over seeds: the best validation metric, FLOPs and wall time to reach the same
seed's dense best (and the saving against dense), the measurement's share of FLOPs and time, the mean active
fraction; and the difference of each arm's best metric from ``mat``'s (positive: better than MAT).

    python python/reproduce.py              # the default: mlm-small, dense vs MAT vs random, seed 0 (~10 min)
    python python/reproduce.py --tasks mlm-small,cnn-small --arms dense,mat,random,trace,detach --seeds 0,1,2
    python python/reproduce.py --summary-only --csv results/reproduce.csv     # tables and plots from the CSV
    python python/reproduce.py --list                            # tasks and arms
"""
from __future__ import annotations

import argparse
import datetime
import inspect
import json
import os
import platform
import subprocess
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tasks as task_registry  # noqa: E402
from summary import FIELDS, frontier_plot, frontier_summary, plot, read_csv, summarize, upsert_csv  # noqa: E402,F401

import mat_kernels as mk  # noqa: E402
from mat_kernels import plot as score_plot  # noqa: E402
from mat_kernels.train.flops import FlopsLedger  # noqa: E402

ARMS: dict[str, dict | None] = {
    "dense": None,
    "mat": {},
    "random": {"policy": "random"},
    "trace": {"criterion": "trace"},
    "gradnorm": {"criterion": "grad_norm"},
    "dw": {"frozen_backward": "dw"},
    "detach": {"frozen_backward": "detach"},
    "layer": {"group_by": "layer"},
    "v0": {"warmup_steps": 0, "patience": 1},
    "prune": {"prune_fraction": 0.5},
    # the controls at MAT's own active counts, and the criteria that separate agreement from magnitude
    "shuffle": {"policy": "shuffle"},
    "fixed": {"policy": "fixed"},
    "coherence": {"criterion": "coherence"},
    "offdiag": {"criterion": "offdiag_coherence"},
    "lamratio": {"criterion": "lambda_ratio"},
    "heldout": {"criterion": "heldout"},  # needs --heldout N (the runner passes probe, heldout and output="loss")
}
RUNNER_KEYS = ("prune_fraction", "prune_at")
HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CSV = os.path.join("reproduce_out", "reproduce.csv")  # relative to the working directory; the committed
# grid lives in results/ (results/run_grid.sh passes --csv results/reproduce.csv)


# ----------------------------------------------------------------------------------------------------------------
# one cell
# ----------------------------------------------------------------------------------------------------------------
def run_cell(task_name: str, arm: str, arm_kwargs: dict | None, seed: int, *, tiny: bool = False,
             progress: bool = True, keep: bool = False, budget: float | None = None, schedule: str = "linear",
             heldout: int = 0) -> tuple[list[dict], dict]:
    """Train one (task, arm, seed) cell; returns its CSV rows and extras (the MAT log and report; with ``keep``, the
    model, ledger and controller too). ``budget``: a fraction of the task's steps with the learning rate decayed to
    zero within it (``schedule``); ``heldout``: training samples kept out of every batch as a held-out probe (use
    the same value for every arm of a comparison)."""
    task = task_registry.build(task_name, seed, tiny=tiny, heldout=heldout)
    if budget is not None:
        task = task_registry.budgeted(task, budget, schedule)
    model = task.model
    opt = task.make_optimizer(model)
    ledger = FlopsLedger()
    mat_kwargs = None if arm_kwargs is None else {k: v for k, v in arm_kwargs.items() if k not in RUNNER_KEYS}
    if mat_kwargs is not None:
        mat_kwargs = {"probe": None, **(_TINY_SCHEDULE if tiny else {}), **mat_kwargs}
        if budget is not None:  # MAT's schedule (in steps) shrinks with the run: the same decisions per run
            defaults = inspect.signature(mk.MAT).parameters
            for key in ("warmup_steps", "interval"):
                full = mat_kwargs.get(key, defaults[key].default)
                mat_kwargs[key] = max(int(key == "interval"), round(budget * full))
        if mat_kwargs.get("criterion") == "heldout":
            if task.heldout_probe is None:
                raise ValueError(f"arm {arm!r}: criterion 'heldout' needs a held-out probe: pass --heldout N (and "
                                 "the same N for every arm, so that all train on the same data)")
            mat_kwargs.update(probe=lambda step: task.batch(step), heldout=task.heldout_probe, output="loss")
    prune_at = None
    if arm_kwargs is not None and "prune_fraction" in arm_kwargs:
        prune_at = int(arm_kwargs.get("prune_at", max(1, task.steps // 10)))
        if not 0 < prune_at < task.steps:
            raise ValueError(f"arm {arm!r}: prune_at must be inside (0, {task.steps}), got {prune_at}")
    mat = None
    if mat_kwargs is not None and prune_at is None:
        mat = mk.MAT(model, opt, ledger=ledger, **mat_kwargs)
    rows, evals, pruned = [], [], {}
    step_sets: list[str] = []  # each step's active set: a 0/1 string per module (MAT's order) or "dense"
    env = _environment()

    def record(step: int) -> None:
        value = task.evaluate(model)
        evals.append(value)
        rows.append({
            "task": task_name, "arm": arm, "seed": seed, "step": step, "metric": task.metric, "value": value,
            "flops": ledger.total(step), "measure_flops": ledger.measurement_flops(step),
            "wall_s": round(ledger.seconds(step), 4), "measure_s": round(ledger.measurement_seconds(step), 4),
            "table_s": round(ledger.table_seconds(step), 4), "budget": 1.0 if budget is None else budget,
            "schedule": "task" if budget is None else schedule,
            "active_fraction": mat.active_fraction() if mat is not None else 1.0,
            "mat_kwargs": "" if arm_kwargs is None else _kw_text(arm_kwargs), **env,
        })

    bar = _progress(task.steps, f"{task_name} {arm} s{seed}", progress)
    record(0)
    for step in range(task.steps):
        batch = task.batch(step)
        if step == prune_at:
            t0 = time.perf_counter()
            pruned = _prune(model, batch, float(arm_kwargs["prune_fraction"]), ledger, step)
            opt = task.make_optimizer(model)
            mat = mk.MAT(model, opt, ledger=ledger, **mat_kwargs)
            ledger.measure_seconds[-1] = (step, time.perf_counter() - t0)
        for g in opt.param_groups:
            g["lr"] = task.lr_at(step)
        t0 = time.perf_counter()
        if mat is None:
            loss = ledger.count_step(_shapes(batch), _dense_step, model, task, batch)
            step_sets.append("dense")
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            key = mat.flops_key()
            step_sets.append("".join("1" if a else "0" for a in key[0]))
            loss = ledger.count_step((_shapes(batch), key), _mat_step, mat, model, task, batch,
                                     base_key=(_shapes(batch), (key[0], False)))
            mat.step()
            mat.zero_grad()
        ledger.add_seconds(time.perf_counter() - t0)
        if (step + 1) % task.eval_every == 0 or step + 1 == task.steps:
            record(step + 1)
            if bar is not None:
                bar.set_postfix(loss=f"{float(loss):.3f}", val=f"{evals[-1]:.4f}",
                                active=f"{rows[-1]['active_fraction']:.2f}")
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    extra = {"info": task.info, "masks": mask_runs(step_sets), **pruned}
    if mat is not None:
        extra.update(log=mat.log, report=mat.report(), names=mat.names, kinds=mat.kinds)
    if keep:
        extra.update(model=model, ledger=ledger, mat=mat)
    return rows, extra


def mask_runs(sets: list[str]) -> list[list]:
    """Each step's active set, run-length encoded: ``[[set, steps], ...]`` (``set``: a 0/1 string per module in MAT's
    order, or ``"dense"``). What the step-time table (python/step_table.py) prices."""
    out: list[list] = []
    for sig in sets:
        if out and out[-1][0] == sig:
            out[-1][1] += 1
        else:
            out.append([sig, 1])
    return out


# MAT's schedule counts steps; the tiny tasks (tests) are a few dozen steps long
_TINY_SCHEDULE = {"warmup_steps": 2, "interval": 3}


def _prune(model, batch, fraction: float, ledger: FlopsLedger, step: int) -> dict:
    """Measure every head (its Q/K/V rows and output columns) on ``batch`` in eval mode, remove the ``fraction``
    with the lowest λmax (at least one per layer), and record the measurement in ``ledger``."""
    from mat_kernels.train.flops import count_flops
    from mat_kernels.train.policy import criterion_flops

    specs = [s for s in mk.discover_modules(model, out_proj="merge").specs if s.kind == "head"]
    if not specs:
        raise ValueError("the prune arm needs attention heads; this task's model has none")
    model.eval()
    try:
        flops, res = count_flops(mk.model_lambda_max, model, batch[0], labels=batch[1], specs=specs)
    finally:
        model.train()
    # the probe passes and the Grams, as counted, and the eigen-solves, which the counter cannot see
    ledger.add_measurement(step, flops + criterion_flops("lambda", len(specs), res.n))
    heads = mk.lowest_heads(res, fraction)
    before = sum(p.numel() for p in model.parameters())
    mk.prune_heads(model, heads)
    return {"pruned_heads": heads, "params": [before, sum(p.numel() for p in model.parameters())]}


def _dense_step(model, task, batch):
    loss = task.loss(model, batch)
    loss.backward()
    return loss.detach()


def _mat_step(mat, model, task, batch):
    with mat.measure_step(loss_scale=task.loss_scale(batch)):
        loss = task.loss(model, batch)
        mat.backward(loss)
    return loss.detach()


def _shapes(batch) -> tuple:
    return tuple(tuple(t.shape) for t in batch)


def _kw_text(kw: dict) -> str:
    return ";".join(f"{k}={v}" for k, v in sorted(kw.items()))


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, file=sys.stderr)


_ENV: dict | None = None


def _environment() -> dict:
    global _ENV
    if _ENV is None:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                                    text=True, check=True).stdout.strip()
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE,
                                   capture_output=True, text=True, check=True).stdout.strip()
            commit += "-dirty" if dirty else ""
        except (OSError, subprocess.CalledProcessError):
            commit = "unknown"
        _ENV = {"commit": commit, "date": datetime.date.today().isoformat(),
                "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}",
                "threads": torch.get_num_threads()}
    return _ENV


# ----------------------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------------------
def _parse_arm(text: str) -> tuple[str, dict]:
    """``name=key:value,key:value`` -> (name, MAT kwargs); values are parsed as int, float, bool, None or str."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--arm {text!r}: expected name=key:value,... (MAT keyword arguments)")
    name, spec = text.split("=", 1)
    if not name or name in ARMS:
        raise argparse.ArgumentTypeError(f"--arm {text!r}: the name must be new (built-in arms: {', '.join(ARMS)})")
    kw = {}
    for item in filter(None, spec.split(",")):
        if ":" not in item:
            raise argparse.ArgumentTypeError(f"--arm {text!r}: {item!r} is not key:value")
        k, v = item.split(":", 1)
        kw[k] = _value(v)
    return name, kw


def _value(v: str):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(v.lower(), v)


def _int_list(text: str, name: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name} must be comma-separated integers, got {text!r}") from None
    if not out or any(x < 0 for x in out):
        raise argparse.ArgumentTypeError(f"{name} must list non-negative integers, got {text!r}")
    return out


def _budgets(text: str) -> list[float]:
    try:
        out = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--budgets must be comma-separated fractions, got {text!r}") from None
    if not out or any(not 0 < b <= 1 for b in out):
        raise argparse.ArgumentTypeError(f"--budgets: every budget must be a fraction in (0, 1], got {text!r}")
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--tasks", default="mlm-small", help=f"comma-separated tasks ({', '.join(task_registry.names())})")
    ap.add_argument("--arms", default="dense,mat,random",
                    help=f"comma-separated arms ({', '.join(ARMS)}, or --arm names)")
    ap.add_argument("--arm", action="append", default=[], type=_parse_arm, metavar="NAME=KEY:VALUE,...",
                    help="define an arm from MAT keyword arguments (repeatable), e.g. --arm a05=alpha:0.5")
    ap.add_argument("--seeds", default="0", type=lambda t: _int_list(t, "--seeds"), help="comma-separated seeds")
    ap.add_argument("--csv", default=DEFAULT_CSV, help="the CSV to upsert rows into and summarise from")
    ap.add_argument("--out", default=None, help="folder for the summary (summary.md) and plots (default: the "
                                                "CSV's folder)")
    ap.add_argument("--summary-only", action="store_true", help="run nothing: tables and plots from the CSV")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--budgets", default=None, type=_budgets, help="comma-separated budget fractions in (0, 1]: "
                    "every arm runs at each as 'arm@b', its learning rate decayed to zero within the budget")
    ap.add_argument("--schedule", default="linear", choices=task_registry.SCHEDULES,
                    help="the decay of budgeted runs after warm-up")
    ap.add_argument("--heldout", type=int, default=0, help="training samples kept out of every arm's batches as "
                    "the held-out probe (the 'heldout' arm needs it)")
    ap.add_argument("--tiny", action="store_true", help="seconds-long versions of the tasks (tests)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    ap.add_argument("--list", action="store_true", help="list the tasks and arms, then exit")
    return ap


def resolve(a, ap) -> tuple[list[str], dict[str, dict | None]]:
    arms = dict(ARMS)
    for name, kw in a.arm:
        arms[name] = kw
    tasks = [t for t in a.tasks.split(",") if t]
    unknown = [t for t in tasks if t not in task_registry.names()]
    if unknown or not tasks:
        ap.error(f"--tasks: unknown {unknown or a.tasks!r}; known: {', '.join(task_registry.names())}")
    chosen = [x for x in a.arms.split(",") if x]
    bad = [x for x in chosen if x not in arms]
    if bad or not chosen:
        ap.error(f"--arms: unknown {bad or a.arms!r}; known: {', '.join(arms)}")
    if a.threads is not None and a.threads < 1:
        ap.error("--threads must be >= 1")
    if a.heldout < 0:
        ap.error(f"--heldout must be >= 0, got {a.heldout}")
    if any((arms[x] or {}).get("criterion") == "heldout" for x in chosen) and not a.heldout:
        ap.error("--heldout: the arms " + ", ".join(x for x in chosen if (arms[x] or {}).get("criterion") == "heldout")
                 + " need a held-out probe: pass --heldout N")
    if a.summary_only and not os.path.exists(a.csv):
        ap.error(f"--csv: {a.csv!r} does not exist (--summary-only summarises an existing CSV)")
    return tasks, {x: arms[x] for x in chosen}


def main(argv=None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    if a.list:
        for name in task_registry.names():
            print(f"task {name}: {task_registry.build.__doc__ and ''}{task_registry._TASKS[name].__name__}")
        for name, kw in ARMS.items():
            print(f"arm {name}: {'no MAT' if kw is None else 'MAT(' + _kw_text(kw) + ')'}")
        return 0
    tasks, arms = resolve(a, ap)
    if a.threads:
        torch.set_num_threads(a.threads)
    out = a.out or os.path.dirname(os.path.abspath(a.csv))
    if not a.summary_only:
        for task in tasks:
            for seed in a.seeds:
                for (arm, kw), budget in ((x, b) for b in (a.budgets or [None]) for x in arms.items()):
                    t0 = time.perf_counter()
                    name = arm if budget is None else f"{arm}@{budget:g}"
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", UserWarning)  # backend notices; MAT.report() has them
                        rows, extra = run_cell(task, name, kw, seed, tiny=a.tiny, progress=not a.no_progress,
                                               budget=budget, schedule=a.schedule, heldout=a.heldout)
                    upsert_csv(a.csv, rows)
                    os.makedirs(os.path.join(out, "masks"), exist_ok=True)  # for the step-time table
                    with open(os.path.join(out, "masks", f"{task}_{name}_s{seed}.json"), "w") as f:
                        json.dump({"task": task, "arm": name, "seed": seed, "budget": budget, "heldout": a.heldout,
                                   "schedule": a.schedule, "steps": extra["masks"]}, f)
                    if extra.get("log"):  # the view of the paper's Figure 1, per MAT arm and seed
                        score_plot.scores(extra["log"], os.path.join(out, f"{task}_{name}_s{seed}_scores.png"),
                                       names=extra["names"], kinds=extra["kinds"], title=f"{task} {name} seed {seed}")
                    best = (max if "accuracy" in rows[0]["metric"] else min)(r["value"] for r in rows[1:])
                    print(f"{task} {name} seed {seed}: best {rows[0]['metric']} {best:.4f}, "
                          f"{rows[-1]['flops']:.3e} FLOPs, {rows[-1]['wall_s']:.1f} s training "
                          f"({time.perf_counter() - t0:.0f} s with evaluation)", flush=True)
    rows = read_csv(a.csv)
    os.makedirs(out, exist_ok=True)
    parts = []
    for task in tasks:
        plain = [r for r in rows if "@" not in r["arm"]]
        parts.append(f"## {task}\n")
        if any(r["task"] == task for r in plain):
            parts.append(summarize(plain, task)[1] + "\n")
        if any("@" in r["arm"] and r["task"] == task for r in rows):
            frecs, ftable = frontier_summary(rows, task)
            parts.append(f"### {task}: against the dense frontier (budgeted runs)\n\n{ftable}\n")
            metric = next(r["metric"] for r in rows if r["task"] == task)
            frontier_plot(frecs, task, metric, os.path.join(out, f"{task}_frontier.png"))
        if any(r["task"] == task for r in plain):
            plot(plain, task, os.path.join(out, f"{task}.png"))
    text = "\n".join(parts)
    print()
    print(text)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
