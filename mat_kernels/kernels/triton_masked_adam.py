"""Adam / AdamW over the active blocks of one weight in one launch, whatever the mask: the frozen-slice optimizer
step of a layer whose blocks are *column* ranges of a row-major weight (an output projection's heads), which torch's
fused kernels cannot take without copying each strided segment to a dense tensor and back.

The weight ``P: [N, K]`` (any strides; its optimizer state has the same strides) is cut along one axis into *runs*
(``run: [N]`` or ``[K]`` int32, the run of each row or column), each with its own 0/1 activity ``act[r]`` (int8)
and its own step count ``step[r]`` (fp32, on the device, already advanced for this step). A program owns one
``[BM, BN]`` tile: a tile whose runs are all frozen loads and stores nothing, an active entry gets torch's fused
update (``aten/src/ATen/native/cuda/fused_adam_utils.cuh``), in fp32 whatever the storage dtype::

    g = -g if maximize;  AdamW: p -= lr·wd·p;  Adam: g += wd·p
    m = β1·m + (1 - β1)·g;  v = β2·v + (1 - β2)·g²;  (amsgrad: v̂ = max(v̂, v), read v̂ below)
    p -= lr / (1 - β1ᵗ) · m / (√v / √(1 - β2ᵗ) + ε)        t = step[run]

Frozen entries of the parameter and of every state tensor are neither read nor written. One more tensor of the
same dtype and device (a *companion*: in a layer, its shared bias, which always trains; contiguous, with its own
device step count) can be updated by extra programs of the same launch, so a layer's whole optimizer step is this
one launch plus the multi-tensor add that advances the step counts. ``βᵗ`` is ``exp2(t·log2 β)`` with ``log2 β``
from the host (fp32 rounding of the bias corrections, as torch's kernel computes them in its fp32 ``opmath``).

Elementwise: no tensor cores; the ahead-of-time checks (tests/test_triton_aot.py) hold it to no spills and count
its launches. Never run on a GPU yet; tests/test_optim_policy.py checks it in Triton's CPU interpreter against torch's
optimizer on each block alone.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

__all__ = ["masked_adam_step", "TILE"]

TILE = {"BM": 8, "BN": 128, "BC": 1024, "num_warps": 4}  # elementwise: 1024 entries (8 per thread) a program


@triton.jit
def _adam_update(p_ptrs, g_ptrs, m_ptrs, v_ptrs, vmax_ptrs, sel, step, lr, log2_beta1, log2_beta2, beta1, beta2,
                 eps, wd, AMSGRAD: tl.constexpr, ADAMW: tl.constexpr, MAXIMIZE: tl.constexpr):
    p = tl.load(p_ptrs, mask=sel, other=0.0).to(tl.float32)
    g = tl.load(g_ptrs, mask=sel, other=0.0).to(tl.float32)
    m = tl.load(m_ptrs, mask=sel, other=0.0).to(tl.float32)
    v = tl.load(v_ptrs, mask=sel, other=0.0).to(tl.float32)
    if MAXIMIZE:
        g = -g
    if ADAMW:
        p = p - lr * wd * p
    else:
        g = g + wd * p
    m = beta1 * m + (1.0 - beta1) * g
    v = beta2 * v + (1.0 - beta2) * g * g
    # IEEE-rounded sqrt and division (tl.sqrt and / lower to approximate instructions on NVIDIA GPUs)
    step_size = tl.div_rn(lr, 1.0 - tl.exp2(step * log2_beta1))
    bc2_sqrt = tl.sqrt_rn(1.0 - tl.exp2(step * log2_beta2))
    if AMSGRAD:
        vmax = tl.maximum(tl.load(vmax_ptrs, mask=sel, other=0.0).to(tl.float32), v)
        tl.store(vmax_ptrs, vmax.to(vmax_ptrs.dtype.element_ty), mask=sel)
        denom = tl.div_rn(tl.sqrt_rn(vmax), bc2_sqrt) + eps
    else:
        denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    p = p - tl.div_rn(step_size * m, denom)
    tl.store(p_ptrs, p.to(p_ptrs.dtype.element_ty), mask=sel)
    tl.store(m_ptrs, m.to(m_ptrs.dtype.element_ty), mask=sel)
    tl.store(v_ptrs, v.to(v_ptrs.dtype.element_ty), mask=sel)


@triton.jit
def _masked_adam_kernel(
    p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, run_ptr, act_ptr, step_ptr,
    N, K, s_pn, s_pk, s_gn, s_gk, W_TILES, COL_TILES,
    c_ptr, cg_ptr, cm_ptr, cv_ptr, cvmax_ptr, c_step_ptr, C,
    lr, log2_beta1, log2_beta2, beta1, beta2, eps, wd,
    AXIS: tl.constexpr, HAS_C: tl.constexpr, AMSGRAD: tl.constexpr, ADAMW: tl.constexpr,
    MAXIMIZE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BC: tl.constexpr,
):
    """Programs [0, W_TILES): one [BM, BN] tile of the weight each (runs along rows, AXIS = 0, or columns, AXIS = 1);
    with HAS_C, programs from W_TILES on: BC entries of the companion each."""
    pid = tl.program_id(0)
    if pid < W_TILES:
        offs_m = (pid // COL_TILES) * BM + tl.arange(0, BM)
        offs_n = (pid % COL_TILES) * BN + tl.arange(0, BN)
        mm = offs_m < N
        mn = offs_n < K
        if AXIS == 0:
            run = tl.load(run_ptr + offs_m, mask=mm, other=0)
            on = (tl.load(act_ptr + run, mask=mm, other=0) != 0) & mm
            step = tl.load(step_ptr + run, mask=on, other=1.0)[:, None]
            sel = on[:, None] & mn[None, :]
        else:
            run = tl.load(run_ptr + offs_n, mask=mn, other=0)
            on = (tl.load(act_ptr + run, mask=mn, other=0) != 0) & mn
            step = tl.load(step_ptr + run, mask=on, other=1.0)[None, :]
            sel = mm[:, None] & on[None, :]
        if tl.max(on.to(tl.int32), axis=0) > 0:  # a wholly frozen tile touches nothing
            offs = offs_m[:, None] * s_pn + offs_n[None, :] * s_pk
            goffs = offs_m[:, None] * s_gn + offs_n[None, :] * s_gk
            _adam_update(p_ptr + offs, g_ptr + goffs, m_ptr + offs, v_ptr + offs, vmax_ptr + offs, sel, step, lr,
                         log2_beta1, log2_beta2, beta1, beta2, eps, wd, AMSGRAD, ADAMW, MAXIMIZE)
    elif HAS_C:
        c_offs = (pid - W_TILES) * BC + tl.arange(0, BC)  # (own names: Triton types a name once per function)
        c_sel = c_offs < C
        c_step = tl.load(c_step_ptr).to(tl.float32)
        _adam_update(c_ptr + c_offs, cg_ptr + c_offs, cm_ptr + c_offs, cv_ptr + c_offs, cvmax_ptr + c_offs, c_sel,
                     c_step, lr, log2_beta1, log2_beta2, beta1, beta2, eps, wd, AMSGRAD, ADAMW, MAXIMIZE)


def masked_adam_step(param: torch.Tensor, grad: torch.Tensor, state: tuple, run: torch.Tensor, act: torch.Tensor,
                     steps: torch.Tensor, *, axis: int, lr: float, betas: tuple, eps: float, weight_decay: float,
                     amsgrad: bool, adamw: bool, maximize: bool, companion: tuple | None = None) -> None:
    """One Adam/AdamW step of the active runs of ``param`` (2-D ``[N, K]``, updated in place with its state), and of
    ``companion`` if given, in one launch.

    ``state``: ``(exp_avg, exp_avg_sq, max_exp_avg_sq or None)``, each with ``param``'s shape and strides; ``grad``:
    any strides. ``run``: int32 ``[N]`` (``axis=0``) or ``[K]`` (``axis=1``), the run of each row / column; ``act``:
    int8 ``[R]``; ``steps``: fp32 ``[R]``, each run's step count including this step. ``companion``: ``(param,
    grad, exp_avg, exp_avg_sq, max_exp_avg_sq or None, step)``, contiguous tensors of ``param``'s dtype with a
    0-dim fp32 step count (including this step). All on one device."""
    N, K = param.shape
    m, v, vmax = state
    cfg = TILE
    col_tiles = triton.cdiv(K, cfg["BN"])
    w_tiles = triton.cdiv(N, cfg["BM"]) * col_tiles
    c = companion
    c_progs = triton.cdiv(c[0].numel(), cfg["BC"]) if c is not None else 0
    beta1, beta2 = (float(b) for b in betas)
    _masked_adam_kernel[(w_tiles + c_progs,)](
        param, grad, m, v, vmax if amsgrad else m, run, act, steps,
        N, K, param.stride(0), param.stride(1), grad.stride(0), grad.stride(1), w_tiles, col_tiles,
        *((c[0], c[1], c[2], c[3], c[4] if amsgrad else c[2], c[5], c[0].numel()) if c is not None
          else (param, grad, m, v, m, steps, 0)),
        float(lr), math.log2(beta1) if beta1 > 0 else -math.inf, math.log2(beta2) if beta2 > 0 else -math.inf,
        beta1, beta2, float(eps), float(weight_decay),
        AXIS=axis, HAS_C=c is not None, AMSGRAD=amsgrad, ADAMW=adamw, MAXIMIZE=maximize,
        BM=cfg["BM"], BN=cfg["BN"], BC=cfg["BC"], num_warps=cfg["num_warps"])
