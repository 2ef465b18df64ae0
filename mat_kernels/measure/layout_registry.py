"""The registry of module layouts that :func:`mat_kernels.discover_modules` tries on every submodule (the
built-in ones in :mod:`mat_kernels.measure.layouts`, one file per family, register themselves here)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch.nn as nn

if TYPE_CHECKING:
    from mat_kernels.measure.specs import ModuleSpec

__all__ = ["LayoutFn", "LAYOUTS", "register_layout", "unregister_layout", "layouts"]

LayoutFn = Callable[[str, nn.Module, nn.Module, dict], "list[ModuleSpec] | None"]
LAYOUTS: list[tuple[str, LayoutFn]] = []


def register_layout(name: str) -> Callable[[LayoutFn], LayoutFn]:
    """Decorator registering a layout ``fn(prefix, module, model, options) -> list[ModuleSpec] | None``.

    ``prefix`` is the module's name in ``model.named_modules()``; return None when the module is not of this layout.
    Layouts are tried in registration order; a parameter already claimed by an earlier match is never claimed
    again, so put more specific layouts first.
    """

    def deco(fn: LayoutFn) -> LayoutFn:
        if any(n == name for n, _ in LAYOUTS):
            raise ValueError(f"a layout named {name!r} is already registered")
        LAYOUTS.append((name, fn))
        return fn

    return deco


def unregister_layout(name: str) -> None:
    """Remove a layout registered by :func:`register_layout` (``ValueError`` if none has that name)."""
    if not any(n == name for n, _ in LAYOUTS):
        raise ValueError(f"no layout named {name!r} is registered; registered: {layouts()}")
    LAYOUTS[:] = [(n, f) for n, f in LAYOUTS if n != name]


def layouts() -> list[str]:
    """Names of the registered layouts, in the order they are tried."""
    return [n for n, _ in LAYOUTS]
