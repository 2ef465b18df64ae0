"""How a model is called on a batch, and the checks every per-sample measurement makes first: shared by the model
level, the capture, the MAT controller and the Hugging Face integration."""
from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["check_samples_independent", "batch_size", "concat_batches", "default_forward"]


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


def concat_batches(a, b):
    """Two batches of the same structure as one: tensors with a sample dimension concatenated along it (tensors of
    a dict, tuple or list item by item; scalars and non-tensors must be equal and are kept). A training probe and
    a held-out probe measured in one pass."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            raise TypeError(f"cannot concatenate a {type(a).__name__} with a {type(b).__name__}")
        if a.dim() == 0 or b.dim() == 0:
            if not torch.equal(a, b):
                raise ValueError("0-d tensors of the two batches differ")
            return a
        if a.shape[1:] != b.shape[1:] or a.dtype != b.dtype or a.device != b.device:
            raise ValueError(f"tensors of shapes {tuple(a.shape)} ({a.dtype}, {a.device}) and {tuple(b.shape)} "
                             f"({b.dtype}, {b.device}) cannot be concatenated along the samples")
        return torch.cat([a, b])
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            raise ValueError(f"the batches' keys differ: {sorted(a)} and {sorted(b)}")
        return {k: concat_batches(a[k], b[k]) for k in a}
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and type(a) is type(b):
        if len(a) != len(b):
            raise ValueError(f"the batches have {len(a)} and {len(b)} items")
        return type(a)(concat_batches(x, y) for x, y in zip(a, b))
    if a is None and b is None or a == b:
        return a
    raise ValueError(f"cannot concatenate {a!r} and {b!r}")


def default_forward(model: nn.Module, batch):
    """``model(**batch)`` without ``labels`` for a dict, ``model(*batch)`` for a tuple/list, else ``model(batch)``."""
    if isinstance(batch, dict):
        return model(**{k: v for k, v in batch.items() if k != "labels"})
    if isinstance(batch, (list, tuple)):
        return model(*batch)
    return model(batch)
