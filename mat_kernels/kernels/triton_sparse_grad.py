"""Triton kernels of the sparse-update backward on a GPU: one launch for a layer's weight (and bias) gradient and one
for its partial-backpropagation input gradient, whatever the mask.

With the tokens flattened (``dY: [T, N]``, ``X: [T, K]``, ``W: [N, K]``) and the activity mask expanded to a 0/1
vector per axis of the weight (``rm: [N]`` rows, ``cm: [K]`` columns; the blocked axis carries the mask, the other
axis is all ones):

* ``_masked_weight_grad_kernel``: ``dW = (rm cmᵀ) ⊙ (dYᵀ X)`` and the bias gradient ``db = bm ⊙ Σ_t dY[t]``
  (``bm = rm`` for row blocks that own their bias entries, ones for a shared bias). A program owns one ``[BM, BN]``
  tile of dW; a tile with no active entry writes its zeros and does no GEMM work (its whole ``T`` loop is skipped),
  so the work follows the active tiles and frozen rows are written in the same pass (no separate fill). One extra
  column of programs sums dY for db, so weight and bias take one launch.
* ``_masked_input_grad_kernel``: ``dX = dY (rm cmᵀ ⊙ W)``. Row blocks contract over the active rows only: the
  program's loop runs over a *tile table* (the starts of the ``BK``-row tiles that hold an active row, an int32
  tensor kept on the device per mask), so frozen heads cost no loads and no MMAs and the loop has no branch.
  Column blocks: a ``[BM, BN]`` tile of dX over frozen columns writes zeros without a loop.

The masks and tile table are built on the host once per mask (the mask is a CPU tensor) and copied to the device
once (:func:`device_masks`); a step then launches with no host read and no host-to-device copy, which is also what a
CUDA-graph capture needs. The tile sizes are fixed per dtype (not autotuned: no GPU has run them yet); the
ahead-of-time checks (tests/test_triton_aot.py) hold them to no spills and tensor-core MMAs for TF32/bf16.

All accumulation is fp32; fp32 inputs use IEEE fp32 dots unless TF32 is allowed
(``torch.backends.cuda.matmul.allow_tf32``, what ``F.linear`` follows), bf16/fp16 use tensor-core dots.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["masked_weight_grad", "masked_input_grad", "device_masks", "tile_config"]


def _precision(dtype: torch.dtype, allow_tf32: bool) -> str:
    return "ieee" if (dtype == torch.float32 and not allow_tf32) else "tf32"


def tile_config(dtype: torch.dtype, axis: int = 0, kernel: str = "input") -> dict:
    """Tile sizes, warps and stages of ``kernel`` (``"weight"``: dW + db, ``"input"``: the detach dX) for inputs of
    ``dtype`` and blocks along ``axis`` of the weight (0 rows, 1 columns); fixed (see the module docstring).

    A tile is skipped only when every row (column) it covers is frozen, so along the blocked axis the tiles are 64
    wide, one head of BERT-base-like layers: with 128-wide tiles an interleaved mask (every other head) left no tile
    wholly frozen and a half-active layer did all of its dW work (``benchmarks/triton_static.py --workload sparse``
    counts the tiles each mask computes)."""
    cfg = {"BM": 128, "BN": 64, "BK": 32, "num_warps": 8, "num_stages": 3} if dtype == torch.float32 else \
        {"BM": 128, "BN": 128, "BK": 64, "num_warps": 8, "num_stages": 3}
    if kernel not in ("weight", "input"):
        raise ValueError(f"kernel must be 'weight' or 'input', got {kernel!r}")
    if axis == 0 and kernel == "weight":
        # dW rows (the input kernel's BM is tokens; its contraction tiles over rows are BK = 64/32): one warpgroup
        # per 64-row wgmma tile
        cfg["BM"], cfg["num_warps"] = 64, 4
    elif axis == 1:
        cfg["BN"] = 64  # dW columns / dX columns
    return cfg


@triton.jit
def _masked_weight_grad_kernel(
    dy_ptr, x_ptr, rm_ptr, cm_ptr, bm_ptr, dw_ptr, db_ptr,
    T, N, K, N_COL_TILES,
    s_dyt, s_dyn, s_xt, s_xk, s_wn, s_wk,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BT: tl.constexpr,
):
    """One [BM, BN] tile of dW = (rm cmᵀ) ⊙ (dYᵀ X); with HAS_BIAS, the programs of one extra column of tiles
    (pid_n == N_COL_TILES) write db = bm ⊙ Σ_t dY instead (bm: rm for bias entries owned by row blocks, ones for a
    shared bias), so dW and db take one launch."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BM + tl.arange(0, BM)
    mm = offs_m < N
    if HAS_BIAS and pid_n == N_COL_TILES:
        bm = tl.load(bm_ptr + offs_m, mask=mm, other=0).to(tl.float32)
        bsum = tl.zeros((BM,), dtype=tl.float32)
        if tl.max(bm, axis=0) > 0:
            for t0 in range(0, T, BT):
                offs_t = t0 + tl.arange(0, BT)
                a = tl.load(dy_ptr + offs_m[:, None] * s_dyn + offs_t[None, :] * s_dyt,
                            mask=mm[:, None] & (offs_t < T)[None, :], other=0.0)
                bsum += tl.sum(a.to(tl.float32), axis=1)
        tl.store(db_ptr + offs_m, (bsum * bm).to(db_ptr.dtype.element_ty), mask=mm)
    else:
        offs_n = pid_n * BN + tl.arange(0, BN)
        mn = offs_n < K
        rm = tl.load(rm_ptr + offs_m, mask=mm, other=0).to(tl.float32)
        cm = tl.load(cm_ptr + offs_n, mask=mn, other=0).to(tl.float32)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        if tl.max(rm, axis=0) * tl.max(cm, axis=0) > 0:  # a wholly frozen tile skips its whole T loop
            for t0 in range(0, T, BT):
                offs_t = t0 + tl.arange(0, BT)
                mt = offs_t < T
                a = tl.load(dy_ptr + offs_m[:, None] * s_dyn + offs_t[None, :] * s_dyt,
                            mask=mm[:, None] & mt[None, :], other=0.0)  # dYᵀ tile [BM, BT]
                b = tl.load(x_ptr + offs_t[:, None] * s_xt + offs_n[None, :] * s_xk,
                            mask=mt[:, None] & mn[None, :], other=0.0)  # X tile [BT, BN]
                acc = tl.dot(a, b, acc, input_precision=PRECISION)
        acc = acc * rm[:, None] * cm[None, :]
        tl.store(dw_ptr + offs_m[:, None] * s_wn + offs_n[None, :] * s_wk, acc.to(dw_ptr.dtype.element_ty),
                 mask=mm[:, None] & mn[None, :])


