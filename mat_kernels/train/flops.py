"""FLOPs accounting for MAT and dense training: forward, dX, the dW actually executed, and λmax measurement.

Convention (docs/paper.md [D]): FLOPs = 2 × multiply-adds of the matrix products (what
``torch.utils.flop_counter.FlopCounterMode`` counts: mm, addmm, bmm, convolutions, attention kernels); elementwise
work is not counted.

* A training step is counted by ``FlopCounterMode`` on a real forward and backward. The sparse ops
  (``mat_kernels::sparse_weight_grad``, ...) are taught to the counter when they load: they count
  the GEMMs of the *active* blocks only, so a MAT step's count is what was executed. Counting slows a step, so
  :class:`StepFlops` counts the first step of each (input shapes, active masks) signature and reuses the number
  while neither changes (masks change only at measurements).
* λmax measurement: the probe's forward and backward are counted by ``FlopCounterMode`` too, and so are the Grams:
  ``mat_kernels::segment_grams`` (Triton or PyTorch behind the custom op) registers a FLOP formula, 2 × the
  multiply-adds of the route that ran (:func:`mat_kernels.route_costs`, the Gram dispatcher's cost), and the sketch's
  projection is a GEMM the counter sees. Only the scoring, invisible to the counter, is added by
  :class:`mat_kernels.MAT`: ``eigvalsh`` ``(4/3)·n³`` and the criterion's sums ``n²`` per module
  (:func:`mat_kernels.train.policy.criterion_flops`; an estimate, negligible at n ≤ 64).
"""
from __future__ import annotations

import statistics

from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_flops", "StepFlops", "FlopsLedger", "linear_step_flops"]


def count_flops(fn, *args, **kwargs) -> tuple[int, object]:
    """``(FLOPs, fn's result)`` of one call under ``FlopCounterMode`` (sparse ops included when built)."""
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


class FlopsLedger:
    """The FLOPs and seconds of one training run, training steps and λ measurements kept apart.

    One ledger per run, shared by the training loop and :class:`mat_kernels.MAT` (``MAT(..., ledger=)``; MAT makes
    one otherwise, :attr:`mat_kernels.MAT.ledger`):

    * the loop runs each step's forward and backward through :meth:`count_step` (FLOPs counted by
      ``FlopCounterMode`` once per signature ``key``, e.g. ``(input shape, mat.flops_key())``, and reused) and adds
      the step's wall time with :meth:`add_seconds` (measurement included);
    * MAT adds each measurement with :meth:`add_measurement`: the probe's forward, backward and Grams as counted,
      plus the scoring the counter cannot see (eigen-solves, the criterion's sums), and the seconds it took. A step
      that measures from its own backward (``probe=None``) builds the Grams inside it and runs an exact backward;
      what that costs beyond the same step's usual FLOPs (Grams included) is added to the measurement by
      :meth:`count_step` when given the usual step's key as ``base_key``, and MAT adds the scoring.

    Totals: :meth:`total` (FLOPs up to a step, measurements included), :meth:`seconds`, the measurement's shares.
    """

    def __init__(self):
        self.train: list[int] = []                       # FLOPs of each training step (forward + backward)
        self.train_seconds: list[float] = []             # wall seconds of each step (measurement included)
        self.measure: list[tuple[int, int]] = []         # (step, FLOPs) of each measurement
        self.measure_seconds: list[tuple[int, float]] = []
        self.keys: list = []                             # the signature of each step (count_step's key)
        self._counter = StepFlops()

    # ----------------------------------------------------------------------------------------------- recording
    def count_step(self, key, fn, *args, base_key=None, **kwargs):
        """Run ``fn(*args, **kwargs)`` (a step's forward and backward) and record its FLOPs, counted under
        ``FlopCounterMode`` the first time ``key`` is seen and reused after. ``base_key``: the key the same step
        has when it does not measure; the difference (if both are known) is recorded as measurement FLOPs.
        Returns ``fn``'s result."""
        flops, out = self._counter(key, fn, *args, **kwargs)
        self.train.append(int(flops))
        self.keys.append(key if base_key is None else base_key)
        if base_key is not None and base_key != key and base_key in self._counter._cache:
            extra = int(flops) - int(self._counter._cache[base_key])
            if extra > 0:
                self.train[-1] -= extra
                self.measure.append((len(self.train) - 1, extra))
        return out

    def add_step(self, flops: int, seconds: float | None = None) -> None:
        """Record a step's FLOPs (counted elsewhere) and optionally its seconds."""
        self.train.append(int(flops))
        self.keys.append(None)
        if seconds is not None:
            self.add_seconds(seconds)

    def add_seconds(self, seconds: float) -> None:
        """Record the wall time of the latest step (its forward, backward, optimizer step and measurement)."""
        self.train_seconds.append(float(seconds))

    def add_measurement(self, step: int, flops: int, seconds: float = 0.0) -> None:
        """Record a measurement made at ``step``: its FLOPs and seconds."""
        self.measure.append((int(step), int(flops)))
        self.measure_seconds.append((int(step), float(seconds)))

    # ----------------------------------------------------------------------------------------------- totals
    def total(self, upto_step: int | None = None) -> int:
        """Training + measurement FLOPs of steps ``< upto_step`` (all when None)."""
        k = len(self.train) if upto_step is None else upto_step
        return sum(self.train[:k]) + sum(f for s, f in self.measure if upto_step is None or s < upto_step)

    def measurement_flops(self, upto_step: int | None = None) -> int:
        return sum(f for s, f in self.measure if upto_step is None or s < upto_step)

    def seconds(self, upto_step: int | None = None) -> float:
        """Wall seconds of steps ``< upto_step`` (all when None), measurements included."""
        return sum(self.train_seconds[: len(self.train_seconds) if upto_step is None else upto_step])

    def measurement_seconds(self, upto_step: int | None = None) -> float:
        return sum(t for s, t in self.measure_seconds if upto_step is None or s < upto_step)

    def table_seconds(self, upto_step: int | None = None) -> float:
        """Seconds charged by table rather than by the clock: each step costs the median of the training time
        (its wall time less its measurement's) of all steps with its signature (its active set: ``count_step``'s
        key, a measuring step's usual key), plus the measurements' own seconds. The noise of single steps cancels
        within a signature; what differs between active sets stays. Steps recorded without a key (``add_step``)
        are charged their own time."""
        k = len(self.train_seconds) if upto_step is None else min(upto_step, len(self.train_seconds))
        measured = {}
        for s, t in self.measure_seconds:
            measured[s] = measured.get(s, 0.0) + t
        pure = [max(0.0, t - measured.get(i, 0.0)) for i, t in enumerate(self.train_seconds)]
        keys = self.keys + [None] * (len(pure) - len(self.keys))
        by_key: dict = {}
        for key, t in zip(keys, pure):
            if key is not None:
                by_key.setdefault(key, []).append(t)
        median = {key: statistics.median(ts) for key, ts in by_key.items()}
        train = sum(median[key] if key is not None else t for key, t in zip(keys[:k], pure[:k]))
        return train + self.measurement_seconds(k)

    def measurement_share(self) -> float:
        """Measurement FLOPs / all FLOPs."""
        tot = self.total()
        return self.measurement_flops() / tot if tot else 0.0

    def measurement_time_share(self) -> float:
        """Measurement seconds / all seconds (0 when no step time was recorded)."""
        tot = self.seconds()
        return self.measurement_seconds() / tot if tot else 0.0

    @property
    def counted_steps(self) -> int:
        """How many steps were run under ``FlopCounterMode`` (one per new signature)."""
        return self._counter.counted_steps
