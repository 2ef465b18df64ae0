"""The same two exact routes as the Triton kernels, written with PyTorch tensor ops.

Used where Triton cannot run (CPU without the interpreter), and as the hand-written baselines of the benchmarks
(``einsum`` = per-sample-gradient route, ``ghost_einsum`` = ghost route). Contract and notation are those of
:mod:`mat_kernels.kernels.triton_segment_grams`: ``a`` is the shared side ``[n, T, DA]``, ``b`` the segmented side
``[n, T, DB]``, segments are ranges of ``b``'s last dimension, the result is fp32 ``[S, n, n]``.

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


def psg_segment_grams_torch(a, b, seg_starts, seg_sizes, *, add_one: bool, allow_tf32: bool = False,
                            scratch_bytes: int = 48 << 20) -> torch.Tensor:
    """Per-sample-gradient route: ``G_i[R] = b_i[:, R]ᵀ a_i`` per column chunk, then ``G Gᵀ`` per segment.

    ``add_one`` (the bias column of ones appended to ``a``) is not materialised: the bias column's per-sample
    gradient is the row sum ``Σ_t b_i[t, R]``, whose Gram is added as one more piece (no copy of ``a``)."""
    a = a.float()
    b = b.float()
    n, _, DA = a.shape
    out = torch.zeros(len(seg_starts), n, n, dtype=torch.float64, device=a.device)
    rows = max(seg_sizes)
    cw = max(1, min(DA, scratch_bytes // (4 * n * rows)))
    with _tf32(allow_tf32):
        for s, (start, size) in enumerate(zip(seg_starts, seg_sizes)):
            bs = b[:, :, start : start + size].transpose(1, 2)  # [n, R, T]
            for c0 in range(0, DA, cw):
                g = torch.bmm(bs, a[:, :, c0 : c0 + cw])  # [n, R, w]: per-sample gradients of this chunk
                out[s] += _gram_in_pieces(g, scratch_bytes)
            if add_one:
                gb = bs.sum(-1)  # [n, R]: the bias column's per-sample gradients
                out[s] += (gb @ gb.T).double()
    return out.float()


def _gram_in_pieces(g: torch.Tensor, scratch_bytes: int, piece: int = 4096) -> torch.Tensor:
    """``G Gᵀ`` of ``g [n, R, w]`` flattened to ``[n, R·w]``, as float64 ``[n, n]``.

    One fp32 GEMM over K = R·w products accumulates an error ~√K·ε: measured 1e-4 relative on the BERT-base FFN
    (K ≈ 2.4M). Splitting K into pieces of about ``piece`` products (whole rows of g), one batched GEMM over the
    pieces, and adding the ``[P, n, n]`` partial Grams in float64 brings it to ~√piece·ε (~1e-6). The partial
    Grams are kept under ``scratch_bytes``. Rows that do not fill a last piece form their own GEMM (views only,
    no zero padding copied).
    """
    n, R, w = g.shape
    rows_per_piece = max(1, piece // w)
    P = -(-R // rows_per_piece)
    P = max(1, min(P, scratch_bytes // (4 * n * n)))  # bound the [P, n, n] partial Grams
    rows_per_piece = -(-R // P)
    full = R // rows_per_piece
    main = full * rows_per_piece
    gp = g[:, :main].reshape(n, full, rows_per_piece * w).transpose(0, 1)  # [full, n, K/P]: a view
    total = torch.bmm(gp, gp.transpose(1, 2)).sum(0, dtype=torch.float64)
    if main < R:
        rest = g[:, main:].reshape(n, -1)
        total += (rest @ rest.T).double()
    return total


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
