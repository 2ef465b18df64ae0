"""``mat_kernels::segment_grams``: per-segment Grams of per-sample gradients of one linear layer.

A ``torch.library.custom_op`` (not ``triton_op``: under the CPU interpreter ``triton_op`` fails ``opcheck`` and
``torch.compile``) with an explicit fake kernel, so the op traces under ``torch.compile``, and a FLOP formula for
``torch.utils.flop_counter`` (2 × the multiply-adds of the implementation's route, the dispatcher's cost), so
``FlopCounterMode`` counts the Grams like any GEMM. The op is not differentiable: Grams are measurements, computed
from detached activations and gradients.
"""
from __future__ import annotations

import torch
from torch.utils.flop_counter import register_flop_formula

from mat_kernels.ops import gram_dispatch
from mat_kernels.ops.gram_dispatch import GramInputs


@torch.library.custom_op("mat_kernels::segment_grams", mutates_args=())
def segment_grams(
    a: torch.Tensor,
    b: torch.Tensor,
    seg_starts: list[int],
    seg_sizes: list[int],
    seg_owners: list[int],
    add_one: bool,
    kernel: str,
    allow_tf32: bool,
    scratch_bytes: int,
) -> torch.Tensor:
    """Module Grams ``[M, n, n]`` (fp32): segment s is ``b[..., start:start+size]`` against the shared side ``a``,
    and its Gram adds into module ``seg_owners[s]`` (M = 1 + max owner).

    ``a``: ``[n, T, DA]``, ``b``: ``[n, T, DB]`` (same dtype and device). ``kernel``: the implementation that runs,
    a name of :data:`mat_kernels.ops.gram_dispatch.KERNELS` (``"triton-fused"``, ``"triton-local"``,
    ``"triton-psg"``, ``"triton-ghost"``, ``"torch-psg"``, ``"torch-ghost"``) as
    :func:`mat_kernels.ops.gram_dispatch.choose` picks it; one that cannot run on these inputs raises
    ``ValueError`` with every reason. The maths: :mod:`mat_kernels.kernels.triton_segment_grams`.
    """
    impl = gram_dispatch.require(kernel, GramInputs.of(a, seg_sizes, add_one, scratch_bytes))
    return impl.apply(a, b, tuple(seg_starts), tuple(seg_sizes), tuple(seg_owners), add_one=add_one,
                      allow_tf32=allow_tf32, scratch_bytes=scratch_bytes)


@segment_grams.register_fake
def _(a, b, seg_starts, seg_sizes, seg_owners, add_one, kernel, allow_tf32, scratch_bytes):
    torch._check(a.dim() == 3 and b.dim() == 3, lambda: "segment_grams: a and b must be 3-D")
    torch._check(a.shape[:2] == b.shape[:2], lambda: "segment_grams: a and b must share [n, T]")
    torch._check(len(seg_starts) == len(seg_sizes) and len(seg_starts) > 0,
                 lambda: "segment_grams: need as many starts as sizes, at least one")
    torch._check(len(seg_owners) == len(seg_starts) and min(seg_owners) >= 0,
                 lambda: "segment_grams: one owner >= 0 per segment")
    torch._check(kernel in gram_dispatch.KERNELS,
                 lambda: f"segment_grams: unknown kernel {kernel!r}; one of {tuple(gram_dispatch.KERNELS)}")
    return a.new_empty((1 + max(seg_owners), a.shape[0], a.shape[0]), dtype=torch.float32)


def _segment_grams_flops(a, b, seg_starts, seg_sizes, seg_owners, add_one, kernel, *args, out_val=None,
                         **kwargs) -> int:
    """2 × the multiply-adds of ``kernel``'s route on these inputs (the dispatcher's cost function)."""
    return gram_dispatch.flops(kernel, GramInputs.of(a, seg_sizes, add_one))


# registered when the op loads, so every FlopCounterMode made after ``import mat_kernels`` counts the Grams
register_flop_formula(torch.ops.mat_kernels.segment_grams, get_raw=True)(_segment_grams_flops)
