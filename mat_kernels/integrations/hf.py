"""Hugging Face ``Trainer`` integration: MAT with one extra line.

::

    import mat_kernels.integrations.hf

    trainer = transformers.Trainer(model=model, args=args, train_dataset=ds, data_collator=collator)
    trainer = mat_kernels.integrations.hf.with_mat(trainer, interval=50)  # the one extra line (MAT's keywords)
    trainer.train()
    trainer.mat.log                                              # one entry per measurement (step, λ, active set)

``transformers`` (and ``accelerate``, which the ``Trainer`` needs) stay optional: this module imports them only
inside functions, so ``import mat_kernels`` and ``import mat_kernels.integrations.hf`` never need them.

Details (where each MAT action happens, the probe batch, what is refused and why a function rather than a
callback): ``docs/hf_trainer.md``.
"""
from __future__ import annotations

import collections.abc
import contextlib
import itertools
import random
import time
import warnings
import weakref

import torch

from mat_kernels.integrations.hf_optimizer import MATOptimizer, to_device, unwrap_optimizer
from mat_kernels.measure.forward import default_forward
from mat_kernels.train.controller import MAT
from mat_kernels.train.optim import SUPPORTED_OPTIMIZERS

__all__ = ["with_mat", "MATOptimizer", "MATCallback"]

_PROBES = ("train", "eval")


def _transformers():
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - the tests need transformers
        raise ImportError("mat_kernels.integrations.hf needs `transformers` (and `accelerate` for its Trainer)") from e
    return transformers


@contextlib.contextmanager
def _without_accelerate_autocast(module):
    """Under ``bf16``/``fp16`` mixed precision accelerate replaces ``module.forward`` by an autocast wrapper (an
    instance attribute; the forward it wrapped is kept as ``module._original_forward``). λ is measured with that
    original forward, in the parameters' precision: the probe batch is measured on the weights, not on a training
    step, and fp32 GEMM inputs measure them more exactly (a measurement under autocast is supported too: it agrees
    with fp32 to ``mat_kernels.testing.tolerances.AUTOCAST_RTOL``)."""
    original = module.__dict__.get("_original_forward")  # (also keeps the module's own __call__ and hooks)
    patched = module.__dict__.get("forward")
    if original is None or patched is None:
        yield
        return
    module.forward = original
    try:
        yield
    finally:
        module.forward = patched


def _measure_forward(module, batch):
    """The forward of the measurements (``lambda_kwargs["forward"]`` unless given): the default one of
    :func:`mat_kernels.model_lambda_max`, without accelerate's autocast."""
    with _without_accelerate_autocast(module):
        return default_forward(module, batch)


@contextlib.contextmanager
def _fixed_rng(seed: int):
    """Run with the CPU torch, Python and NumPy RNGs seeded with ``seed``; restore their states afterwards (collators
    draw on the CPU; CUDA generators are not touched)."""
    py_state = random.getstate()
    try:
        import numpy as np
        np_state = np.random.get_state()
    except ImportError:  # pragma: no cover
        np = np_state = None
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        random.seed(seed)
        if np is not None:
            np.random.seed(seed % 2 ** 32)
        try:
            yield
        finally:
            random.setstate(py_state)
            if np is not None:
                np.random.set_state(np_state)


def _first_examples(dataloader, n: int) -> list:
    """The first ``n`` examples of a dataloader's dataset, in dataset order (the sampler is not touched)."""
    ds = dataloader.dataset
    if isinstance(ds, torch.utils.data.IterableDataset) or not hasattr(ds, "__len__"):
        return list(itertools.islice(iter(ds), n))
    return [ds[i] for i in range(min(n, len(ds)))]


