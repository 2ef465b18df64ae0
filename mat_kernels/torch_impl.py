"""The same two exact routes as the Triton kernels, written with PyTorch tensor ops.

Used where Triton cannot run (CPU without the interpreter), and as the hand-written baselines of the benchmarks
(``einsum`` = per-sample-gradient route, ``ghost_einsum`` = ghost route). Contract and notation are those of
:mod:`mat_kernels.triton.gram`: ``a`` is the shared side ``[n, T, DA]``, ``b`` the segmented side ``[n, T, DB]``,
segments are ranges of ``b``'s last dimension, the result is fp32 ``[S, n, n]``.

Memory is bounded by chunking: the per-sample-gradient route over shared-side columns, the ghost route over
blocks of samples, each under ``scratch_bytes``.
"""
from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def _tf32(enabled: bool):
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def _with_one(a: torch.Tensor) -> torch.Tensor:
    return torch.cat([a, a.new_ones(a.shape[:-1] + (1,))], dim=-1)


def psg_segment_grams_torch(a, b, seg_starts, seg_sizes, *, add_one: bool, allow_tf32: bool = False,
                            scratch_bytes: int = 48 << 20) -> torch.Tensor:
    """Per-sample-gradient route: ``G_i[R] = b_i[:, R]ᵀ a_i`` per column chunk, then ``G Gᵀ`` per segment."""
    a = a.float()
    b = b.float()
    if add_one:
        a = _with_one(a)
    n, _, DA = a.shape
    out = torch.zeros(len(seg_starts), n, n, dtype=torch.float32, device=a.device)
    rows = max(seg_sizes)
    cw = max(1, min(DA, scratch_bytes // (4 * n * rows)))
    with _tf32(allow_tf32):
        for s, (start, size) in enumerate(zip(seg_starts, seg_sizes)):
            bs = b[:, :, start : start + size].transpose(1, 2)  # [n, R, T]
            for c0 in range(0, DA, cw):
                g = torch.bmm(bs, a[:, :, c0 : c0 + cw]).reshape(n, -1)  # [n, R * cw]
                out[s] += g @ g.T
    return out


def ghost_segment_grams_torch(a, b, seg_starts, seg_sizes, *, add_one: bool, allow_tf32: bool = False,
                              scratch_bytes: int = 48 << 20) -> torch.Tensor:
    """Ghost route: ``Θ[i, j] = Σ_{t,s} (a_it·a_js)(b_it[R]·b_js[R])`` with ``[bi, n, T, T]`` blocks."""
    a = a.float()
    b = b.float()
    n, T, _ = a.shape
    out = torch.zeros(len(seg_starts), n, n, dtype=torch.float32, device=a.device)
    bi = max(1, min(n, scratch_bytes // (2 * 4 * n * T * T)))
    with _tf32(allow_tf32):
        for i0 in range(0, n, bi):
            p = torch.einsum("itk,jsk->ijts", a[i0 : i0 + bi], a)
            if add_one:
                p += 1.0
            for s, (start, size) in enumerate(zip(seg_starts, seg_sizes)):
                bs = b[:, :, start : start + size]
                d = torch.einsum("itr,jsr->ijts", bs[i0 : i0 + bi], bs)
                out[s, i0 : i0 + bi] = (p * d).sum(dim=(2, 3))
    return out
