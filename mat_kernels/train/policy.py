"""MAT decisions from measured module Grams: the scores, the threshold policies and the temporal convergence rule.

Pure functions and small state objects, no model: the controller (:mod:`mat_kernels.train.controller`) calls them
after each measurement. Provenance (docs/paper.md): the dynamic threshold on λmax is the paper's idea [V]; α·mean with
α = 1, the other policies, the criteria other than λmax, smoothing, hysteresis and the patience of the temporal rule
are our choices [D]; the temporal rule itself comes from a third-party reading of MAT [D].

Criteria (a score per module from its Gram Θ = J Jᵀ over the n samples, :func:`module_scores`; g_i is sample i's
gradient of the module's parameters, so Θ_ij = ⟨g_i, g_j⟩). 1ᵀΘ1/n ≤ λmax ≤ tr Θ: λmax grows with the module's size,
its gradient scale and single outlier samples; the normalised criteria separate how much the samples agree from how
large their gradients are (docs/maths.md §4):

=======================  =========================================================================================
``"lambda"``             λmax(Θ), the principal eigenvalue (MAT)
``"trace"``              tr(Θ) = Σ_i ‖g_i‖², the summed squared per-sample gradient norms (an ablation: no λ)
``"grad_norm"``          1ᵀΘ1 = ‖Σ_i g_i‖², the squared norm of the batch gradient (an ablation: no λ)
``"coherence"``          1ᵀΘ1 / (n·tr Θ) ∈ [0, 1]: 1 when every sample's gradient is the same
``"offdiag_coherence"``  (1ᵀΘ1 − tr Θ) / ((n − 1)·tr Θ) ∈ [−1/(n−1), 1]: the same without the self-terms ⟨g_i, g_i⟩
                         (which mostly reflect memorisation): Σ_{i≠j} ⟨g_i, g_j⟩ over (n − 1) Σ_i ‖g_i‖²
``"lambda_ratio"``       λmax(Θ) / tr Θ ∈ [1/n, 1]: the share of the gradient energy in the principal direction
``"heldout"``            ⟨ḡ_train, ḡ_heldout⟩ = 1ᵀ Θ_cross 1 / (n_train · n_heldout), from the cross block of the Gram
                         over a training probe and a held-out probe (``n_train`` samples first): minus the
                         first-order change of the held-out loss per unit step along −ḡ_train on this module
                         (positive: the update is predicted to help); decided by the ``"positive"`` policy
=======================  =========================================================================================

Their costs besides the Grams (counted by :func:`criterion_flops`): λmax one solve per module (``eigvalsh``, eigenvalues
only, about (4/3)·n³, for the ``"lambda"``/``"lambda_ratio"`` criteria, and by MAT for its log under any criterion;
subspace iteration for n ≥ 256), the sums O(M·n²).

Threshold policies (``active = score > τ`` unless stated):

==============  ============================================================
``"mean"``      τ = α · mean_m score_m (default, α = 1)
``"max"``       τ = α · max_m score_m (α < 1)
``"quantile"``  τ = the q-quantile of the scores (``q`` in [0, 1])
``"top_k"``     the k modules of largest score are active (ties broken by index)
``"random"``    as many modules as ``"mean"`` keeps, chosen uniformly at random (seeded): the ablation that shows
                whether the criterion chooses better than chance at the same budget
``"positive"``  τ = 0: a module trains while its score is positive (the ``"heldout"`` criterion)
==============  ============================================================

:func:`shuffle_within` is the per-layer control (Frankle et al. 2020): at each decision the same number of active
modules per layer and kind as the criterion chose, picked at random.

Temporal rule, per module m, with λ_0 its first measurement and Δ_t = |λ_t − λ_0|: the step ratio
r_t = |Δ_t − Δ_{t−1}| / |Δ_1|. Once r_t < β for ``patience`` measurements in a row, module m is *converged* and
frozen for good. With ``patience=1`` this is the rule as read (one coincidental near-equal pair of λ values then
freezes a module for good; seen on the CNN). Δ_1 = 0 makes the ratio undefined: such a module is not declared
converged by the rule.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

__all__ = ["threshold_mask", "module_scores", "criterion_flops", "shuffle_within", "layer_of", "TemporalRule",
           "POLICIES", "CONTROLS", "CRITERIA", "NEEDS_HELDOUT", "check_number"]

POLICIES = ("mean", "max", "quantile", "top_k", "random", "positive")
CONTROLS = ("shuffle", "fixed")  # MAT's controls at the criterion's own active counts (mat_kernels.MAT)
CRITERIA = ("lambda", "trace", "grad_norm", "coherence", "offdiag_coherence", "lambda_ratio", "heldout")
NEEDS_HELDOUT = ("heldout",)  # criteria that need a held-out probe
_NEEDS_LAMBDA = ("lambda", "lambda_ratio")


def module_scores(grams: torch.Tensor, criterion: str = "lambda", *, lam: torch.Tensor | None = None,
                  n_train: int | None = None) -> torch.Tensor:
    """Score of each module (float64 ``[M]``) from its Gram ``[M, n, n]`` under ``criterion`` (module docstring).

    ``lam``: λmax values of the training block already computed (reused). ``n_train``: the Gram is over
    ``n_train`` training samples followed by held-out ones (required by ``"heldout"``; the other criteria then read
    the training block only)."""
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    if not isinstance(grams, torch.Tensor) or grams.dim() != 3 or grams.shape[-1] != grams.shape[-2]:
        raise ValueError(f"grams must be [M, n, n], got {tuple(getattr(grams, 'shape', ()))}")
    n = grams.shape[-1]
    if n_train is not None and (not isinstance(n_train, int) or isinstance(n_train, bool) or not 0 < n_train < n):
        raise ValueError(f"n_train must be an int in [1, {n - 1}] (the Gram has {n} samples), got {n_train!r}")
    if criterion in NEEDS_HELDOUT and n_train is None:
        raise ValueError(f"criterion {criterion!r} needs the Gram over a training and a held-out probe (n_train=)")
    g = grams.double()
    if criterion == "heldout":
        n_ho = n - n_train
        return (g[:, :n_train, n_train:].sum(dim=(-2, -1)) / (n_train * n_ho)).cpu()
    if n_train is not None:
        g, n = g[:, :n_train, :n_train], n_train
    if criterion in _NEEDS_LAMBDA:
        if lam is None:
            from mat_kernels.measure.solvers import lambda_max

            lam = lambda_max(g)
        lam = lam.double().cpu()
        if criterion == "lambda":
            return lam
    trace = g.diagonal(dim1=-2, dim2=-1).sum(-1).cpu()
    if criterion == "trace":
        return trace
    total = g.sum(dim=(-2, -1)).cpu()  # 1ᵀΘ1 = ‖Σ_i g_i‖² ≥ 0 (up to rounding)
    if criterion == "grad_norm":
        return total.clamp_min(0)
    safe = trace.clamp_min(torch.finfo(torch.float64).tiny)  # a module with no gradient at all scores 0
    if criterion == "coherence":
        return (total.clamp_min(0) / (n * safe)).where(trace > 0, torch.zeros_like(trace))
    if criterion == "offdiag_coherence":
        if n < 2:
            raise ValueError("offdiag_coherence needs at least 2 samples")
        return ((total - trace) / ((n - 1) * safe)).where(trace > 0, torch.zeros_like(trace))
    return (lam / safe).where(trace > 0, torch.zeros_like(trace))  # lambda_ratio


def criterion_flops(criterion: str, num_modules: int, n: int, *, with_lambda: bool = False,
                    n_lambda: int | None = None) -> int:
    """FLOPs of scoring ``num_modules`` Grams of ``n`` samples under ``criterion`` besides building the Grams: the
    sums (n² per module) and, for the λ criteria or with ``with_lambda`` (:class:`mat_kernels.MAT` computes λmax for
    its log whatever the criterion), the eigen-solve of the ``n_lambda`` × ``n_lambda`` block λ is taken from
    (default ``n``; MAT's training probe when a held-out probe follows it): ``eigvalsh``, eigenvalues only,
    ~(4/3)·n³ per module (the tridiagonal reduction; an estimate, invisible to ``FlopCounterMode``; the subspace
    iteration that replaces it from n = 256 is charged the same)."""
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    k = n if n_lambda is None else n_lambda
    if not 0 < k <= n:
        raise ValueError(f"n_lambda must be in [1, n = {n}], got {n_lambda}")
    solve = (num_modules * 4 * k ** 3) // 3 if criterion in _NEEDS_LAMBDA or with_lambda else 0
    return num_modules * n * n + solve


_MODULE_PART = re.compile(r"\.?(head\d+(\.out)?|group\d+(\.out)?|ffn|experts\.[^.]+)$")


def layer_of(name: str) -> str:
    """The layer a module belongs to: its name up to the module's own part (``layers.3`` for ``layers.3.head1``,
    ``layers.3.head1.out``, ``layers.3.group0`` and ``layers.3.ffn``); the name itself otherwise (a conv)."""
    return _MODULE_PART.sub("", name) or name


def shuffle_within(active: torch.Tensor, groups: list[list[int]], generator: torch.Generator | None = None, *,
                   eligible: torch.Tensor | None = None):
    """The per-layer shuffle control: for each group of module indices (one layer and kind), as many active
    modules as ``active`` has there, chosen uniformly at random (seeded by ``generator``) among the ``eligible``
    ones (bool, default all; must include the active ones)."""
    active = torch.as_tensor(active, dtype=torch.bool).cpu()
    eligible = torch.ones_like(active) if eligible is None else torch.as_tensor(eligible, dtype=torch.bool).cpu()
    if bool((active & ~eligible).any()):
        raise ValueError("eligible must include every active module")
    out = torch.zeros_like(active)
    seen = set()
    for idx in groups:
        if seen & set(idx):
            raise ValueError("groups must not share module indices")
        seen |= set(idx)
        t = torch.tensor(idx, dtype=torch.long)
        count = int(active[t].sum())
        t = t[eligible[t]]
        out[t[torch.randperm(len(t), generator=generator)[:count]]] = True
    if seen != set(range(active.numel())):
        raise ValueError(f"groups must cover every module index 0..{active.numel() - 1}")
    return out


def threshold_mask(lam: torch.Tensor, policy: str = "mean", *, alpha: float = 1.0, q: float = 0.5,
                   k: int | None = None, generator: torch.Generator | None = None,
                   eligible: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """``(active bool [M], threshold)`` for scores ``[M]`` under ``policy`` (see the module docstring).

    For ``top_k`` the returned threshold is the k-th largest score (informational); for ``random`` it is the
    ``mean`` rule's τ whose count was used. ``generator``: the seeded CPU generator of ``random``; ``eligible``
    (bool ``[M]``, default all): ``random`` keeps as many of them as ``mean`` keeps and picks among them only (MAT
    passes the modules the temporal rule has not frozen for good).
    """
    if not isinstance(lam, torch.Tensor) or lam.dim() != 1 or lam.numel() == 0:
        raise ValueError("lam must be a non-empty 1-D tensor of scores (e.g. λmax values)")
    if not bool(torch.isfinite(lam).all()):
        raise ValueError("lam contains NaN or Inf")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha >= 0:
        raise ValueError(f"alpha must be a number >= 0, got {alpha!r}")
    lam = lam.double().cpu()
    if policy == "positive":
        return lam > 0, 0.0
    if policy in ("mean", "random"):
        tau = alpha * lam.mean().item()
        active = lam > tau
        if policy == "random":
            free = torch.ones(lam.numel(), dtype=torch.bool) if eligible is None else eligible.bool().cpu()
            count = int((active & free).sum())
            idx = free.nonzero().flatten()
            active = torch.zeros(lam.numel(), dtype=torch.bool)
            active[idx[torch.randperm(idx.numel(), generator=generator)[:count]]] = True
        return active, tau
    if policy == "max":
        tau = alpha * lam.max().item()
    elif policy == "quantile":
        if not isinstance(q, (int, float)) or not 0.0 <= q <= 1.0:
            raise ValueError(f"q must be in [0, 1], got {q!r}")
        tau = torch.quantile(lam, q).item()
    elif policy == "top_k":
        if not isinstance(k, int) or not 1 <= k <= lam.numel():
            raise ValueError(f"k must be an int in [1, {lam.numel()}], got {k!r}")
        order = torch.sort(lam, descending=True, stable=True).indices
        active = torch.zeros(lam.numel(), dtype=torch.bool)
        active[order[:k]] = True
        return active, lam[order[k - 1]].item()
    else:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    return lam > tau, tau


@dataclass
class TemporalRule:
    """Per-module state of the temporal rule. ``update(λ)`` after each measurement returns the converged mask.

    ``patience``: consecutive measurements with a step ratio below ``beta`` needed to declare a module converged.
    """

    beta: float = 1e-3
    patience: int = 1
    lam0: torch.Tensor | None = None
    delta1: torch.Tensor | None = None
    delta_prev: torch.Tensor | None = None
    converged: torch.Tensor | None = None
    streak: torch.Tensor | None = None
    measurements: int = 0
    history: list = field(default_factory=list)

    def __post_init__(self):
        if not isinstance(self.beta, (int, float)) or isinstance(self.beta, bool) or not self.beta >= 0:
            raise ValueError(f"beta must be a number >= 0, got {self.beta!r}")
        if not isinstance(self.patience, int) or isinstance(self.patience, bool) or self.patience < 1:
            raise ValueError(f"patience must be an int >= 1, got {self.patience!r}")

    def update(self, lam: torch.Tensor) -> torch.Tensor:
        lam = lam.detach().double().cpu()
        if self.lam0 is not None and lam.shape != self.lam0.shape:
            raise ValueError(f"λ has {lam.numel()} modules, the rule was started with {self.lam0.numel()}")
        self.measurements += 1
        if self.lam0 is None:
            self.lam0 = lam.clone()
            self.converged = torch.zeros(lam.numel(), dtype=torch.bool)
            self.streak = torch.zeros(lam.numel(), dtype=torch.long)
            self.delta_prev = torch.zeros_like(lam)
            return self.converged.clone()
        delta = (lam - self.lam0).abs()
        if self.delta1 is None:
            self.delta1 = delta.clone()
        else:
            defined = self.delta1 > 0
            ratio = torch.where(defined, (delta - self.delta_prev).abs() / self.delta1.clamp_min(1e-300),
                                torch.full_like(delta, float("inf")))
            small = ratio < self.beta
            self.streak = torch.where(small, self.streak + 1, torch.zeros_like(self.streak))
            self.converged |= self.streak >= self.patience
        self.delta_prev = delta
        return self.converged.clone()

    def state_dict(self) -> dict:
        return {"beta": self.beta, "patience": self.patience, "lam0": self.lam0, "delta1": self.delta1,
                "delta_prev": self.delta_prev, "converged": self.converged, "streak": self.streak,
                "measurements": self.measurements}

    def load_state_dict(self, sd: dict) -> None:
        for key in ("beta", "lam0", "delta1", "delta_prev", "converged", "measurements"):
            setattr(self, key, sd[key])
        self.patience = sd.get("patience", 1)
        self.streak = sd.get("streak")
        if self.streak is None and self.lam0 is not None:
            self.streak = self.converged.long()


def check_number(name: str, value, *, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
                 hi_open: bool = False) -> float:
    """``value`` as a float if it is a finite number within the bounds, else ``ValueError`` naming ``name``."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {value!r}")
    if hi is not None and (value > hi or (hi_open and value == hi)):
        raise ValueError(f"{name} must be {'<' if hi_open else '<='} {hi}, got {value!r}")
    return float(value)
