#!/usr/bin/env python
"""Summary of results/run_budget_cnn_early.sh against the dense frontier of results/budget_cnn.csv (the same dense
runs), each early arm compared with the early shuffle: the early arms are read as mat / shuffle / heldout so that the
frontier summary pairs them. Writes results/budget_cnn_early/summary.md and its frontier plot."""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "python"))
from summary import frontier_plot, frontier_summary, read_csv  # noqa: E402

dense = [r for r in read_csv(os.path.join(HERE, "budget_cnn.csv")) if r["arm"].startswith("dense@")]
early = read_csv(os.path.join(HERE, "budget_cnn_early.csv"))
for r in early:
    r["arm"] = r["arm"].replace("_early@", "@")
# bench time where python/step_table.py has priced every row (run with --csv results/budget_cnn_early.csv --csv
# results/budget_cnn.csv --masks results/budget_cnn_early/masks: the dense rows as step x the dense step), else the
# ledger's table time for all
recs, text = frontier_summary(dense + early, "cnn-small")
out = os.path.join(HERE, "budget_cnn_early")
os.makedirs(out, exist_ok=True)
frontier_plot(recs, "cnn-small (early gating)", "test accuracy", os.path.join(out, "cnn-small_frontier.png"))
with open(os.path.join(out, "summary.md"), "w") as f:
    f.write("## cnn-small, MAT's schedule early (warm-up 60, interval 40; arms mat/shuffle/heldout = *_early)\n\n"
            + text + "\n")
print(text)
