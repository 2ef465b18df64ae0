"""Environment report printed by ``python -m mat_kernels``."""
from __future__ import annotations

import platform

import torch

from mat_kernels import __version__
from mat_kernels.backend import triton_mode


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
        rows.append(("lambda_max backend", "PyTorch implementation (kernels.torch_segment_grams), warns once"))
    rows += _extension_rows()
    rows.append(("torch.library ops", "mat_kernels::segment_grams (Python custom op)"))
    return rows


CPP_OPS = ("sparse_weight_grad", "sparse_weight_grad_accumulate", "sparse_bias_grad", "sparse_bias_grad_accumulate",
           "sparse_input_grad")
_KEYS = (("CPU", "cpu"), ("CUDA", "cuda"), ("Meta", "fake"), ("Autograd", "autograd"))


def _extension_rows() -> list[tuple[str, str]]:
    """The C++/CUDA extension: what it was built for, and which kernels each of its ops has."""
    from mat_kernels.ops import sparse_grad as sparse_update

    if not sparse_update.extension_available():
        return [("C++ extension", f"not built ({sparse_update.extension_error()}); build with "
                                  "`MAX_JOBS=2 python setup.py build_ext --inplace`")]
    ext = sparse_update.extension_build()
    rows = [("C++ extension", f"mat_kernels._C built for {ext['built_devices']} against torch "
                              f"{ext['torch_version']}; CUDA: {ext['cuda']}")]
    if "cuda" not in ext["built_devices"].split(","):
        why = ("this torch is a CPU build" if torch.version.cuda is None else
               "built without a CUDA toolkit or with MAT_KERNELS_USE_CUDA=0; rebuild to get the CUDA kernels")
        rows.append(("  CUDA kernels", f"absent: {why}"))
    if ext["torch_version"] != torch.__version__.split("+")[0]:
        rows.append(("  warning", f"running torch {torch.__version__}: rebuild the extension for this torch"))
    for name in CPP_OPS:
        qual = f"mat_kernels::{name}"
        keys = [label for key, label in _KEYS if torch._C._dispatch_has_kernel_for_dispatch_key(qual, key)]
        rows.append((f"  {qual}", ", ".join(keys)))
    return rows


def main() -> None:
    width = max(len(k) for k, _ in report())
    for key, value in report():
        print(f"{key:<{width}}  {value}")
