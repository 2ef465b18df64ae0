#!/usr/bin/env bash
# The grid behind README's and python/README's tables, run in the background one cell at a time on an otherwise
# idle machine (2 cores). Every cell upserts its rows into results/reproduce.csv; the summary is rebuilt at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
R="python python/reproduce.py --csv results/reproduce.csv --out results --no-progress"
$R --tasks mlm-small --arms dense,mat,random,trace,detach,layer,v0 --seeds 0,1,2
$R --tasks cnn-small --arms dense,mat,random,trace,detach,layer,v0 --seeds 0,1,2
$R --tasks mlm-default --arms dense,mat,random,trace,detach --seeds 0
$R --tasks mlm-heldout --arms dense,mat,random --seeds 0,1,2
$R --summary-only --tasks mlm-small,cnn-small,mlm-default,mlm-heldout
