#!/usr/bin/env bash
# Issue 21 item 5: the held-out configuration (mlm-heldout: another play, 6 layers; fixed before any tuning), run
# once with the final defaults and reported apart: the dense frontier at five budgets, MAT with its shipped defaults
# (λmax) and its per-layer shuffle control at b = 0.6, the decayed (linear) schedule, no data held out (no arm needs
# a held-out probe). One seed at a time so that a stopped run leaves whole seeds; 2 torch threads, in the background.
set -euo pipefail
cd "$(dirname "$0")/.."
seeds=${SEEDS:-0 1 2 3 4}
common=(--tasks mlm-heldout --schedule linear --threads 2 --csv results/budget_mlm_heldout.csv
        --out results/budget_mlm_heldout --no-progress)
for s in $seeds; do
  python python/reproduce.py "${common[@]}" --seeds "$s" --arms dense --budgets 0.3,0.45,0.6,0.8,1
  python python/reproduce.py "${common[@]}" --seeds "$s" --arms mat,shuffle --budgets 0.6
done
