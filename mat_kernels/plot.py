"""The view of the paper's Figure 1 from a MAT run: each module's score over training as a heatmap (modules grouped
by layer and kind, frozen spans marked), and the active fraction of each kind. matplotlib is optional: it is
imported when a plot is drawn, and its absence raises ``ImportError`` saying so.

    mat_kernels.plot.scores(mat, "scores.png")                          # a MAT controller (its log, names, kinds)
    mat_kernels.plot.scores(log, "scores.png", names=names, kinds=kinds)  # or a saved MAT.log
"""
from __future__ import annotations

import math

import torch

from mat_kernels.train.policy import layer_of

__all__ = ["scores", "layer_of", "score_table"]

def score_table(log: list[dict], names: list[str], kinds: list[str]):
    """``(order, steps, score [T, M] float64, active [T, M] bool)`` from a ``MAT.log``: modules in ``order``
    (grouped by layer, then kind, then name, in first-seen layer order), one row per measurement. A module's score
    is NaN where it was not measured (none is: every entry scores every module)."""
    if not isinstance(log, list) or not log:
        raise ValueError("log must be a non-empty list of MAT.log entries (no measurement was taken yet?)")
    M = len(names)
    if len(kinds) != M:
        raise ValueError(f"names and kinds must have the same length, got {M} and {len(kinds)}")
    for i, e in enumerate(log):
        if not isinstance(e, dict) or any(k not in e for k in ("step", "score", "active")):
            raise ValueError(f"log[{i}] is not a MAT.log entry (needs 'step', 'score', 'active')")
        if len(e["score"]) != M or len(e["active"]) != M:
            raise ValueError(f"log[{i}] has {len(e['score'])} scores, but {M} module names were given")
    layers = list(dict.fromkeys(layer_of(n) for n in names))
    order = sorted(range(M), key=lambda m: (layers.index(layer_of(names[m])), kinds[m], names[m]))
    steps = [int(e["step"]) for e in log]
    score = torch.tensor([[e["score"][m] for m in order] for e in log], dtype=torch.float64)
    active = torch.tensor([[bool(e["active"][m]) for m in order] for e in log], dtype=torch.bool)
    return order, steps, score, active


def scores(source, path: str, *, names: list[str] | None = None, kinds: list[str] | None = None,
           log_scale: bool = True, title: str | None = None) -> str:
    """Draw the score heatmap and the active fraction per kind to ``path`` (any format matplotlib writes); returns
    ``path``.

    ``source``: a :class:`mat_kernels.MAT` (its ``log``, ``names`` and ``kinds``), or a ``MAT.log`` list with
    ``names`` and ``kinds`` given. Scores are shown per module row (log10 when ``log_scale`` and all positive);
    cells where the module was frozen after that measurement are hatched."""
    try:  # a Figure of its own, not pyplot: no global backend or figure state of the caller is touched
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("mat_kernels.plot needs matplotlib (pip install matplotlib)") from e
    if hasattr(source, "log") and hasattr(source, "names"):
        log, names, kinds = source.log, list(source.names), list(source.kinds)
    else:
        log = source
        if names is None or kinds is None:
            raise ValueError("give names= and kinds= with a log (or pass the MAT controller itself)")
    order, steps, score, active = score_table(log, list(names), list(kinds))
    shown = score.clone()
    positive = bool((score > 0).all())
    if log_scale and positive:
        shown = score.log10()
    fig = Figure(figsize=(max(6.0, 0.25 * len(steps) + 3), 3 + 0.12 * len(order)))
    ax, ax2 = fig.subplots(2, 1, gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    im = ax.imshow(shown.T.numpy(), aspect="auto", interpolation="nearest", cmap="viridis",
                   extent=(-0.5, len(steps) - 0.5, len(order) - 0.5, -0.5))
    frozen = (~active).T.numpy()
    ys, xs = frozen.nonzero()
    ax.scatter(xs, ys, marker="x", s=12, c="white", linewidths=0.6, label="frozen after this measurement")
    labels = [f"{names[m]} ({kinds[m]})" for m in order]
    ax.set_yticks(range(len(order)))
    ax.set_yticklabels(labels, fontsize=max(3, min(8, int(600 / max(1, len(order))))))
    fig.colorbar(im, ax=ax, label=("log10 " if log_scale and positive else "") + "score")
    ax.set_title(title or "module scores per measurement (x: frozen)")
    for kind in dict.fromkeys(kinds):
        cols = [i for i, m in enumerate(order) if kinds[m] == kind]
        frac = active[:, cols].double().mean(1)
        ax2.plot(range(len(steps)), frac.numpy(), marker=".", label=kind)
    ax2.set_ylim(-0.05, 1.05)
    ax2.set_ylabel("active fraction")
    ax2.set_xlabel("measurement (training step)")
    tick = max(1, math.ceil(len(steps) / 12))
    ax2.set_xticks(range(0, len(steps), tick))
    ax2.set_xticklabels([str(steps[i]) for i in range(0, len(steps), tick)])
    ax2.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path
