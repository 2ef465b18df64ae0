#!/usr/bin/env python
"""Head pruning by λmax, then MAT, against the same dense baseline (the MAT paper's pruning extension, Table 5).

Same data, model, budget and options as ``train_mlm.py`` (its ``--help`` lists them). Both arms train identically
for the first ``--prune-at`` steps (one dense run is shared up to there). Then:

* dense: continues dense training to ``--steps``;
* pruned + MAT: λmax of every head is measured on a probe batch (true-token log-probability, eval mode), the
  ``--prune-fraction`` of heads with the lowest λmax are removed physically (``mat_kernels.prune_heads``: smaller Q/K/V
  and output projections, at least one head kept per layer), and the rest trains with MAT to ``--steps``.

FLOPs are counted on the real steps (``torch.utils.flop_counter``, sparse weight gradients as executed), including
the pruning measurement and MAT's. Output: a summary table, ``prune_curves.png`` and ``prune_results.json`` in
``--out``.

    python python/prune_heads.py                       # about 8 minutes on 2 CPU cores
    python python/prune_heads.py --tiny --steps 30     # seconds (what the tests run)
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import shakespeare  # noqa: E402
import train_mlm  # noqa: E402

import mat_kernels as mk  # noqa: E402
from mat_kernels.flops import count_flops  # noqa: E402


def plot(dense, pruned, prune_step, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(dense["flops_at_eval"], dense["val_loss"], marker="o", ms=3, label="dense")
    ax.plot(pruned["flops_at_eval"], pruned["val_loss"], marker="o", ms=3, label="pruned by λmax + MAT")
    ax.axhline(min(dense["val_loss"]), color="gray", ls=":", lw=1, label="dense best")
    ax.set_xlabel("cumulative training FLOPs")
    ax.set_ylabel("validation loss (masked LM)")
    ax.set_title(f"heads pruned at step {prune_step}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = train_mlm.build_parser(__doc__)
    ap.add_argument("--prune-at", type=int, default=100, help="step at which heads are measured and pruned")
    ap.add_argument("--prune-fraction", type=float, default=0.5, help="fraction of all heads to remove")
    ap.set_defaults(out="prune_out", steps=800)
    a, tok, train_stream, val_batches, init, t0 = train_mlm.setup(ap, argv)
    if not 0 < a.prune_at < a.steps:
        ap.error("--prune-at must be inside (0, --steps)")
    progress = not a.no_progress
    dense = train_mlm.train("dense", init, a, tok, train_stream, val_batches, progress, snapshot_at=a.prune_at)
    snap = dense.pop("snapshot")
    model = snap["model"]

    # measure every head's λmax on a probe batch, prune the lowest
    probe_ids, probe_labels = shakespeare.mlm_batch(train_stream, a.probe_size, a.seq_len, tok,
                                                    torch.Generator().manual_seed(a.seed + 3))
    model.eval()
    specs = mk.discover_modules(model, out_proj="merge").specs  # a head = its Q/K/V rows and output columns
    flops, res = count_flops(mk.model_lambda_max, model, probe_ids, labels=probe_labels, specs=specs)
    prune_flops = flops + res.gram_flops
    model.train()
    heads = mk.lowest_heads(res.lambda_max, a.prune_fraction)
    before = sum(p.numel() for p in model.parameters())
    left = mk.prune_heads(model, heads)
    after = sum(p.numel() for p in model.parameters())
    n_heads = sum(1 for s in specs if s.kind == "head")
    print(f"step {a.prune_at}: pruned {len(heads)} of {n_heads} heads by lowest λmax ({n_heads - len(heads)} left; "
          f"heads left in the pruned layers: {left}); parameters {before:,} -> {after:,}")
    start = dict(snap, flops=snap["flops"] + prune_flops)
    pruned = train_mlm.train("mat", init, a, tok, train_stream, val_batches, progress, model=model, start=start)
    pruned["measure_flops"].insert(0, (a.prune_at, prune_flops))

    table, extra = train_mlm.summarize(dense, pruned)
    print()
    print(table.replace("| MAT |", "| pruned + MAT |", 1))
    print(f"pruned heads: {heads}")
    os.makedirs(a.out, exist_ok=True)
    plot(dense, pruned, a.prune_at, os.path.join(a.out, "prune_curves.png"))
    with open(os.path.join(a.out, "prune_results.json"), "w") as f:
        json.dump({"args": vars(a), "dense": dense, "pruned_mat": pruned, "pruned_heads": heads,
                   "head_lambda": {h: res.lambda_max[h] for h in res.lambda_max}, "params": [before, after], **extra},
                  f, default=str)
    print(f"wrote {a.out}/prune_curves.png and {a.out}/prune_results.json; total {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
