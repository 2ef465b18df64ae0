"""``mat_kernels::segment_grams``: per-segment Grams of per-sample gradients of one linear layer.

A ``torch.library.custom_op`` (not ``triton_op``: under the CPU interpreter ``triton_op`` fails ``opcheck`` and
``torch.compile``) with an explicit fake kernel, so the op traces under ``torch.compile``. The op is not
differentiable: Grams are measurements, computed from detached activations and gradients.
"""
from __future__ import annotations

import torch

from .. import torch_impl

_ROUTES = ("ghost", "psg")


@torch.library.custom_op("mat_kernels::segment_grams", mutates_args=())
def segment_grams(
    a: torch.Tensor,
    b: torch.Tensor,
    seg_starts: list[int],
    seg_sizes: list[int],
    add_one: bool,
    route: str,
    allow_tf32: bool,
    backend: str,
    scratch_bytes: int,
) -> torch.Tensor:
    """Grams ``[S, n, n]`` (fp32) of segments ``b[..., start:start+size]`` against the shared side ``a``.

    ``a``: ``[n, T, DA]``, ``b``: ``[n, T, DB]`` (same dtype and device). ``route`` is ``"ghost"`` or ``"psg"``,
    ``backend`` ``"triton"`` or ``"torch"``. See :mod:`mat_kernels.triton.gram` for the maths.
    """
    if backend == "triton":
        from ..triton import gram as tg

        fn = tg.ghost_segment_grams if route == "ghost" else tg.psg_segment_grams
        kwargs = {} if route == "ghost" else {"scratch_bytes": scratch_bytes}
    else:
        fn = torch_impl.ghost_segment_grams_torch if route == "ghost" else torch_impl.psg_segment_grams_torch
        kwargs = {"scratch_bytes": scratch_bytes}
    return fn(a, b, tuple(seg_starts), tuple(seg_sizes), add_one=add_one, allow_tf32=allow_tf32, **kwargs)


@segment_grams.register_fake
def _(a, b, seg_starts, seg_sizes, add_one, route, allow_tf32, backend, scratch_bytes):
    torch._check(a.dim() == 3 and b.dim() == 3, lambda: "segment_grams: a and b must be 3-D")
    torch._check(a.shape[:2] == b.shape[:2], lambda: "segment_grams: a and b must share [n, T]")
    torch._check(len(seg_starts) == len(seg_sizes) and len(seg_starts) > 0,
                 lambda: "segment_grams: need as many starts as sizes, at least one")
    torch._check(route in _ROUTES, lambda: f"segment_grams: unknown route {route}")
    return a.new_empty((len(seg_starts), a.shape[0], a.shape[0]), dtype=torch.float32)