@triton.jit(do_not_specialize=["n_tiles"])  # the table's length changes with the mask: no recompilation
def _masked_input_grad_kernel(
    dy_ptr, w_ptr, tiles_ptr, n_tiles, rm_ptr, cm_ptr, dx_ptr,
    T, N, K,
    s_dyt, s_dyn, s_wn, s_wk, s_xt, s_xk,
    PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """One [BM, BN] tile of dX = dY (rm cmᵀ ⊙ W), contracting over the n_tiles row tiles of the table only."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BM + tl.arange(0, BM)  # tokens
    offs_n = pid_n * BN + tl.arange(0, BN)  # input features
    mm = offs_m < T
    mn = offs_n < K
    cm = tl.load(cm_ptr + offs_n, mask=mn, other=0).to(tl.float32)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    if tl.max(cm, axis=0) > 0:  # a tile of frozen columns skips its loop
        for i in range(0, n_tiles):
            k0 = tl.load(tiles_ptr + i)
            offs_k = k0 + tl.arange(0, BK)
            mk = offs_k < N
            rm = tl.load(rm_ptr + offs_k, mask=mk, other=0)
            a = tl.load(dy_ptr + offs_m[:, None] * s_dyt + offs_k[None, :] * s_dyn,
                        mask=mm[:, None] & mk[None, :], other=0.0)  # dY tile [BM, BK]
            b = tl.load(w_ptr + offs_k[:, None] * s_wn + offs_n[None, :] * s_wk,
                        mask=mk[:, None] & mn[None, :] & (rm[:, None] != 0), other=0.0)  # frozen rows read as 0
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
    acc = acc * cm[None, :]
    tl.store(dx_ptr + offs_m[:, None] * s_xt + offs_n[None, :] * s_xk, acc.to(dx_ptr.dtype.element_ty),
             mask=mm[:, None] & mn[None, :])


def device_masks(rows: torch.Tensor, cols: torch.Tensor, device: torch.device, block_k: int, axis: int = 0) -> dict:
    """The device tensors of one mask: ``rm`` / ``cm`` (int8 0/1 per row / column of the weight) and ``tiles``
    (int32 starts of the ``block_k``-row tiles holding an active row) with its length ``n_tiles`` (a host int), and
    the blocked ``axis`` (the tiles follow it). ``rows``/``cols`` are the host (CPU bool) expansions of the mask;
    build once per mask and keep."""
    starts = torch.arange(0, rows.numel(), block_k)
    if rows.numel():
        padded = torch.nn.functional.pad(rows, (0, (-rows.numel()) % block_k)).view(-1, block_k)
        starts = starts[padded.any(1)]
    tiles = starts.to(torch.int32)
    return {"rm": rows.to(torch.int8).to(device), "cm": cols.to(torch.int8).to(device),
            "ones": torch.ones(rows.numel(), dtype=torch.int8, device=device),
            "tiles": (tiles if tiles.numel() else torch.zeros(1, dtype=torch.int32)).to(device),
            "n_tiles": int(tiles.numel()), "axis": axis}


def masked_weight_grad(dy: torch.Tensor, x: torch.Tensor, masks: dict, *, bias: str | None, allow_tf32: bool
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(dW [N, K], db [N] or None)`` in one launch. ``dy: [T, N]``, ``x: [T, K]`` (2-D, any strides, same dtype and
    device); ``masks`` from :func:`device_masks`; ``bias``: None (no bias gradient), ``"own"`` (row blocks own their
    bias entries: ``db = rm ⊙ Σ_t dY``) or ``"shared"`` (the full ``Σ_t dY``)."""
    T, N = dy.shape
    K = x.shape[1]
    dw = torch.empty((N, K), dtype=dy.dtype, device=dy.device)
    db = torch.empty((N,), dtype=dy.dtype, device=dy.device) if bias else dw
    cfg = tile_config(dy.dtype, masks["axis"], "weight")
    col_tiles = triton.cdiv(K, cfg["BN"])
    grid = (triton.cdiv(N, cfg["BM"]), col_tiles + (1 if bias else 0))
    _masked_weight_grad_kernel[grid](
        dy, x, masks["rm"], masks["cm"], masks["ones"] if bias == "shared" else masks["rm"], dw, db, T, N, K,
        col_tiles, dy.stride(0), dy.stride(1), x.stride(0), x.stride(1), dw.stride(0), dw.stride(1),
        HAS_BIAS=bias is not None, PRECISION=_precision(dy.dtype, allow_tf32), BM=cfg["BM"], BN=cfg["BN"],
        BT=cfg["BK"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return dw, (db if bias else None)


def masked_input_grad(dy: torch.Tensor, w: torch.Tensor, masks: dict, *, allow_tf32: bool) -> torch.Tensor:
    """``dX [T, K] = dY (M ⊙ W)`` in one launch. ``dy: [T, N]``, ``w: [N, K]`` (2-D, any strides, same dtype and
    device); ``masks`` from :func:`device_masks` (built with this dtype's ``tile_config(...)["BK"]``)."""
    T, N = dy.shape
    K = w.shape[1]
    dx = torch.empty((T, K), dtype=dy.dtype, device=dy.device)
    cfg = tile_config(dy.dtype, masks["axis"], "input")
    grid = (triton.cdiv(T, cfg["BM"]), triton.cdiv(K, cfg["BN"]))
    _masked_input_grad_kernel[grid](
        dy, w, masks["tiles"], masks["n_tiles"], masks["rm"], masks["cm"], dx, T, N, K,
        dy.stride(0), dy.stride(1), w.stride(0), w.stride(1), dx.stride(0), dx.stride(1),
        PRECISION=_precision(dy.dtype, allow_tf32), BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return dx
