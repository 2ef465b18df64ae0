"""FLOPs accounting for MAT and dense training: forward, dX, the dW actually executed, and λmax measurement.

Convention (PAPER.md [D]): FLOPs = 2 × multiply-adds of the matrix products (what
``torch.utils.flop_counter.FlopCounterMode`` counts: mm, addmm, bmm, convolutions, attention kernels); elementwise
work is not counted.

* A training step is counted by ``FlopCounterMode`` on a real forward and backward. The sparse weight-gradient op
  ``mat_kernels::sparse_weight_grad`` is taught to the counter (:func:`register_sparse_flop_formulas`): it counts
  the GEMMs of the *active* blocks only, so a MAT step's count is what was executed. Counting slows a step, so
  :class:`StepFlops` counts the first step of each (input shapes, active masks) signature and reuses the number
  while neither changes (masks change only at measurements).
* λmax measurement: the probe's forward and backward are counted by ``FlopCounterMode`` too; the Gram kernels (Triton
  or the PyTorch fallback behind a custom op, invisible to the counter) add ``2 × route_costs`` multiply-adds of
  the route each layer used (:attr:`mat_kernels.capture.LambdaCapture.gram_flops`), and ``eigvalsh`` adds
  ``(4/3)·n³`` per module (an estimate; negligible at n ≤ 64).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

__all__ = ["register_sparse_flop_formulas", "count_flops", "StepFlops", "FlopsLedger", "linear_step_flops"]

_REGISTERED = [False]


def register_sparse_flop_formulas() -> bool:
    """Teach ``FlopCounterMode`` the sparse weight-gradient ops (2·T·|active rows|·d_in, or the column analogue).
    Returns False when the extension is not built (nothing to register). Idempotent."""
    if _REGISTERED[0]:
        return True
    from .ops import sparse_update as ops

    if not ops.extension_available():
        return False
    targets = [torch.ops.mat_kernels.sparse_weight_grad, torch.ops.mat_kernels.sparse_weight_grad_accumulate]

    def active_width(active, sizes, owners):
        act = active.bool().tolist() if isinstance(active, torch.Tensor) else list(active)
        return sum(s for s, o in zip(sizes, owners) if act[o])

    @register_flop_formula(targets[0], get_raw=True)
    def _wg(dy, x, active, starts, sizes, owners, axis, *args, out_val=None, **kwargs):
        tokens = dy.numel() // dy.shape[-1]
        d_out, d_in = dy.shape[-1], x.shape[-1]
        w = active_width(active, sizes, owners)
        return 2 * tokens * (w * d_in if axis == 0 else d_out * w)

    @register_flop_formula(targets[1], get_raw=True)
    def _wga(grad_weight, dy, x, active, starts, sizes, owners, axis, *args, out_val=None, **kwargs):
        return _wg(dy, x, active, starts, sizes, owners, axis)

    _REGISTERED[0] = True
    return True


def count_flops(fn, *args, **kwargs) -> tuple[int, object]:
    """``(FLOPs, fn's result)`` of one call under ``FlopCounterMode`` (sparse ops included when built)."""
    register_sparse_flop_formulas()
    mode = FlopCounterMode(display=False)
    with mode:
        out = fn(*args, **kwargs)
    return int(mode.get_total_flops()), out


def linear_step_flops(tokens: int, d_in: int, d_out: int, active_fraction: float = 1.0) -> int:
    """Analytic FLOPs of one linear layer in a training step: forward + dX + the executed share of dW."""
    one = 2 * tokens * d_in * d_out
    return int(one + one + active_fraction * one)


class StepFlops:
    """Count a training step's FLOPs once per (input shapes, masks) signature; reuse while it stays the same."""

    def __init__(self):
        self._cache: dict = {}
        self.counted_steps = 0

    def __call__(self, key, fn, *args, **kwargs):
        """Run ``fn`` (the step); returns ``(FLOPs, result)``. ``key``: hashable signature of what changes FLOPs."""
        if key in self._cache:
            return self._cache[key], fn(*args, **kwargs)
        flops, out = count_flops(fn, *args, **kwargs)
        self._cache[key] = flops
        self.counted_steps += 1
        return flops, out


@dataclass
class FlopsLedger:
    """Per-step and cumulative FLOPs of a run: training steps and λmax measurements, kept apart."""

    train: list = field(default_factory=list)
    measure: list = field(default_factory=list)  # (step, FLOPs)

    def add_step(self, flops: int) -> None:
        self.train.append(int(flops))

    def add_measurement(self, step: int, flops: int) -> None:
        self.measure.append((step, int(flops)))

    def total(self, upto_step: int | None = None) -> int:
        """Training + measurement FLOPs of steps ``< upto_step`` (all when None)."""
        k = len(self.train) if upto_step is None else upto_step
        return sum(self.train[:k]) + sum(f for s, f in self.measure if upto_step is None or s < upto_step)

    def measurement_share(self) -> float:
        tot = self.total()
        return sum(f for _, f in self.measure) / tot if tot else 0.0