# ----------------------------------------------------------------------------------------------------------------
# the callback
# ----------------------------------------------------------------------------------------------------------------
class MATCallback:
    """The Trainer callback of :func:`with_mat` (installed by it: do not add it yourself).

    ``on_train_begin``: checks that the Trainer steps MAT's optimizer and trains MAT's model, and collates the
    default probe batch. ``on_step_end``: stops training when ``stop_when_converged`` says so. The optimizer step,
    measurement and masks happen inside the Trainer's ``optimizer.step()`` (:class:`MATOptimizer`).

    A ``transformers.TrainerCallback`` by duck typing (every other ``on_*`` event is a no-op), so that importing
    this module does not import ``transformers``.
    """

    def __init__(self, *, probe="train", probe_size: int | None = None, probe_seed: int = 0, trainer=None,
                 count_flops: bool = False):
        self.mat: MAT | None = None  # set by with_mat once MAT is built (MAT takes this callback's probe)
        self.count_flops = count_flops
        self._t0: float | None = None
        self._mode = None  # the FlopCounterMode of the running step (count_flops=True)
        self._step_flops = 0
        self.optimizer: MATOptimizer | None = None
        self.probe_source = probe
        self.probe_size = probe_size
        self.probe_seed = probe_seed
        self._trainer = weakref.ref(trainer) if trainer is not None else (lambda: None)
        self._probe = None  # (batch, labels) on the model's device, once built

    def __getattr__(self, name):
        if name.startswith("on_"):  # events of TrainerCallback this callback does not use
            return _no_event
        raise AttributeError(name)

    # ------------------------------------------------------------------------------------------------ probe
    def probe(self, step: int):
        """The probe MAT measures on (its ``probe`` argument): ``(batch, labels)`` on the model's device."""
        src = self.probe_source
        if callable(src):
            batch, labels = src(step)
            return to_device(batch, self._device()), to_device(labels, self._device())
        if self._probe is None:
            if isinstance(src, str):
                raise RuntimeError("the default probe batch is collated when training starts (on_train_begin); "
                                   "call mat.measure() after trainer.train() has started, or pass probe=")
            batch, labels = src
            self._probe = (to_device(batch, self._device()), to_device(labels, self._device()))
        return self._probe

    def _device(self) -> torch.device:
        p = next(self.mat.module.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def _build_probe(self, args, train_dataloader) -> None:
        if self.probe_source == "train":
            if train_dataloader is None:
                raise RuntimeError("probe='train' needs the Trainer's train dataloader")
            dl, n = train_dataloader, self.probe_size or args.per_device_train_batch_size
        else:
            trainer = self._trainer()
            if trainer is None or trainer.eval_dataset is None:
                raise ValueError("probe='eval' needs an eval_dataset on the Trainer")
            if isinstance(trainer.eval_dataset, dict):
                raise ValueError("probe='eval' with several eval datasets: pass probe=(batch, labels)")
            dl, n = trainer.get_eval_dataloader(), self.probe_size or args.per_device_eval_batch_size
        with _fixed_rng(self.probe_seed):  # a random collator (MLM masking) gives the same batch in every run
            examples = _first_examples(dl, n)
            if not examples:
                raise ValueError(f"probe={self.probe_source!r}: the dataset is empty")
            batch = dl.collate_fn(examples) if dl.collate_fn is not None else examples
        if isinstance(batch, collections.abc.Mapping):
            batch = dict(batch)
        labels = batch.get("labels") if isinstance(batch, dict) else None
        if labels is None and self.mat.output != "projection":
            raise ValueError(
                f"probe={self.probe_source!r}: the collated batch has no 'labels' entry, which output="
                f"{self.mat.output!r} needs; pass probe=(batch, labels), or output='projection'")
        batch = to_device(batch, self._device())
        self._probe = (batch, batch.get("labels") if isinstance(batch, dict) else None)

    # ------------------------------------------------------------------------------------------------ events
    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        chain = unwrap_optimizer(optimizer)
        if not any(o is self.optimizer for o in chain):
            raise RuntimeError(
                "mat_kernels.integrations.hf: the Trainer steps an optimizer that MAT does not wrap "
                f"({' -> '.join(type(o).__name__ for o in chain) or None}); something replaced trainer.optimizer "
                "after with_mat() (model_init, hyperparameter_search, DeepSpeed or FSDP?)")
        if model is not None and model is not self.mat.module and getattr(model, "module", None) is not self.mat.module:
            raise RuntimeError("mat_kernels.integrations.hf: the Trainer trains another model than the one MAT was set "
                               "up on (was trainer.model replaced after with_mat()?)")
        if isinstance(self.probe_source, str) and self._probe is None:
            self._build_probe(args, train_dataloader)
        if state.global_step > 0 and self.mat.step_count == 0:
            warnings.warn(
                f"mat_kernels.integrations.hf: resuming at step {state.global_step} without MAT state (the checkpoint "
                "was made without MAT, or with save_only_model=True): MAT starts afresh, its schedule counted from "
                "here",
                UserWarning, stacklevel=2)

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_flops = 0
        if self.count_flops:
            from torch.utils.flop_counter import FlopCounterMode

            self._mode = FlopCounterMode(display=False)
            self._mode.__enter__()
        self._t0 = time.perf_counter()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        """The step's FLOPs are counted up to here: its forwards and backwards. The optimizer step (SGD, Adam,
        AdamW: no work the counter counts) holds MAT's measurement, which MAT puts in the ledger itself."""
        self._stop_counting()

    def _stop_counting(self) -> None:
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self._step_flops = int(self._mode.get_total_flops())
            self._mode = None

    def on_step_end(self, args, state, control, **kwargs):
        ledger = self.mat.ledger
        if self._t0 is not None:
            seconds = time.perf_counter() - self._t0
            self._stop_counting()  # already stopped before the optimizer step (on_pre_optimizer_step)
            ledger.add_step(self._step_flops, seconds)
            self._t0 = None
        if self.mat.should_stop:
            control.should_training_stop = True
        return control


def _no_event(*args, **kwargs):
    return None


# ----------------------------------------------------------------------------------------------------------------
# the one line
# ----------------------------------------------------------------------------------------------------------------
def _refuse_unsupported(trainer) -> None:
    from transformers.utils import is_sagemaker_mp_enabled

    why = None
    if getattr(trainer, "is_deepspeed_enabled", False):
        why = "DeepSpeed shards parameters and optimizer state and steps its own optimizer"
    elif getattr(trainer, "is_fsdp_enabled", False) or getattr(trainer, "is_fsdp_xla_enabled", False):
        why = "FSDP shards parameters and optimizer state (MAT freezes slices of whole parameters)"
    elif is_sagemaker_mp_enabled():
        why = "SageMaker model parallelism wraps the model and optimizer itself"
    elif trainer.args.n_gpu > 1:
        why = ("nn.DataParallel (several GPUs in one process) replicates the layers at every forward; launch with "
               "torchrun (DDP) instead")
    if why is None:
        try:
            from torch.distributed.tensor import DTensor
        except ImportError:  # pragma: no cover
            DTensor = ()
        if DTensor and any(isinstance(p, DTensor) for p in trainer.model.parameters()):
            why = "tensor-parallel (DTensor) parameters are sharded"
    if why is not None:
        raise NotImplementedError(f"mat_kernels.integrations.hf.with_mat: unsupported setup: {why}")
    if trainer.model_init is not None:
        raise ValueError("mat_kernels.integrations.hf.with_mat: the Trainer has a model_init, so train() builds a new "
                         "model and optimizer that MAT does not wrap; build the model and pass model= instead")


def with_mat(trainer, *, probe="train", probe_size: int | None = None, probe_seed: int = 0,
             count_flops: bool = False, **mat_kwargs):
    """Add MAT to a ``transformers.Trainer``, before ``trainer.train()``; returns the same trainer::

        trainer = mat_kernels.integrations.hf.with_mat(trainer, interval=50)

    The Trainer's own optimizer (``TrainingArguments.optim``: ``adamw_torch_fused``/``adamw_torch`` by default,
    ``sgd``, or one passed as ``optimizers=``) is created now if needed and wrapped so that frozen slices stay
    frozen; its LR scheduler keeps working. The controller is ``trainer.mat`` (``trainer.mat.log``,
    ``trainer.mat.report()``). Where each MAT action happens in the Trainer's loop, checkpoints and what is
    refused: docs/hf_trainer.md.

    Args:
        trainer: a ``transformers.Trainer`` (or subclass) that has not trained yet.
        probe: ``"train"`` (default: the first ``probe_size`` examples of the train dataset, collated as for
            training), ``"eval"`` (the same from ``eval_dataset``), ``(batch, labels)`` or a callable
            ``probe(step) -> (batch, labels)``; tensors are moved to the model's device. ``None`` (measuring from
            the training backward) is not supported here.
        probe_size: examples in the default probe batch (default: the per-device batch size).
        probe_seed: seed under which the default probe batch is collated (random collators).
        count_flops: also count every training step's FLOPs (``FlopCounterMode`` from the step's first forward to
            its optimizer step, which slows small models) into ``trainer.mat.ledger``
            (:class:`mat_kernels.train.flops.FlopsLedger`). Step seconds and every measurement's FLOPs and seconds
            (made inside the optimizer step, so never counted twice) are recorded there in any case.
        **mat_kwargs: :class:`mat_kernels.MAT` keywords (``interval``, ``warmup_steps``, ``policy``, ``alpha``,
            ``output``, ``group_by``, ``stop_when_converged``, ``lambda_kwargs``, ``specs``...). Steps are
            optimizer steps.

    Returns:
        ``trainer``, with ``trainer.mat`` (the :class:`mat_kernels.MAT`), ``trainer.optimizer`` a
        :class:`MATOptimizer` and a :class:`MATCallback` added.

    Raises:
        TypeError: not a Trainer, or an optimizer MAT cannot wrap (the message names the ``optim`` to use).
        ValueError: ``probe=None``, ``model_init``, MAT already added, bad MAT keywords.
        NotImplementedError: DeepSpeed, FSDP, SageMaker MP, tensor parallelism, ``nn.DataParallel``.
    """
    transformers = _transformers()
    if not isinstance(trainer, transformers.Trainer):
        raise TypeError(f"with_mat expects a transformers.Trainer, got {type(trainer).__name__}")
    if getattr(trainer, "mat", None) is not None or any(isinstance(cb, MATCallback)
                                                         for cb in trainer.callback_handler.callbacks):
        raise ValueError("MAT was already added to this trainer")
    if probe is None:
        raise ValueError("probe=None measures λ from the training backward, which must run inside "
                         "mat.measure_step(); the Trainer's training_step does not: use probe='train' (default), "
                         "'eval', (batch, labels) or a callable")
    if isinstance(probe, str) and probe not in _PROBES:
        raise ValueError(f"probe must be 'train', 'eval', (batch, labels) or a callable, got {probe!r}")
    if not isinstance(probe, str) and not callable(probe) and not (isinstance(probe, (tuple, list))
                                                                   and len(probe) == 2):
        raise TypeError("probe must be 'train', 'eval', a (batch, labels) pair or a callable probe(step)")
    if probe_size is not None and (not isinstance(probe_size, int) or probe_size < 1):
        raise ValueError(f"probe_size must be a positive int, got {probe_size!r}")
    _refuse_unsupported(trainer)

    created = trainer.optimizer is None
    optimizer = trainer.create_optimizer() if created else trainer.optimizer
    if not isinstance(optimizer, SUPPORTED_OPTIMIZERS):
        if created:
            trainer.optimizer = None  # leave the trainer as it was
        if any(isinstance(o, MATOptimizer) for o in unwrap_optimizer(optimizer)):
            raise ValueError("MAT was already added to this trainer")
        if type(optimizer).__name__ == "AcceleratedOptimizer":
            hint = "with_mat() must be called before trainer.train()"
        elif created:
            hint = (f"TrainingArguments(optim={str(getattr(trainer.args.optim, 'value', trainer.args.optim))!r}) "
                    "creates it; use optim='adamw_torch_fused', 'adamw_torch' or 'sgd', or pass a torch.optim "
                    "SGD/Adam/AdamW as optimizers=(opt, None)")
        else:
            hint = "pass a torch.optim SGD, Adam or AdamW as optimizers=(opt, scheduler)"
        raise TypeError(
            f"mat_kernels.integrations.hf.with_mat: MAT cannot wrap the Trainer's optimizer "
            f"{type(optimizer).__name__}: it keeps frozen slices frozen (no update, no moment update, no weight "
            f"decay) for torch.optim.SGD, Adam and AdamW only; {hint}")

    lambda_kwargs = dict(mat_kwargs.pop("lambda_kwargs", None) or {})
    if "causal" not in lambda_kwargs and _is_causal_lm(trainer.model):
        lambda_kwargs["causal"] = True  # labels are the inputs; position t predicts label t+1
    lambda_kwargs.setdefault("forward", _measure_forward)
    if not isinstance(count_flops, bool):
        raise TypeError(f"count_flops must be a bool, got {type(count_flops).__name__}")
    callback = MATCallback(probe=probe, probe_size=probe_size, probe_seed=probe_seed, trainer=trainer,
                           count_flops=count_flops)
    try:
        mat = MAT(trainer.model, optimizer, probe=callback.probe, lambda_kwargs=lambda_kwargs, **mat_kwargs)
    except Exception:
        if created:
            trainer.optimizer = None
        raise
    mat_optimizer = MATOptimizer(mat)
    callback.mat, callback.optimizer = mat, mat_optimizer
    trainer.optimizer = mat_optimizer
    trainer.callback_handler.optimizer = mat_optimizer
    trainer.add_callback(callback)
    trainer.mat = mat
    return trainer


def _is_causal_lm(model) -> bool:
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:  # pragma: no cover
        return False
    names = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    return type(model).__name__ in names
