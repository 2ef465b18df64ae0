#!/usr/bin/env bash
# The budget-matched grid of issue 21 on mlm-small (5 seeds, one seed at a time so that a stopped grid leaves whole
# seeds): the dense frontier at five budgets, MAT with its controls (shuffle, random, fixed) and criteria (coherence,
# heldout) at b = 0.6, every arm with the same 32 training sequences held out (the held-out probe). One invocation at
# a time, in the background, 1 torch thread; rows are upserted into results/budget_mlm.csv as cells finish.
set -euo pipefail
cd "$(dirname "$0")/.."
seeds=${SEEDS:-0 1 2 3 4}
common=(--tasks mlm-small --heldout 32 --schedule linear --threads 1 --csv results/budget_mlm.csv
        --out results/budget_mlm --no-progress)
for s in $seeds; do
  python python/reproduce.py "${common[@]}" --seeds "$s" --arms dense --budgets 0.3,0.45,0.6,0.8,1
  python python/reproduce.py "${common[@]}" --seeds "$s" --arms mat,shuffle,random,fixed,coherence,heldout \
    --budgets 0.6
done
