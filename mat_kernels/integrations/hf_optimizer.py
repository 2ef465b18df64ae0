"""The optimizer a Hugging Face ``Trainer`` steps under :func:`mat_kernels.integrations.hf.with_mat`: a
``torch.optim.Optimizer`` whose ``param_groups``/``state`` are the wrapped optimizer's and whose ``step()`` is
:meth:`mat_kernels.MAT.step`."""
from __future__ import annotations

import collections.abc

import torch

from mat_kernels.train.controller import MAT

__all__ = ["MATOptimizer", "unwrap_optimizer", "to_device"]


def _forwarded(name: str) -> property:
    """An attribute read from and written to the wrapped optimizer: LR schedulers and accelerate see its own
    objects."""
    return property(lambda self: getattr(self.optimizer, name),
                    lambda self, value: setattr(self.optimizer, name, value))


class MATOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` whose :meth:`step` is :meth:`MAT.step`, for code that steps an optimizer itself
    (the ``Trainer``, accelerate's ``AcceleratedOptimizer`` and ``GradScaler``, LR schedulers).

    ``param_groups``, ``state`` and ``defaults`` are the wrapped optimizer's own objects (an LR scheduler built on
    either sees the same dicts). :meth:`state_dict` is the wrapped optimizer's plus a ``"mat"`` entry with
    :meth:`MAT.state_dict`; :meth:`load_state_dict` restores both (a state dict without ``"mat"`` restores the
    optimizer only). Like accelerate's wrapper, it does not call ``Optimizer.__init__``: it owns no state.
    """

    def __init__(self, mat: MAT):  # noqa: D107 - no Optimizer.__init__: the wrapped optimizer holds everything
        if not isinstance(mat, MAT):
            raise TypeError(f"MATOptimizer wraps a mat_kernels.MAT, got {type(mat).__name__}")
        self.mat = mat

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The wrapped torch optimizer (``SGD``, ``Adam`` or ``AdamW``)."""
        return self.mat.optimizer.optimizer

    param_groups = _forwarded("param_groups")
    state = _forwarded("state")
    defaults = _forwarded("defaults")

    def step(self, closure=None):
        """:meth:`MAT.step`: the frozen-slice optimizer step, then the measurement and new masks when due."""
        with torch.enable_grad():  # the measurement runs a forward and backward; callers may be in no_grad
            return self.mat.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.mat.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict) -> None:
        """Added parameters belong to no MAT module: they are trained at every step."""
        self.optimizer.add_param_group(param_group)

    def state_dict(self) -> dict:
        sd = self.optimizer.state_dict()
        sd["mat"] = self.mat.state_dict()
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        sd = dict(state_dict)
        mat_sd = sd.pop("mat", None)
        self.optimizer.load_state_dict(sd)
        # torch's load_state_dict replaces the state tensors (accelerate reloads the state when it wraps this
        # optimizer, the Trainer when it resumes): FrozenSliceOptimizer's plan holds views of the old ones
        self.mat.optimizer.refresh_from_optimizer()
        if mat_sd is not None:
            # accelerate moves every tensor of an optimizer state dict to the device; MAT's state lives on the CPU
            self.mat.load_state_dict(to_device(mat_sd, "cpu"))

    def __getstate__(self):
        return self.__dict__

    def __setstate__(self, state):
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"MATOptimizer({self.optimizer!r})"


def unwrap_optimizer(opt):
    """The chain ``opt, opt.optimizer, ...`` (accelerate's and other wrappers), outermost first."""
    seen = []
    while opt is not None and not any(opt is s for s in seen):
        seen.append(opt)
        if isinstance(opt, MATOptimizer):
            break
        opt = getattr(opt, "optimizer", None)
    return seen


def to_device(obj, device):
    """Tensors of a batch or state (nested dicts, mappings, lists, tuples) moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, collections.abc.Mapping):  # also BatchEncoding (a UserDict): a plain dict for the model
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj
