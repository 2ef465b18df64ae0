"""The one interception of ``torch.nn.functional.linear`` and the one exact-backward scope, shared by the
measurement (:mod:`mat_kernels.measure.capture`) and the sparse updates (:mod:`mat_kernels.nn`), so that neither
imports the other.

**Linear handlers.** ``nn.MultiheadAttention`` calls ``F.linear`` on its own parameters, so there is no layer to
hook or swap: a measurement records those calls and the sparse updates route them. Both register a *handler*;
while at least one is registered, ``F.linear`` is replaced by one dispatcher that runs the handlers as a chain,
recorders outside routers::

    F.linear(x, W, b) -> recorder(next, x, W, b) -> router(next, x, W, b) -> original F.linear

so a measurement records the output of the sparse route (whose backward then computes what the exact-backward
scope below asks for) instead of computing a dense one of its own. A handler passes calls it does not own to
``next``. Handlers are registered by ``with linear_handler(...)`` (a measurement: restored on any exception,
``KeyboardInterrupt`` included) or for the lifetime of an object (:func:`add_linear_handler`, removed by
:func:`remove_linear_handler` or when the object is collected); no module hook patches anything, so nothing an
interrupted forward leaves behind can keep ``F.linear`` replaced. With no handler registered ``F.linear`` is
torch's own function again.

**Exact backward.** During a measurement every gradient must flow through frozen blocks (partial
backpropagation would cut the output gradients the Grams need) and a measurement's own backward needs no weight
gradient at all. Objects that change the backward of part of a model (sparse-update layers, ``requires_grad``
gates) derive from :class:`ExactBackward`: a module that does (a sparse-update layer) takes part wherever it sits,
deep copies included; other objects register with the module they act on (:func:`register_exact`).
:func:`exact_backward` enters every one of a model. The capture is the one place that enters it.
"""
from __future__ import annotations

import abc
import contextlib
import functools
import itertools
import weakref
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ORIGINAL_LINEAR", "RECORD", "ROUTE", "ExactBackward", "linear_handler", "add_linear_handler",
           "remove_linear_handler", "linear_handlers", "register_exact", "unregister_exact", "exact_backward",
           "is_view_of_rows"]

ORIGINAL_LINEAR = F.linear
RECORD, ROUTE = 0, 1  # handler roles: recorders run outside routers
# (role, sequence, handler): sorted, outermost first. A handler is called as handler(next, input, weight, bias).
_HANDLERS: list[tuple[int, int, Callable]] = []
_SEQ = itertools.count()


_CHAIN: list[Callable] = [ORIGINAL_LINEAR]  # the handlers composed (built when they change, not per call)


def _dispatch(input, weight, bias=None):
    """The installed ``F.linear``: the registered handlers as a chain ending in torch's own linear."""
    return _CHAIN[0](input, weight, bias)


def _install() -> None:
    chain = ORIGINAL_LINEAR
    for _, _, handler in reversed(_HANDLERS):  # the outermost handler is called first and gets the rest as `next`
        chain = functools.partial(handler, chain)
    _CHAIN[0] = chain
    F.linear = _dispatch if _HANDLERS else ORIGINAL_LINEAR


def add_linear_handler(handler: Callable, role: int) -> int:
    """Register ``handler(next, input, weight, bias)`` (``role``: :data:`RECORD` or :data:`ROUTE`); returns a
    token for :func:`remove_linear_handler`."""
    if role not in (RECORD, ROUTE):
        raise ValueError(f"role must be RECORD ({RECORD}) or ROUTE ({ROUTE}), got {role!r}")
    token = next(_SEQ)
    _HANDLERS.append((role, token, handler))
    _HANDLERS.sort(key=lambda e: (e[0], e[1]))
    _install()
    return token


def remove_linear_handler(token: int) -> None:
    """Unregister a handler (a token already removed is ignored); ``F.linear`` is torch's again when none is left."""
    _HANDLERS[:] = [e for e in _HANDLERS if e[1] != token]
    _install()


@contextlib.contextmanager
def linear_handler(handler: Callable, role: int):
    """``handler`` intercepts ``F.linear`` within the context (removed on any exit, ``KeyboardInterrupt``
    included)."""
    token = add_linear_handler(handler, role)
    try:
        yield
    finally:
        remove_linear_handler(token)


def linear_handlers() -> int:
    """How many handlers intercept ``F.linear`` now (0: it is torch's own)."""
    return len(_HANDLERS)


class ExactBackward(abc.ABC):
    """What changes the backward of part of a model and can run it exactly during a measurement (an abstract base:
    a subclass without :meth:`exact_backward` cannot be instantiated)."""

    @abc.abstractmethod
    def exact_backward(self, *, weight_grad: bool):
        """A context manager: exact backward within it, with (``weight_grad=True``) or without weight gradients."""


# id(module) -> weak references to what changes its backward; keyed by id with a finalizer, since a module may be
# unhashable-by-weakref in subclasses that define __eq__ (weakref.WeakKeyDictionary would compare them)
_EXACT: dict[int, list] = {}


def register_exact(module: nn.Module, participant) -> None:
    """``participant.exact_backward(weight_grad=...)`` is entered by :func:`exact_backward` on any model holding
    ``module``; the registration ends when either is collected (or by ``unregister_exact``)."""
    refs = _EXACT.get(id(module))
    if refs is None:
        refs = _EXACT[id(module)] = []
        weakref.finalize(module, _EXACT.pop, id(module), None)
    refs[:] = [r for r in refs if r() is not None and r() is not participant]
    refs.append(weakref.ref(participant))


def unregister_exact(module: nn.Module, participant) -> None:
    """End a registration made by :func:`register_exact`."""
    refs = [r for r in _EXACT.get(id(module), ()) if r() is not None and r() is not participant]
    if refs:
        _EXACT[id(module)] = refs
    else:
        _EXACT.pop(id(module), None)


@contextlib.contextmanager
def exact_backward(model: nn.Module, *, weight_grad: bool):
    """Within the context, every sparse-update layer and gate of ``model`` runs the exact backward (``dX = dY W``,
    gradients through frozen blocks), with the active blocks' weight gradients (``weight_grad=True``, a training
    step that measures) or none at all (``False``, a measurement's own backward)."""
    with contextlib.ExitStack() as stack:
        for m in model.modules():
            if isinstance(m, ExactBackward):
                stack.enter_context(m.exact_backward(weight_grad=weight_grad))
            for ref in list(_EXACT.get(id(m), ())):
                p = ref()
                if p is not None:
                    stack.enter_context(p.exact_backward(weight_grad=weight_grad))
        yield


def is_view_of_rows(view: torch.Tensor, base: torch.Tensor) -> int | None:
    """The first row of ``base`` that ``view`` starts at when it is a block of whole rows of it, else None."""
    if view.dim() != 2 or view.stride() != base.stride() or view.shape[1] != base.shape[1]:
        return None
    return (view.storage_offset() - base.storage_offset()) // base.stride(0)
