#!/usr/bin/env bash
# Issue 21 follow-up screening on cnn-small: the same budgeted setting as results/run_budget_grid.sh (50 images held
# out, linear decay, b = 0.6), with MAT's schedule moved early enough that gating precedes the best accuracy (steps
# 160-240 of 600 in that grid): warm-up 60 and interval 40 steps (36 and 24 at b = 0.6), fixed before this run.
# λ (mat_early), its per-layer shuffle control and held-out alignment, 5 seeds. The dense frontier rows are those of
# results/budget_cnn.csv (the same runs: same task, seeds, held-out images and schedule).
set -euo pipefail
cd "$(dirname "$0")/.."
early="warmup_steps:60,interval:40"
python python/reproduce.py --tasks cnn-small --seeds 0,1,2,3,4 --heldout 50 --schedule linear \
  --csv results/budget_cnn_early.csv --out results/budget_cnn_early --no-progress \
  --arm "mat_early=$early" --arm "shuffle_early=policy:shuffle,$early" --arm "heldout_early=criterion:heldout,$early" \
  --arms mat_early,shuffle_early,heldout_early --budgets 0.6
