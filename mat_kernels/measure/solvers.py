"""Batched largest-eigenvalue solvers for many small symmetric PSD matrices (the per-module Grams).

* ``eigvalsh``: the full symmetric eigendecomposition (``torch.linalg.eigvalsh``), exact to working precision;
  the default for ``n < 256``.
* ``subspace``: block subspace iteration with Rayleigh-Ritz, ``O(n² b)`` per iteration instead of ``O(n³)``;
  the default for ``n ≥ 256``. It stops when the top Ritz pair ``(θ, y)`` of every matrix satisfies
  ``‖Θy − θy‖ ≤ tol·θ``. Then ``θ ≤ λmax`` (θ is a Rayleigh quotient) and some eigenvalue lies within
  ``tol·θ`` of θ; in practice θ is the top one (random start) and its relative error is ``O(tol²)/gap``,
  so the default ``tol = 1e-4`` gives λmax to far better than 1e-4 relative. Non-convergence warns.
"""
from __future__ import annotations

import warnings

import torch

__all__ = ["lambda_max", "SUBSPACE_MIN_N"]

SUBSPACE_MIN_N = 256


def _check_grams(grams, check_finite: bool) -> torch.Tensor:
    if not isinstance(grams, torch.Tensor):
        raise TypeError(f"grams must be a torch.Tensor, got {type(grams).__name__}")
    if grams.dim() == 2:
        grams = grams.unsqueeze(0)
    if grams.dim() != 3 or grams.shape[-1] != grams.shape[-2]:
        raise ValueError(f"grams must be [M, n, n] (or [n, n]) square matrices, got shape {tuple(grams.shape)}")
    if grams.shape[-1] == 0:
        raise ValueError("grams are 0 x 0: empty batch")
    if not grams.is_floating_point() or grams.dtype in (torch.float16, torch.bfloat16):
        raise TypeError(f"grams must be float32 or float64, got {grams.dtype}")
    if check_finite and not bool(torch.isfinite(grams).all()):
        raise ValueError("grams contain NaN or Inf")
    return grams


def _subspace(grams: torch.Tensor, block: int, tol: float, max_iter: int, seed: int) -> torch.Tensor:
    m, n, _ = grams.shape
    b = max(1, min(block, n))
    gen = torch.Generator(device=grams.device).manual_seed(seed)
    v = torch.randn(m, n, b, generator=gen, device=grams.device, dtype=grams.dtype)
    v = torch.linalg.qr(v).Q
    theta = torch.zeros(m, device=grams.device, dtype=grams.dtype)
    res = torch.full_like(theta, float("inf"))
    tiny = torch.finfo(grams.dtype).tiny
    for _ in range(max_iter):
        w = grams @ v
        h = v.transpose(1, 2) @ w
        evals, evecs = torch.linalg.eigh(0.5 * (h + h.transpose(1, 2)))
        u = evecs[..., -1:]
        theta = evals[..., -1]
        y, gy = v @ u, w @ u
        res = torch.linalg.vector_norm(gy - theta[:, None, None] * y, dim=(1, 2))
        if bool((res <= tol * theta.clamp_min(tiny)).all()):
            return theta
        v = torch.linalg.qr(w).Q
    worst = (res / theta.clamp_min(tiny)).max().item()
    warnings.warn(
        f"mat_kernels.lambda_max: subspace iteration did not reach tol={tol} in {max_iter} iterations "
        f"(worst relative residual {worst:.2e}); raise max_iter or use solver='eigvalsh'",
        RuntimeWarning,
        stacklevel=3,
    )
    return theta


def lambda_max(
    grams: torch.Tensor,
    *,
    solver: str = "auto",
    tol: float = 1e-4,
    max_iter: int = 500,
    block_size: int = 8,
    seed: int = 0,
    check_finite: bool = True,
) -> torch.Tensor:
    """Largest eigenvalue of each symmetric PSD matrix in a batch.

    Args:
        grams: ``[M, n, n]`` (or ``[n, n]``) float32/float64 symmetric matrices, e.g. module Grams.
        solver: ``"auto"`` (``eigvalsh`` for ``n < 256``, else ``subspace``), ``"eigvalsh"`` or ``"subspace"``.
        tol: relative residual at which subspace iteration stops (see the module docstring).
        max_iter: iteration cap of subspace iteration; hitting it warns.
        block_size: subspace width (more columns converge faster when the top eigenvalues cluster).
        seed: seed of the random start block.
        check_finite: reject NaN/Inf Grams (costs a host sync).

    Returns:
        ``[M]`` λmax in the Grams' dtype.
    """
    grams = _check_grams(grams, check_finite)
    if solver == "auto":
        solver = "eigvalsh" if grams.shape[-1] < SUBSPACE_MIN_N else "subspace"
    if solver == "eigvalsh":
        return torch.linalg.eigvalsh(grams)[..., -1]
    if solver == "subspace":
        if not tol > 0:
            raise ValueError(f"tol must be positive, got {tol}")
        return _subspace(grams, block_size, tol, max_iter, seed)
    raise ValueError(f"solver must be 'auto', 'eigvalsh' or 'subspace', got {solver!r}")
