"""How a model is called on a batch, and the checks every per-sample measurement makes first: shared by the model
level, the capture, the MAT controller and the Hugging Face integration."""
from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["check_samples_independent", "batch_size", "default_forward"]


def check_samples_independent(model: nn.Module) -> None:
    """Raise ``ValueError`` if a layer mixes samples (BatchNorm in training mode): per-sample gradients are then
    undefined."""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.training:
            raise ValueError(
                f"{name or 'model'} is a {type(mod).__name__} in training mode: it normalises with statistics of the "
                "whole batch, so samples interact and per-sample gradients are not defined. Measure in eval mode "
                "(model.eval(), or eval() on the BatchNorm layers) and switch back afterwards."
            )


def batch_size(batch) -> int:
    """n of a batch: the first dimension of a tensor, or of the first tensor in a dict/tuple/list."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() > 0 else 0
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else None
    if values is None:
        raise TypeError(f"batch must be a tensor, a dict or a tuple/list of tensors, got {type(batch).__name__}")
    for v in values:
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return v.shape[0]
    raise ValueError("batch holds no tensor with a sample dimension")


def default_forward(model: nn.Module, batch):
    """``model(**batch)`` without ``labels`` for a dict, ``model(*batch)`` for a tuple/list, else ``model(batch)``."""
    if isinstance(batch, dict):
        return model(**{k: v for k, v in batch.items() if k != "labels"})
    if isinstance(batch, (list, tuple)):
        return model(*batch)
    return model(batch)
