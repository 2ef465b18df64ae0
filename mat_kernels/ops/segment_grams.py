"""``mat_kernels::segment_grams``: per-segment Grams of per-sample gradients of one linear layer.

A ``torch.library.custom_op`` (not ``triton_op``: under the CPU interpreter ``triton_op`` fails ``opcheck`` and
``torch.compile``) with an explicit fake kernel, so the op traces under ``torch.compile``. The op is not
differentiable: Grams are measurements, computed from detached activations and gradients.
"""
from __future__ import annotations

import torch

from mat_kernels import _backend
from mat_kernels.kernels import torch_segment_grams as torch_impl

_ROUTES = ("ghost", "psg")


@torch.library.custom_op("mat_kernels::segment_grams", mutates_args=())
def segment_grams(
    a: torch.Tensor,
    b: torch.Tensor,
    seg_starts: list[int],
    seg_sizes: list[int],
    seg_owners: list[int],
    add_one: bool,
    route: str,
    allow_tf32: bool,
    backend: str,
    scratch_bytes: int,
) -> torch.Tensor:
    """Module Grams ``[M, n, n]`` (fp32): segment s is ``b[..., start:start+size]`` against the shared side ``a``,
    and its Gram adds into module ``seg_owners[s]`` (M = 1 + max owner).

    ``a``: ``[n, T, DA]``, ``b``: ``[n, T, DB]`` (same dtype and device). ``route`` is ``"ghost"`` or ``"psg"``,
    ``backend`` ``"triton"`` or ``"torch"``. On Triton, ``psg`` runs the variant that
    :func:`mat_kernels.kernels.triton_segment_grams_fused.psg_plan` predicts fastest: the fused or the tile-local
    per-sample-gradient + Gram kernel (one launch each, the owners summed in the kernel; n ≤ 32 and n ≤ 64), or the
    two-kernel route with its chunked scratch. The maths: :mod:`mat_kernels.kernels.triton_segment_grams`.
    """
    if backend == "triton":
        from mat_kernels.kernels import triton_segment_grams as tg
        from mat_kernels.kernels import triton_segment_grams_fused as tf

        n, T, DA = a.shape
        if route == "psg":
            kernel = tf.psg_plan(n, T, DA + int(add_one), sum(seg_sizes), a.element_size(), scratch_bytes)["kernel"]
            if kernel == "fused":
                return tf.fused_segment_grams(a, b, tuple(seg_starts), tuple(seg_sizes), tuple(seg_owners),
                                              add_one=add_one, allow_tf32=allow_tf32)
            if kernel == "local":
                return tf.local_segment_grams(a, b, tuple(seg_starts), tuple(seg_sizes), tuple(seg_owners),
                                              add_one=add_one, allow_tf32=allow_tf32, scratch_bytes=scratch_bytes)
        fn = tg.ghost_segment_grams if route == "ghost" else tg.psg_segment_grams
        kwargs = {} if route == "ghost" else {"scratch_bytes": scratch_bytes}
        # the kernels add each segment's Gram into its module themselves
        return fn(a, b, tuple(seg_starts), tuple(seg_sizes), add_one=add_one, allow_tf32=allow_tf32,
                  seg_owners=tuple(seg_owners), **kwargs)
    else:
        fn = torch_impl.ghost_segment_grams_torch if route == "ghost" else torch_impl.psg_segment_grams_torch
        kwargs = {"scratch_bytes": scratch_bytes}
    seg = fn(a, b, tuple(seg_starts), tuple(seg_sizes), add_one=add_one, allow_tf32=allow_tf32, **kwargs)
    return _by_owner(seg, seg_owners)


def _by_owner(seg: torch.Tensor, owners: list[int]) -> torch.Tensor:
    """Sum segment Grams ``[S, n, n]`` into module Grams ``[M, n, n]``."""
    if list(owners) == list(range(len(owners))):
        return seg
    idx = _backend.device_ints(tuple(owners), seg.device)  # cached: no host copy per call
    out = seg.new_zeros((1 + max(owners),) + tuple(seg.shape[1:]))
    return out.index_add_(0, idx, seg)


@segment_grams.register_fake
def _(a, b, seg_starts, seg_sizes, seg_owners, add_one, route, allow_tf32, backend, scratch_bytes):
    torch._check(a.dim() == 3 and b.dim() == 3, lambda: "segment_grams: a and b must be 3-D")
    torch._check(a.shape[:2] == b.shape[:2], lambda: "segment_grams: a and b must share [n, T]")
    torch._check(len(seg_starts) == len(seg_sizes) and len(seg_starts) > 0,
                 lambda: "segment_grams: need as many starts as sizes, at least one")
    torch._check(len(seg_owners) == len(seg_starts) and min(seg_owners) >= 0,
                 lambda: "segment_grams: one owner >= 0 per segment")
    torch._check(route in _ROUTES, lambda: f"segment_grams: unknown route {route}")
    return a.new_empty((1 + max(seg_owners), a.shape[0], a.shape[0]), dtype=torch.float32)
