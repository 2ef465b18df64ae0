"""Where Triton can run: natively on a GPU, in its CPU interpreter, or not at all (then the PyTorch
implementations run).

The Gram dispatcher (:mod:`mat_kernels.ops.gram_dispatch`) asks :func:`triton_unusable` per call; the sparse-update
kernels ask :func:`kernel_unusable`. Falling back to PyTorch (or upcasting low-precision inputs for the
interpreter) warns once per reason (:func:`warn_once`), and every result says what ran.
"""
from __future__ import annotations

import functools
import os
import warnings

import torch

_WARNED: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """Emit ``message`` as a ``UserWarning`` the first time ``key`` is seen in this process."""
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, UserWarning, stacklevel=3)


@functools.lru_cache(maxsize=512)
def device_ints(values: tuple, device: torch.device) -> torch.Tensor:
    """An int32 tensor of ``values`` on ``device``, made once per (values, device): a layer's index tensors are
    static, so repeated calls copy nothing from the host (no blocking host-to-device copy per call)."""
    return torch.tensor(values, dtype=torch.int32, device=device)


def interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET=1``. Triton reads it when a kernel is decorated, i.e. at import time."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_import_error() -> str | None:
    """None if ``import triton`` works, else the reason."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the environment
        return f"triton is not importable ({type(e).__name__}: {e})"
    return None


def triton_mode() -> tuple[str, str]:
    """``(mode, reason)`` with mode ``"native"``, ``"interpreter"`` or ``"unavailable"``."""
    err = triton_import_error()
    if err is not None:
        return "unavailable", err
    import triton

    if interpreter_enabled():
        return "interpreter", f"triton {triton.__version__} in its CPU interpreter (TRITON_INTERPRET=1)"
    if torch.cuda.is_available():
        return "native", f"triton {triton.__version__} on {torch.cuda.get_device_name()}"
    return "unavailable", "no CUDA device and TRITON_INTERPRET is not set"


def triton_unusable(device: torch.device) -> str | None:
    """None when the Gram kernels (Triton) can run on tensors of ``device`` here, else why not: natively on CUDA
    tensors, or in the CPU interpreter (``TRITON_INTERPRET=1``). Read at every call (the Gram dispatcher,
    :mod:`mat_kernels.ops.gram_dispatch`, asks it for each Triton implementation)."""
    mode, reason = triton_mode()
    if mode == "interpreter":  # (CUDA tensors go through the host)
        return None if device.type in ("cpu", "cuda") else f"the Triton interpreter takes CPU tensors, not {device}"
    if mode == "native":
        return None if device.type == "cuda" else f"tensors are on {device.type}; Triton kernels run on CUDA tensors"
    return reason


# The Triton mode the sparse-update kernels (backward and optimizer step) run in, read once per process;
# benchmarks/triton_static.py sets it to ("stand-in", ...) to compile them for a GPU target on a machine without one.
KERNEL_MODE: tuple[str, str] | None = None


def kernel_unusable(device: torch.device) -> str | None:
    """None when the sparse-update Triton kernels can run on tensors of ``device`` here, else why not."""
    global KERNEL_MODE
    if KERNEL_MODE is None:
        KERNEL_MODE = triton_mode()
    mode, reason = KERNEL_MODE
    if mode == "interpreter" and device.type == "cuda":
        return "TRITON_INTERPRET=1 runs Triton on the CPU only"
    if mode == "native" and device.type != "cuda":
        return f"Triton compiles for CUDA, the tensors are on {device.type}"
    return reason if mode == "unavailable" else None
