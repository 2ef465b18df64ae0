"""Lightning integration: MAT as one callback of a ``lightning.Trainer``.

::

    from mat_kernels.integrations.lightning import MATCallback

    trainer = lightning.Trainer(callbacks=[MATCallback(interval=50)], precision="bf16-mixed",
                                accumulate_grad_batches=2)
    trainer.fit(module, loader)            # module.mat: the MAT controller (log, ledger, report())

``lightning`` is an optional dependency: this module imports it (``import mat_kernels`` never does). What happens
where in Lightning's loop, checkpoints and what is refused: ``docs/lightning.md``.
"""
from __future__ import annotations

import contextlib

import torch

from mat_kernels.integrations.hf_optimizer import MATOptimizer
from mat_kernels.measure.capture import MICRO_BATCHES
from mat_kernels.train.controller import MAT

try:
    import lightning.pytorch as pl
except ImportError as e:  # pragma: no cover - the tests skip without lightning
    raise ImportError("mat_kernels.integrations.lightning needs `lightning` (pip install lightning)") from e

__all__ = ["MATCallback", "SUPPORTED_PRECISION"]

# Lightning precisions MAT trains under: fp32, autocast (with a GradScaler for 16-mixed), and 16-bit weights
SUPPORTED_PRECISION = ("32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "16-true")


class _LightningMATOptimizer(MATOptimizer):
    """The optimizer Lightning steps: runs Lightning's closure (training step, backward, ``on_before_optimizer_step``,
    where the callback closes a measuring step), then :meth:`MAT.step`. Under ``16-mixed`` Lightning's GradScaler
    calls it only for finite gradients; the measurement is unscaled by that scaler's scale."""

    def __init__(self, mat: MAT, callback: "MATCallback"):
        super().__init__(mat)
        self.callback = callback

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.callback._close_measure_step()
        scaler = self.callback._scaler()
        scale = scaler.get_scale() if scaler is not None and self.mat.measurement_pending else None
        with torch.enable_grad():  # a probe measurement runs a forward and backward
            self.mat.step(grad_scale=scale)
        return loss


class MATCallback(pl.Callback):
    """MAT for a ``lightning.Trainer`` (automatic optimization; one optimizer: SGD, Adam or AdamW).

    ``on_fit_start`` builds :class:`mat_kernels.MAT` on the LightningModule and its optimizer and puts a wrapper in
    the trainer's optimizer list whose ``step`` is :meth:`MAT.step` (LR schedulers keep working: they see the same
    param groups). With ``probe=None`` (default) λ is measured from the training backward: a measuring step's
    micro-batches (``accumulate_grad_batches``) run inside :meth:`MAT.measure_step`, opened at the step's first
    ``on_train_batch_start`` and closed at ``on_before_optimizer_step``. MAT's state is saved in and restored from
    the checkpoint with the optimizer state. The controller is ``callback.mat`` and ``module.mat``.

    Args:
        probe: ``None`` (training backward), ``(batch, labels)`` or ``probe(step) -> (batch, labels)``: see
            :class:`mat_kernels.MAT`.
        loss_scale: ``loss = loss_scale · Σ_i s_i`` of a step's training loss (``probe=None``); ``"mean"``
            (default): ``training_step`` returns the mean over its batch (Lightning divides by
            ``accumulate_grad_batches`` itself).
        micro_batches: the Gram of an accumulating step: ``"first"`` micro-batch (default) or ``"all"``
            (:func:`mat_kernels.capture_lambda_max`).
        **mat_kwargs: :class:`mat_kernels.MAT` keywords (``interval``, ``warmup_steps``, ``policy``, ...). Steps are
            optimizer steps.

    Raises:
        ValueError: bad ``micro_batches``; at ``fit``: manual optimization or a precision outside
            :data:`SUPPORTED_PRECISION` (``trainer.precision`` named). (Lightning itself refuses several
            optimizers under automatic optimization.)
        TypeError: an optimizer MAT cannot keep frozen slices in (not SGD, Adam or AdamW).
    """

    def __init__(self, *, probe=None, loss_scale: float | str = "mean", micro_batches: str = "first",
                 **mat_kwargs):
        if micro_batches not in MICRO_BATCHES:
            raise ValueError(f"micro_batches must be one of {MICRO_BATCHES}, got {micro_batches!r}")
        if "model" in mat_kwargs or "optimizer" in mat_kwargs:
            raise TypeError("MATCallback takes the model and optimizer from the Trainer")
        self.probe, self.loss_scale, self.micro_batches = probe, loss_scale, micro_batches
        self.mat_kwargs = mat_kwargs
        self.mat: MAT | None = None
        self._trainer = None
        self._ctx: contextlib.ExitStack | None = None

    # ------------------------------------------------------------------------------------------------ set-up
    def on_fit_start(self, trainer, pl_module) -> None:
        if not pl_module.automatic_optimization:
            raise ValueError("MATCallback: manual optimization (automatic_optimization=False) steps optimizers "
                             "itself; use mat_kernels.MAT in training_step instead")
        if str(trainer.precision) not in SUPPORTED_PRECISION:
            raise ValueError(f"MATCallback: trainer.precision={trainer.precision!r} is not supported; supported: "
                             f"{SUPPORTED_PRECISION} (the Gram kernels take fp32, bf16 and fp16)")
        (optimizer,) = trainer.optimizers
        if isinstance(optimizer, MATOptimizer):
            raise ValueError("MAT was already added to this trainer")
        self._trainer = trainer
        self.mat = MAT(pl_module, optimizer, probe=self.probe, **self.mat_kwargs)
        trainer.strategy.optimizers = [_LightningMATOptimizer(self.mat, self)]
        pl_module.mat = self.mat

    def on_fit_end(self, trainer, pl_module) -> None:
        self._close_measure_step()

    def on_exception(self, trainer, pl_module, exception) -> None:
        if self._ctx is not None:  # leave no capture hooks behind
            self._ctx.__exit__(type(exception), exception, exception.__traceback__)
            self._ctx = None

    def _scaler(self):
        scaler = getattr(self._trainer.precision_plugin, "scaler", None) if self._trainer is not None else None
        return scaler if scaler is not None and scaler.is_enabled() else None

    # ------------------------------------------------------------------------------------------------ steps
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.probe is None and self._ctx is None and self.mat.measuring_now():
            stack = contextlib.ExitStack()
            stack.enter_context(self.mat.measure_step(loss_scale=self.loss_scale, micro_batches=self.micro_batches))
            self._ctx = stack

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._close_measure_step()

    def _close_measure_step(self) -> None:
        if self._ctx is not None:
            ctx, self._ctx = self._ctx, None
            ctx.close()
