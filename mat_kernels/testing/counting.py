"""Counting what a step dispatches: aten ops by name, and ``aten._local_scalar_dense`` (a tensor value read back to
the host: ``.item()``, ``bool(t)``, ``int(t)``; a device synchronisation on a GPU). Used by the tests and
benchmarks that hold a MAT step to the dense step's host cost."""
from __future__ import annotations

import collections

from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["OpCounter"]


class OpCounter(TorchDispatchMode):
    """``with OpCounter() as c: step()``, then ``c.ops`` (a ``Counter`` of op names, e.g. ``"mm"``), ``c.total``
    and ``c.scalar_reads``."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    @property
    def scalar_reads(self) -> int:
        return self.ops["_local_scalar_dense"]
