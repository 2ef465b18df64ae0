"""MAT decisions from measured λmax: the threshold policies and the temporal convergence rule.

Pure functions and one small state object, no model: the controller (:mod:`mat_kernels.mat`) calls them after
each measurement. Defaults and their provenance are in PAPER.md: the dynamic threshold is the paper's idea [V];
α·mean with α = 1 and the other policies are our choices [D]; the temporal rule comes from a third-party reading of
MAT [D].

Threshold policies (``active = λ > τ`` unless stated):

==============  ============================================================
``"mean"``      τ = α · mean_m λ_m (default, α = 1)
``"max"``       τ = α · max_m λ_m (α < 1)
``"quantile"``  τ = the q-quantile of λ (``q`` in [0, 1])
``"top_k"``     the k modules of largest λ are active (ties broken by index)
==============  ============================================================

Temporal rule, per module m, with λ_0 its first measurement and Δ_t = |λ_t − λ_0|: once
``|Δ_t − Δ_{t−1}| / |Δ_1| < β`` (β = 1e-3) module m is *converged* and frozen for good. Δ_1 = 0 (λ did not move at
the second measurement) makes the ratio undefined: such a module is not declared converged by the rule.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["threshold_mask", "TemporalRule", "POLICIES"]

POLICIES = ("mean", "max", "quantile", "top_k")


def threshold_mask(lam: torch.Tensor, policy: str = "mean", *, alpha: float = 1.0, q: float = 0.5,
                   k: int | None = None) -> tuple[torch.Tensor, float]:
    """``(active bool [M], threshold)`` for λ values ``[M]`` under ``policy`` (see the module docstring).

    For ``top_k`` the returned threshold is the k-th largest λ (informational).
    """
    if not isinstance(lam, torch.Tensor) or lam.dim() != 1 or lam.numel() == 0:
        raise ValueError("lam must be a non-empty 1-D tensor of λmax values")
    if not bool(torch.isfinite(lam).all()):
        raise ValueError("lam contains NaN or Inf")
    lam = lam.double()
    if policy == "mean":
        tau = alpha * lam.mean().item()
    elif policy == "max":
        tau = alpha * lam.max().item()
    elif policy == "quantile":
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"q must be in [0, 1], got {q}")
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
    return (lam > tau).cpu(), tau


@dataclass
class TemporalRule:
    """Per-module state of the temporal rule. ``update(λ)`` after each measurement returns the converged mask."""

    beta: float = 1e-3
    lam0: torch.Tensor | None = None
    delta1: torch.Tensor | None = None
    delta_prev: torch.Tensor | None = None
    converged: torch.Tensor | None = None
    measurements: int = 0
    history: list = field(default_factory=list)

    def update(self, lam: torch.Tensor) -> torch.Tensor:
        lam = lam.detach().double().cpu()
        if self.lam0 is not None and lam.shape != self.lam0.shape:
            raise ValueError(f"λ has {lam.numel()} modules, the rule was started with {self.lam0.numel()}")
        self.measurements += 1
        if self.lam0 is None:
            self.lam0 = lam.clone()
            self.converged = torch.zeros(lam.numel(), dtype=torch.bool)
            self.delta_prev = torch.zeros_like(lam)
            return self.converged.clone()
        delta = (lam - self.lam0).abs()
        if self.delta1 is None:
            self.delta1 = delta.clone()
        else:
            defined = self.delta1 > 0
            ratio = torch.where(defined, (delta - self.delta_prev).abs() / self.delta1.clamp_min(1e-300),
                                torch.full_like(delta, float("inf")))
            self.converged |= ratio < self.beta
        self.delta_prev = delta
        return self.converged.clone()

    def state_dict(self) -> dict:
        return {"beta": self.beta, "lam0": self.lam0, "delta1": self.delta1, "delta_prev": self.delta_prev,
                "converged": self.converged, "measurements": self.measurements}

    def load_state_dict(self, sd: dict) -> None:
        for key in ("beta", "lam0", "delta1", "delta_prev", "converged", "measurements"):
            setattr(self, key, sd[key])
