"""How MAT reaches the model behind its wrappers (``DistributedDataParallel``, ``torch.compile``) and refuses a second
controller on a model part an open one controls."""
from __future__ import annotations

import torch.nn as nn

__all__ = ["unwrap_model", "is_compiled", "refuse_open_controller"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside ``DistributedDataParallel`` and ``torch.compile`` wrappers (in any order)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def is_compiled(model: nn.Module) -> bool:
    """Whether ``model`` is (or wraps) a ``torch.compile``d module: ``torch.compile(model)`` or ``model.compile()``."""
    while True:
        if isinstance(getattr(model, "_orig_mod", None), nn.Module) or getattr(model, "_compiled_call_impl", None):
            return True
        if not isinstance(model, nn.parallel.DistributedDataParallel):
            return False
        model = model.module


def refuse_open_controller(module: nn.Module) -> None:
    """A model part that an open MAT controls (its sparse-update layers, routing, gates) cannot get a second one."""
    for name, mod in module.named_modules():
        ref = mod.__dict__.get("_mat_controller")
        other = ref() if ref is not None else None
        if other is not None and not other.closed:
            raise ValueError(f"{name or 'the model'} ({type(mod).__name__}) is controlled by another MAT that is still "
                             f"open ({other!r}, {len(other.specs)} modules); call its close() first")
