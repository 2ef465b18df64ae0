#!/usr/bin/env bash
# The budget-matched screening grid of issue 21 (cnn-small, 5 seeds): the dense frontier at five budgets, MAT and its
# controls and criteria at two, every arm with the same 50 training images held out (the held-out probe).
# One invocation at a time, in the background; rows are upserted into results/budget_cnn.csv as cells finish.
set -euo pipefail
cd "$(dirname "$0")/.."
common=(--tasks cnn-small --seeds 0,1,2,3,4 --heldout 50 --schedule linear --csv results/budget_cnn.csv
        --out results/budget_cnn --no-progress)
python python/reproduce.py "${common[@]}" --arms dense --budgets 0.3,0.45,0.6,0.8,1
python python/reproduce.py "${common[@]}" --arms mat,shuffle,random,coherence,heldout --budgets 0.6,1
