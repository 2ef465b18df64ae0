"""MAT's decision after each measurement (:class:`DecidingMixin`, a part of :class:`mat_kernels.MAT`): scores
averaged over ranks, smoothed, thresholded per group with hysteresis, the temporal rule, the controls (``shuffle``,
``fixed``), the masks pushed into the layers and the log entry."""
from __future__ import annotations

import torch

from mat_kernels.measure.specs import ModuleSpec
from mat_kernels.train.policy import CONTROLS, layer_of, shuffle_within, threshold_mask

__all__ = ["DecidingMixin", "layer_groups"]


class DecidingMixin:
    """The decision step of :class:`mat_kernels.MAT` (its state lives on the controller)."""

    def _decide(self, measured) -> None:
        if isinstance(measured, torch.Tensor):  # λ given directly (tests, external measurements)
            lam = score = measured.double().cpu()
        else:
            lam, score = measured.values.double().cpu(), measured.scores
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            dev = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
            t = torch.stack([lam, score]).to(dev)
            torch.distributed.all_reduce(t)
            lam, score = (t.cpu() / torch.distributed.get_world_size()).unbind(0)
        self.measurements += 1
        if self.smoothing and self._smoothed is not None:
            score = self.smoothing * self._smoothed + (1 - self.smoothing) * score
        self._smoothed = score.clone()
        if self.rule is not None:
            self.converged = self.rule.update(lam)
        thr, tau = torch.ones_like(self.active), {}
        gating = self.measurements >= self.gate_after
        if gating:
            pol = dict(self.policy)
            if pol["policy"] in CONTROLS:  # the controls start from the mean rule's decision
                pol["policy"] = "mean"
            for kind, idx in self.groups.items():
                k = pol["k"]
                if k is not None:  # top-k per group: the same share of each group
                    k = max(1, round(k * len(idx) / len(self.specs)))
                s = score[idx]
                if pol["policy"] == "random":  # as many as the mean rule keeps, among modules not converged
                    thr[idx], tau[kind] = threshold_mask(s, "random", alpha=pol["alpha"], generator=self._rng,
                                                         eligible=~self.converged[idx])
                    continue
                thr[idx], tau[kind] = threshold_mask(s, pol["policy"], alpha=pol["alpha"], q=pol["q"], k=k)
                if self.hysteresis and self.measurements > self.gate_after:
                    was = self.active[idx]
                    h = self.hysteresis
                    thr[idx] = torch.where(was, s > tau[kind] * (1 - h), s > tau[kind] * (1 + h))
        self.active = thr & ~self.converged
        if gating and self.policy["policy"] == "shuffle":
            self.active = shuffle_within(self.active, self._layer_kind, self._rng, eligible=~self.converged)
        elif gating and self.policy["policy"] == "fixed":
            if self._fixed is None:
                self._fixed = self.active.clone()
            self.active = self._fixed.clone()
        if self._perm is not None:
            self._perm.arrange(self.active)
        self._apply_masks()
        empty = [kind for kind, idx in self.groups.items() if not bool(self.active[idx].any())]
        self.log.append({"step": self.step_count, "lambda": lam.tolist(), "score": score.tolist(),
                         "threshold": tau, "active": self.active.tolist(), "converged": self.converged.tolist(),
                         "empty_kinds": empty})
        if self.stop_when_converged and bool(self.converged.all()):
            self.should_stop = True


def layer_groups(specs: list[ModuleSpec]) -> list[str]:
    """Group key of each module for ``group_by="layer"``: its kind within its layer (the name up to the module's
    own part: ``layers.3`` for ``layers.3.head1`` and ``layers.3.head1.out``), or its kind alone when that kind
    has one module per layer (an FFN block, a conv): a group of one could never pass a threshold set by itself."""
    keys = [f"{s.kind}@{layer_of(s.name)}" for s in specs]
    return [k if keys.count(k) > 1 else s.kind for k, s in zip(keys, specs)]
