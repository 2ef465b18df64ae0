"""Old import paths of modules that moved into the tier folders (0.2): each keeps working for one release, with a
``DeprecationWarning`` naming the new path. The documented short paths ``mat_kernels.hf``, ``.optim``, ``.flops``
and ``.reference`` are aliases without a warning (set in ``mat_kernels/__init__.py``)."""
from __future__ import annotations

import importlib
import sys
import warnings


def moved(old: str, new: str) -> None:
    """Make module ``old`` the module ``new`` (its submodules too), warning once per import of ``old``."""
    module = importlib.import_module(new)
    warnings.warn(f"{old} is deprecated: import {new} instead (the old path will be removed in 0.3)",
                  DeprecationWarning, stacklevel=3)
    sys.modules[old] = module
    for name in list(sys.modules):  # a package's loaded submodules: never executed twice under two names
        if name.startswith(new + "."):
            sys.modules.setdefault(old + name[len(new):], sys.modules[name])
