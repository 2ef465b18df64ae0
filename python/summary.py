"""The runner's CSV and its summaries (python/reproduce.py writes the rows; this reads them): per task and arm the
best validation metric and the savings against dense, a plot per task, and, for budgeted grids, each arm against
the dense frontier (dense trained at several budgets, its schedule decayed to each) at the same cost."""
from __future__ import annotations

import csv
import math
import os

FIELDS = ["task", "arm", "seed", "step", "metric", "value", "flops", "measure_flops", "wall_s", "measure_s",
          "table_s", "active_fraction", "budget", "schedule", "mat_kwargs", "commit", "date", "machine", "threads",
          "bench_s"]


def read_csv(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r.setdefault("table_s", r["wall_s"])  # rows written before the table time and budgets
        r["bench_s"] = float(r["bench_s"]) if r.get("bench_s") not in (None, "") else None  # python/step_table.py
        r["budget"] = r.get("budget") or "1"
        r["schedule"] = r.get("schedule") or "task"
        for k in ("seed", "step", "threads"):
            r[k] = int(r[k])
        for k in ("value", "flops", "measure_flops", "wall_s", "measure_s", "table_s", "active_fraction", "budget"):
            r[k] = float(r[k])
    return rows


def upsert_csv(path: str, new_rows: list[dict]) -> None:
    """Replace the rows of the cells in ``new_rows`` (keyed by task, arm, seed) and append them."""
    cells = {(r["task"], r["arm"], int(r["seed"])) for r in new_rows}
    old = [r for r in read_csv(path) if (r["task"], r["arm"], r["seed"]) not in cells]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for r in old + new_rows:
            w.writerow({k: "" if r.get(k) is None else r[k] for k in FIELDS})
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------------
# summary
# ----------------------------------------------------------------------------------------------------------------
def mean_std(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    if not xs:
        return float("nan"), float("nan")
    m = sum(xs) / len(xs)
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, s


def curve(rows, task, arm, seed):
    return sorted((r for r in rows if (r["task"], r["arm"], r["seed"]) == (task, arm, seed)), key=lambda r: r["step"])


def best_of(curve, higher: bool):
    vals = [r["value"] for r in curve[1:]] or [curve[0]["value"]]
    return max(vals) if higher else min(vals)


def reach(curve, target: float, higher: bool):
    for r in curve[1:]:
        if (r["value"] >= target) if higher else (r["value"] <= target):
            return r
    return None


def summarize(rows: list[dict], task: str) -> tuple[list[dict], str]:
    """Per arm of ``task``: mean ± std over the seeds that have both the arm and dense. Returns (records, table)."""
    sub = [r for r in rows if r["task"] == task]
    if not sub:
        return [], f"no rows for task {task}"
    higher = "accuracy" in sub[0]["metric"]
    arms = list(dict.fromkeys(r["arm"] for r in sub))
    if "dense" in arms:
        arms = ["dense"] + [a for a in arms if a != "dense"]
    seeds_of = {a: sorted({r["seed"] for r in sub if r["arm"] == a}) for a in arms}
    recs = []
    for arm in arms:
        per = {"best": [], "flops_saving": [], "wall_saving": [], "measure_flops_share": [], "measure_time_share": [],
               "active": [], "reached": 0, "seeds": 0, "delta_vs_mat": [], "run_flops_saving": [],
               "run_wall_saving": []}
        for seed in seeds_of[arm]:
            c = curve(sub, task, arm, seed)
            if len(c) < 2:
                continue
            per["seeds"] += 1
            per["best"].append(best_of(c, higher))
            last = c[-1]
            per["measure_flops_share"].append(last["measure_flops"] / last["flops"] if last["flops"] else 0.0)
            per["measure_time_share"].append(last["measure_s"] / last["wall_s"] if last["wall_s"] else 0.0)
            per["active"].append(sum(r["active_fraction"] for r in c[1:]) / (len(c) - 1))
            d = curve(sub, task, "dense", seed)
            if len(d) >= 2:
                per["run_flops_saving"].append(1 - last["flops"] / d[-1]["flops"])
                per["run_wall_saving"].append(1 - last["wall_s"] / d[-1]["wall_s"])
                target = best_of(d, higher)
                rd, ra = reach(d, target, higher), reach(c, target, higher)
                if ra is not None:
                    per["reached"] += 1
                    per["flops_saving"].append(1 - ra["flops"] / rd["flops"])
                    per["wall_saving"].append(1 - ra["wall_s"] / rd["wall_s"])
            m = curve(sub, task, "mat", seed)
            if len(m) >= 2:
                diff = per["best"][-1] - best_of(m, higher)
                per["delta_vs_mat"].append(diff if higher else -diff)
        if per["seeds"]:
            recs.append({"task": task, "arm": arm, **per})
    return recs, table(recs, sub[0]["metric"], higher)


def fmt(ms, digits=4, pct=False):
    m, s = ms
    if math.isnan(m):
        return "-"
    if pct:
        return f"{100 * m:+.1f} ± {100 * s:.1f}%"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def table(recs: list[dict], metric: str, higher: bool) -> str:
    head = ["arm", "seeds", f"best {metric}", "vs MAT (+: better)", "reached dense best",
            "FLOPs saved to dense best", "wall time saved to dense best", "FLOPs saved, whole run",
            "wall time saved, whole run", "λ share of FLOPs", "λ share of time", "active fraction"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in recs:
        cells = [r["arm"], str(r["seeds"]), fmt(mean_std(r["best"])),
                 fmt(mean_std(r["delta_vs_mat"])) if r["arm"] != "mat" else "",
                 f"{r['reached']}/{r['seeds']}",
                 fmt(mean_std(r["flops_saving"]), pct=True) if r["arm"] != "dense" else "",
                 fmt(mean_std(r["wall_saving"]), pct=True) if r["arm"] != "dense" else "",
                 fmt(mean_std(r["run_flops_saving"]), pct=True) if r["arm"] != "dense" else "",
                 fmt(mean_std(r["run_wall_saving"]), pct=True) if r["arm"] != "dense" else "",
                 fmt(mean_std(r["measure_flops_share"]), 3, pct=False) if r["arm"] != "dense" else "",
                 fmt(mean_std(r["measure_time_share"]), 3, pct=False) if r["arm"] != "dense" else "",
                 fmt(mean_std(r["active"]), 2)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], task: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sub = [r for r in rows if r["task"] == task]
    if not sub:
        return
    arms = list(dict.fromkeys(r["arm"] for r in sub))
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.2))
    for i, arm in enumerate(arms):
        seeds = sorted({r["seed"] for r in sub if r["arm"] == arm})
        curves = [curve(sub, task, arm, s) for s in seeds]
        n = min(len(c) for c in curves)
        flops = [sum(c[k]["flops"] for c in curves) / len(curves) for k in range(n)]
        val = [sum(c[k]["value"] for c in curves) / len(curves) for k in range(n)]
        steps = [curves[0][k]["step"] for k in range(n)]
        act = [sum(c[k]["active_fraction"] for c in curves) / len(curves) for k in range(n)]
        color = f"C{i}"
        ax[0].plot([f / 1e12 for f in flops[1:]], val[1:], "-", color=color, lw=1.4,
                   label=f"{arm} (mean of {len(seeds)} seed{'s' if len(seeds) > 1 else ''})")
        ax[1].plot(steps, act, "-", color=color, lw=1.2, label=arm)
    ax[0].set_xlabel("cumulative training FLOPs (TFLOP, λ measurement included)")
    ax[0].set_ylabel(sub[0]["metric"])
    ax[0].set_title(task)
    ax[0].grid(alpha=0.3)
    ax[0].legend(fontsize=8)
    ax[1].set_xlabel("step")
    ax[1].set_ylabel("active module fraction")
    ax[1].set_ylim(-0.03, 1.03)
    ax[1].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------
# budgeted grids: the dense frontier
# ----------------------------------------------------------------------------------------------------------------
def split_arm(arm: str) -> tuple[str, float]:
    """``"mat@0.45"`` -> ``("mat", 0.45)``; an arm without a budget -> ``(arm, 1.0)``."""
    name, _, b = arm.partition("@")
    return name, float(b) if b else 1.0


def interpolate(points: list[tuple[float, float]], x: float) -> float:
    """Piecewise-linear value at cost ``x`` of the (cost, value) points (sorted by cost); NaN outside their range."""
    pts = sorted(points)
    if not pts or x < pts[0][0] or x > pts[-1][0]:
        return float("nan")
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return pts[-1][1]


def frontier_summary(rows: list[dict], task: str) -> tuple[list[dict], str]:
    """Every budgeted arm (``arm@b``) of ``task`` against the dense frontier at its own cost: per seed, the dense
    runs at their budgets (``dense@b``) give (cost, best metric) points; the arm's best metric minus the frontier
    interpolated at the arm's cost (FLOPs, and table time), oriented so that positive is better; and the arm
    against ``shuffle`` at the same budget. Mean ± std over seeds and how many seeds agree in sign. Costs as
    fractions of the full dense run (``dense@1``): FLOPs over its FLOPs, and the time (bench or table) as the mean
    over seeds of each seed's ratio to its own ``dense@1`` (``time_frac``; seeds without one are left out)."""
    sub = [r for r in rows if r["task"] == task and "@" in r["arm"]]
    if not sub:
        return [], f"no budgeted rows for task {task}"
    higher = "accuracy" in sub[0]["metric"]
    sign = 1.0 if higher else -1.0
    cells: dict = {}
    for r in sub:
        cells.setdefault((r["arm"], r["seed"]), []).append(r)
    best = {k: best_of(sorted(v, key=lambda r: r["step"]), higher) for k, v in cells.items()}
    last = {k: max(v, key=lambda r: r["step"]) for k, v in cells.items()}
    # time: the step-time table's (python/step_table.py) where every cell has it, else the ledger's table time
    time_key = "bench_s" if all(r["bench_s"] is not None for r in sub) else "table_s"
    seeds = sorted({s for _, s in cells})
    dense = {s: [(last[(a, s)]["flops"], last[(a, s)][time_key], best[(a, s)]) for a, s2 in cells
                 if s2 == s and split_arm(a)[0] == "dense"] for s in seeds}
    recs = []
    for arm in sorted({a for a, _ in cells}, key=lambda a: (split_arm(a)[0] != "dense", split_arm(a))):
        name, b = split_arm(arm)
        per = {"best": [], "cost": [], "table": [], "time_frac": [], "vs_flops": [], "vs_time": [], "vs_shuffle": [],
               "active": []}
        for s in seeds:
            if (arm, s) not in cells:
                continue
            per["best"].append(best[(arm, s)])
            per["cost"].append(last[(arm, s)]["flops"])
            per["table"].append(last[(arm, s)][time_key])
            full = next((a for a, s2 in cells if s2 == s and split_arm(a) == ("dense", 1.0)), None)
            if full is not None and last[(full, s)][time_key]:  # a seed without the full dense run: no fraction
                per["time_frac"].append(last[(arm, s)][time_key] / last[(full, s)][time_key])
            c = sorted(cells[(arm, s)], key=lambda r: r["step"])
            per["active"].append(sum(r["active_fraction"] for r in c[1:]) / max(1, len(c) - 1))
            if name != "dense" and len(dense[s]) >= 2:
                per["vs_flops"].append(sign * (best[(arm, s)] - interpolate([(f, v) for f, _, v in dense[s]],
                                                                             last[(arm, s)]["flops"])))
                per["vs_time"].append(sign * (best[(arm, s)] - interpolate([(t, v) for _, t, v in dense[s]],
                                                                            last[(arm, s)][time_key])))
            shuffle = (f"shuffle@{arm.partition('@')[2]}", s)
            if name not in ("dense", "shuffle") and shuffle in best:
                per["vs_shuffle"].append(sign * (best[(arm, s)] - best[shuffle]))
        recs.append({"task": task, "arm": arm, "budget": b, **per})
    full = [f for s in seeds for f, _, _ in dense[s] if f] or [1.0]
    ref = max(full)
    time_name = "bench time (step-time table)" if time_key == "bench_s" else "table time"
    head = ["arm", "budget", "seeds", f"best {sub[0]['metric']}", "FLOPs / full dense",
            f"{time_name.split(' (')[0]} / full dense", "vs dense frontier at its "
            "FLOPs (+: better; agree)", f"vs frontier at its {time_name}", "vs shuffle (same budget)",
            "active fraction"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in recs:
        def cell(xs):
            xs = [x for x in xs if not math.isnan(x)]
            if not xs:
                return "-"
            m, sd = mean_std(xs)
            agree = max(sum(x > 0 for x in xs), sum(x < 0 for x in xs))
            return f"{m:+.4f} ± {sd:.4f} ({agree}/{len(xs)})"
        lines.append("| " + " | ".join([
            r["arm"], f"{r['budget']:g}", str(len(r["best"])), fmt(mean_std(r["best"])),
            f"{mean_std(r['cost'])[0] / ref:.2f}",
            f"{mean_std(r['time_frac'])[0]:.2f}" if r["time_frac"] else "-",
            cell(r["vs_flops"]), cell(r["vs_time"]), cell(r["vs_shuffle"]),
            fmt(mean_std(r["active"]), 2)]) + " |")
    return recs, "\n".join(lines)


def frontier_plot(recs: list[dict], task: str, metric: str, path: str) -> None:
    """Quality against cost: the dense frontier as a line (mean over seeds at each budget), every other arm as a
    point at its mean cost with its spread (± std of the best metric and of the cost)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not recs:
        return
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    dense = sorted((mean_std(r["cost"])[0], mean_std(r["best"])[0]) for r in recs if split_arm(r["arm"])[0] == "dense")
    if dense:
        ax.plot([c / 1e12 for c, _ in dense], [v for _, v in dense], "-o", color="k", lw=1.5, ms=3,
                label="dense frontier (decayed to each budget)")
    names = sorted({split_arm(r["arm"])[0] for r in recs} - {"dense"})
    for i, name in enumerate(names):
        pts = [r for r in recs if split_arm(r["arm"])[0] == name]
        for j, r in enumerate(pts):
            (c, cs), (v, vs) = mean_std(r["cost"]), mean_std(r["best"])
            ax.errorbar(c / 1e12, v, xerr=cs / 1e12, yerr=vs, fmt="o", color=f"C{i}", ms=4, capsize=2,
                        label=name if j == 0 else None)
    ax.set_xlabel("training FLOPs (TFLOP, λ measurement included)")
    ax.set_ylabel(f"best {metric}")
    ax.set_title(f"{task}: quality against cost")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
