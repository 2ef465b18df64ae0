"""MAT's measurements (:class:`MeasuringMixin`, a part of :class:`mat_kernels.MAT`): the schedule, the capture of a
training step's own backward (:meth:`~MeasuringMixin.measure_step`), probe measurements
(:meth:`~MeasuringMixin.measure`, with a held-out probe in the same pass), the scores and the ledger entries."""
from __future__ import annotations

import contextlib
import time

import torch

from mat_kernels.measure.capture import MICRO_BATCHES, capture_lambda_max
from mat_kernels.measure.forward import batch_size, concat_batches
from mat_kernels.measure.layer import GramOptions
from mat_kernels.measure.model import model_lambda_max
from mat_kernels.measure.result import LambdaMaxResult
from mat_kernels.train.policy import module_scores

__all__ = ["MeasuringMixin"]


class MeasuringMixin:
    """The measurement steps of :class:`mat_kernels.MAT` (its state lives on the controller)."""

    @property
    def measurement_pending(self) -> bool:
        """Whether this step's training backward was captured and awaits :meth:`step` (which takes it)."""
        return self._captured is not None

    def measuring_now(self) -> bool:
        """Whether the step about to run measures (counted by :meth:`step`)."""
        s = self.step_count - self.warmup_steps
        return s >= 0 and s % self.interval == 0 and not self.should_stop

    def flops_key(self) -> tuple:
        """What determines the FLOPs of the next training step besides the input shapes: the masks, and whether
        it measures from its own backward (which then runs exactly). Key of
        :meth:`mat_kernels.train.flops.FlopsLedger.count_step`."""
        return (tuple(self.active.tolist()), self.probe is None and self.measuring_now())

    @contextlib.contextmanager
    def measure_step(self, *, loss_scale: float | str, micro_batches: str = "first"):
        """Context for one optimizer step's forwards and backwards. When this step measures from the training
        backward (``probe=None``), the module Grams are captured from it (the step then runs the exact backward,
        eagerly under ``torch.compile``); otherwise it does nothing. ``loss = loss_scale · Σ_i s_i`` over all the
        step's samples (``1/n`` for a mean over the n samples; ``1/(n·k)`` for k accumulated micro-batches of n;
        ``"mean"`` says that and lets the capture count n and k)::

            with mat.measure_step(loss_scale=1 / n):
                loss = criterion(model(x), y)
                mat.backward(loss)                  # under a GradScaler: mat.backward(scaler.scale(loss))
            mat.step()                              # and mat.step(scaler=scaler)

        Several forwards and backwards inside the context are micro-batches of one step (gradient accumulation,
        equal sizes): ``micro_batches="first"`` measures the first one's samples (no extra memory), ``"all"`` the
        Gram over all of them (holds every captured layer's input and output gradient until the end of the step).
        The measurement is taken (λ, the decision, the ledger) by the :meth:`step` that follows, and dropped if a
        ``GradScaler`` skips that step."""
        if micro_batches not in MICRO_BATCHES:
            raise ValueError(f"micro_batches must be one of {MICRO_BATCHES}, got {micro_batches!r}")
        if self.probe is not None or not self.measuring_now():
            yield
            return
        self._in_measure = True
        self._captured = None
        # NaN/Inf is checked when step() takes the measurement: a GradScaler's overflowing step is dropped there
        options = GramOptions.of(self.gram_options, check_finite=False)
        try:
            # a compiled model runs this step eagerly: the capture's hooks would otherwise be traced and guarded on
            # (one recompilation per measurement); the compiled graphs are used again from the next step on
            # (the capture runs every sparse layer and gate exactly: gradients through frozen blocks, active dW)
            with torch.compiler.set_stance("force_eager"):
                with capture_lambda_max(self.module, self.specs, loss_scale=loss_scale, micro_batches=micro_batches,
                                        options=options) as cap:
                    yield
            t0 = time.perf_counter()
            cap.check_complete()
            grams = cap.module_grams()
            self._captured = (cap, grams, cap.gram_seconds + time.perf_counter() - t0)
        finally:
            self._in_measure = False

    def _take_capture(self, scale: float) -> LambdaMaxResult:
        """The measurement of this step's training backward, its loss unscaled by ``scale`` (a GradScaler's)."""
        cap, grams, seconds = self._captured
        self._captured = None
        t0 = time.perf_counter()
        if scale != 1.0:
            grams = grams / scale ** 2
        if self.gram_options.check_finite and not bool(torch.isfinite(grams).all()):
            raise ValueError("the Grams of this measuring step hold NaN/Inf: its loss or output gradients are not "
                             "finite (under fp16 loss scaling, pass the GradScaler: mat.step(scaler=scaler))")
        res = self._scores(grams, backend=cap.backend, output="loss")
        # the Grams ran inside the training backward: a loop that counts its steps (FlopsLedger.count_step with
        # base_key) counted them there, as this measurement's, with the exact backward's extra; eigvalsh is
        # invisible to FlopCounterMode
        self.ledger.add_measurement(self.step_count, self._solve_flops(cap.n), seconds + time.perf_counter() - t0)
        return res

    def _solve_flops(self, n: int) -> int:
        """FLOPs of scoring, which ``FlopCounterMode`` cannot see: the eigen-solves (λmax is logged whatever the
        criterion) and the criterion's sums (:func:`mat_kernels.train.policy.criterion_flops`)."""
        from mat_kernels.train.policy import criterion_flops

        return criterion_flops(self.criterion, len(self.specs), n, with_lambda=True, n_lambda=self._n_train)

    def _scores(self, grams: torch.Tensor, **fields) -> LambdaMaxResult:
        from mat_kernels.measure.solvers import lambda_max

        if self._perm is not None:  # measured per place: back to the modules' order
            grams = self._perm.to_identity(grams)
        n = self._n_train
        train = grams if n is None else grams[:, :n, :n]  # λ (the logs) over the training probe
        lam = lambda_max(train, check_finite=self.gram_options.check_finite)
        score = module_scores(grams, self.criterion, lam=lam.double().cpu(), n_train=n)
        return LambdaMaxResult(tuple(self.names), lam, grams, grams.shape[-1], "mat", specs=self.specs, scores=score,
                               **fields)

    def measure(self) -> LambdaMaxResult:
        """Measure every module on the probe batch (eval mode, restored after; exact backward, no weight
        gradients): a :class:`mat_kernels.LambdaMaxResult` (``level="mat"``) whose ``scores`` (float64 ``[M]``)
        are what ``criterion`` thresholds. The measurement's FLOPs and seconds go to :attr:`ledger`."""
        from mat_kernels.train.flops import count_flops

        t0 = time.perf_counter()
        batch, labels = self.probe(self.step_count) if callable(self.probe) else self.probe
        self._n_train = None
        if self.heldout is not None:  # the training probe's samples first, then the held-out probe's, in one pass
            ho_batch, ho_labels = self.heldout(self.step_count) if callable(self.heldout) else self.heldout
            self._n_train = batch_size(batch)
            batch, labels = concat_batches(batch, ho_batch), concat_batches(labels, ho_labels)
        was = [(m, m.training) for m in self.module.modules()]
        self.module.eval()
        try:
            # the capture runs every sparse layer and gate exactly, with no weight gradients
            counted, res = count_flops(model_lambda_max, self.module, batch, labels=labels, specs=self.specs,
                                       return_grams=True, options=self.gram_options,
                                       **{"output": self.output, **self._model_kwargs})
        finally:
            for m, t in was:
                m.train(t)
        out = self._scores(res.grams, backend=res.backend, output=res.output)
        # counted: the probe's forward and backward and the Grams (the formula of mat_kernels::segment_grams);
        # eigvalsh is invisible to FlopCounterMode
        self.ledger.add_measurement(self.step_count, counted + self._solve_flops(res.n), time.perf_counter() - t0)
        return out
