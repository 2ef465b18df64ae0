"""Helpers and tolerances shared by the tests (imported as ``from helpers import ...``)."""
import pytest
import torch

from mat_kernels.testing.tolerances import GRAM_RTOL

HAS_CUDA = torch.cuda.is_available()

# Grams and λmax against the float64 oracle: stated once, in mat_kernels/testing/tolerances.py (with the reasons).
FP32_RTOL = GRAM_RTOL[torch.float32]
TF32_RTOL = GRAM_RTOL["tf32"]


# starts, sizes, owners and an activity mask of three 3-wide blocks: the invalid-input tests of the sparse-grad ops
SMALL_LAYOUT = ([0, 3, 6], [3, 3, 3], [0, 1, 2], torch.tensor([True, False, True]))


def devices():
    return ["cpu"] + (["cuda"] if HAS_CUDA else [])


def backends():
    """(device, backend) pairs: Triton (interpreter on CPU, native on GPU) and the PyTorch implementation."""
    out = [("cpu", "torch")]
    if HAS_CUDA:
        out += [("cuda", "triton"), ("cuda", "torch")]
    else:
        out += [("cpu", "triton")]
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def aten_counts(fn):
    """How often each ``aten::`` op ran in ``fn()`` (torch profiler, CPU)."""
    from collections import Counter

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return Counter(e.name for e in prof.events() if e.name.startswith("aten::"))


GEMM_OPS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::addmm_", "aten::baddbmm_", "aten::matmul")
COPY_OPS = ("aten::clone", "aten::contiguous", "aten::index_select", "aten::index", "aten::gather", "aten::copy_",
            "aten::cat", "aten::stack")


def assert_moved_iff_active(specs, params: dict, before: dict, active) -> bool:
    """After an optimizer step: every slice of an active module changed, every slice of a frozen one is bit-for-bit
    unchanged (``before``: the parameters before the step). Returns whether some module was frozen."""
    for m, spec in enumerate(specs):
        for sl in spec.slices:
            w, old = params[sl.weight].detach(), before[sl.weight]
            parts = [(w, old)] if sl.axis == "all" else [
                (w[a:a + n], old[a:a + n]) if sl.axis == "rows" else (w[:, a:a + n], old[:, a:a + n])
                for a, n in sl.ranges]
            for new, prev in parts:
                assert torch.equal(new, prev) != bool(active[m]), (spec.name, bool(active[m]))
    return not bool(torch.as_tensor(active).all())
