"""Environment report printed by ``python -m mat_kernels``."""
from __future__ import annotations

import platform

import torch

from . import __version__
from ._backend import triton_mode


def report() -> list[tuple[str, str]]:
    rows = [
        ("mat_kernels", __version__),
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("torch CUDA build", str(torch.version.cuda) if torch.version.cuda else "no (CPU build)"),
        ("CUDA device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none"),
    ]
    mode, reason = triton_mode()
    rows.append(("Triton kernels", f"{mode}: {reason}"))
    if mode == "unavailable":
        rows.append(("lambda_max backend", "PyTorch implementation (torch_impl), warns once"))
    try:
        from . import _C  # noqa: F401

        ops = [name for name in dir(torch.ops.mat_kernels) if not name.startswith("_")]
        rows.append(("C++ extension", "built; ops: " + ", ".join(sorted(ops))))
    except ImportError as e:
        rows.append(("C++ extension", f"not built ({e})"))
    rows.append(("torch.library ops", "mat_kernels::segment_grams (Python custom op)"))
    return rows


def main() -> None:
    width = max(len(k) for k, _ in report())
    for key, value in report():
        print(f"{key:<{width}}  {value}")
