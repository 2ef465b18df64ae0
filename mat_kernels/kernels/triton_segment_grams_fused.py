"""The fused per-sample-gradient + Gram kernel of ``segment_grams``' psg route (small n), and the byte model that
chooses between it and the two-kernel route (:mod:`mat_kernels.kernels.triton_segment_grams`). See NOTES.md §7."""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from mat_kernels._backend import device_ints as _device_ints
from mat_kernels.kernels import triton_autotune as autotune
from mat_kernels.kernels.triton_autotune import Config, config
from mat_kernels.kernels.triton_segment_grams import precision

__all__ = ["FUSED_MAX_N", "psg_plan", "fused_segment_grams"]

FUSED_MAX_N = 32
# Candidates per padded sample count, the default first: the largest tiles that compile without spills on sm_90
# and sm_80 for IEEE fp32, TF32 and bf16 (tests/test_triton_aot.py checks the defaults; NOTES.md §7). On a GPU the
# others are timed once per shape and dtype, those that spill pruned (mat_kernels.kernels.triton_autotune).
_FUSED_CANDIDATES = {
    16: [config(8, 2, BR=32, BC=32, BT=16), config(8, 3, BR=32, BC=32, BT=16), config(4, 2, BR=16, BC=32, BT=16),
         config(8, 2, BR=32, BC=32, BT=32)],
    32: [config(8, 2, BR=16, BC=16, BT=16), config(8, 3, BR=16, BC=16, BT=16), config(8, 2, BR=16, BC=32, BT=16),
         config(4, 2, BR=16, BC=16, BT=16)],
}


@triton.jit
def _psg_gram_fused_kernel(
    a_ptr, b_ptr, tile_src_ptr, tile_cnt_ptr, tile_own_ptr, out_ptr,
    n, T, DA,
    sa_n, sa_t, sa_d, sb_n, sb_t, sb_d, so_m, so_i, so_j,
    ADD_ONE: tl.constexpr, PRECISION: tl.constexpr, GRAM_PRECISION: tl.constexpr,
    NP: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, BT: tl.constexpr,
):
    """out[own] += G Gᵀ for the tiles G_i[R, C] of all n samples of one row tile R and one column tile C.

    The per-sample gradient tiles accumulate in registers through one batched dot ``[NP, BR, BT] @ [NP, BT, BC]``
    per token step and are reduced straight into an ``[NP, NP]`` partial Gram (one ``[NP, BR·BC]`` dot with its
    transpose): nothing per-sample reaches global memory. The bias column (c = DA) is the row sum of b."""
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    src = tl.load(tile_src_ptr + pid_r)
    cnt = tl.load(tile_cnt_ptr + pid_r)
    own = tl.load(tile_own_ptr + pid_r).to(tl.int64)
    offs_n = tl.arange(0, NP)
    mn = offs_n < n
    n64 = offs_n.to(tl.int64)
    offs_r = tl.arange(0, BR)
    mr = offs_r < cnt
    offs_c = pid_c * BC + tl.arange(0, BC)
    mc = offs_c < DA
    bias_tile = ADD_ONE and (pid_c + 1) * BC > DA
    acc = tl.zeros((NP, BR, BC), dtype=tl.float32)
    rs = tl.zeros((NP, BR), dtype=tl.float32)
    for t0 in range(0, T, BT):
        offs_t = t0 + tl.arange(0, BT)
        mt = offs_t < T
        bt = tl.load(b_ptr + n64[:, None, None] * sb_n + (src + offs_r)[None, :, None] * sb_d
                     + offs_t[None, None, :] * sb_t,
                     mask=mn[:, None, None] & mr[None, :, None] & mt[None, None, :], other=0.0)
        at = tl.load(a_ptr + n64[:, None, None] * sa_n + offs_t[None, :, None] * sa_t
                     + offs_c[None, None, :] * sa_d,
                     mask=mn[:, None, None] & mt[None, :, None] & mc[None, None, :], other=0.0)
        acc = tl.dot(bt, at, acc, input_precision=PRECISION)
        if bias_tile:
            rs += tl.sum(bt.to(tl.float32), axis=2)
    if bias_tile:
        acc = tl.where((offs_c == DA)[None, None, :], rs[:, :, None], acc)
    g = tl.reshape(acc, (NP, BR * BC))
    gram = tl.dot(g, tl.trans(g), input_precision=GRAM_PRECISION)
    tl.atomic_add(out_ptr + own * so_m + offs_n[:, None] * so_i + offs_n[None, :] * so_j, gram,
                  mask=mn[:, None] & mn[None, :])


# Ceilings of the chooser below (H100 SXM; HBM measured on this workplace's H100, L2 an assumed ~5.5 TB/s from
# published microbenchmarks) and a per-launch cost. Not yet checked on a GPU: benchmarks/gpu_check.sh times both
# variants (NOTES.md §7).
_HBM_BYTES_PER_S = 3.0e12
_L2_BYTES_PER_S = 5.5e12
_LAUNCH_S = 4e-6


def psg_plan(n: int, T: int, DA1: int, DB: int, esize: int, scratch_bytes: int = 48 << 20) -> dict:
    """Which psg variant runs, and why: predicted seconds of the fused kernel and of the two-kernel route from the
    bytes each moves (the fused kernel re-reads its input tiles from L2, once per row tile and per column tile;
    the two-kernel route writes fp32 per-sample gradients to a scratch in HBM and reads them back, in chunks).

    Args: n samples, T tokens, DA1 shared width (+1 with a bias), DB summed segment width, esize input bytes.
    Returns: ``{"kernel": "fused" | "two-kernel", "fused_s": ..., "two_kernel_s": ..., "reason": ...}``.
    """
    if n > FUSED_MAX_N:
        return {"kernel": "two-kernel", "fused_s": None, "two_kernel_s": None,
                "reason": f"n = {n} > FUSED_MAX_N = {FUSED_MAX_N} (the fused kernel holds all samples in registers)"}
    tiles = dict(_FUSED_CANDIDATES[max(16, triton.next_power_of_2(n))][0].tiles)
    BR, BC = tiles["BR"], tiles["BC"]
    fused_l2 = (triton.cdiv(DB, BR) * n * T * DA1 + triton.cdiv(DA1, BC) * n * T * DB) * esize
    fused_s = fused_l2 / _L2_BYTES_PER_S + _LAUNCH_S
    scratch = n * DB * DA1 * 4
    chunks = max(1, triton.cdiv(scratch, scratch_bytes))
    two_l2 = triton.cdiv(DB, 64) * triton.cdiv(DA1, 64) * n * 128 * T * esize
    two_s = max(2 * scratch / _HBM_BYTES_PER_S, two_l2 / _L2_BYTES_PER_S) + (2 * chunks + 3) * _LAUNCH_S
    kernel = "fused" if fused_s <= two_s else "two-kernel"
    return {"kernel": kernel, "fused_s": fused_s, "two_kernel_s": two_s,
            "reason": f"predicted {fused_s * 1e6:.0f} us fused (L2 re-reads) vs {two_s * 1e6:.0f} us two-kernel "
                      f"(scratch round trip, {chunks} chunk(s))"}


@functools.lru_cache(maxsize=256)
def _fused_tiles(seg_starts: tuple, seg_sizes: tuple, seg_owners: tuple, BR: int):
    """Row tiles of at most BR rows inside each segment, with the module each tile's Gram adds into."""
    src, cnt, own = [], [], []
    for start, size, owner in zip(seg_starts, seg_sizes, seg_owners):
        for r0 in range(0, size, BR):
            src.append(start + r0)
            cnt.append(min(BR, size - r0))
            own.append(owner)
    return tuple(src), tuple(cnt), tuple(own)


def fused_segment_grams(a, b, seg_starts, seg_sizes, seg_owners, *, add_one: bool, allow_tf32: bool,
                        out: torch.Tensor | None = None) -> torch.Tensor:
    """Module Grams ``[M, n, n]`` (fp32, M = 1 + max owner) by the fused kernel, for n ≤ :data:`FUSED_MAX_N`:
    one launch, no scratch, the segments of a module summed by the kernel itself. ``out`` (zeros ``[M, n, n]``,
    fp32) is accumulated into when given (results written in place)."""
    n, T, DA = a.shape
    if n > FUSED_MAX_N:
        raise ValueError(f"the fused kernel holds at most {FUSED_MAX_N} samples in registers, got n = {n}")
    NP = max(16, triton.next_power_of_2(n))
    M = 1 + max(seg_owners)
    if out is None:
        out = torch.zeros(M, n, n, dtype=torch.float32, device=a.device)
    dev = a.device
    prec = precision(a.dtype, allow_tf32)

    def launch(cfg: Config, warmup: bool, target=None):
        c = cfg.kwargs()
        src, cnt, own = _fused_tiles(tuple(seg_starts), tuple(seg_sizes), tuple(seg_owners), c["BR"])
        dst = out if target is None else target
        grid = (len(src), triton.cdiv(DA + int(add_one), c["BC"]))
        args = (a, b, _device_ints(src, dev), _device_ints(cnt, dev), _device_ints(own, dev), dst,
                n, T, DA, *a.stride(), *b.stride(), *dst.stride())
        kw = dict(ADD_ONE=add_one, PRECISION=prec, GRAM_PRECISION=precision(torch.float32, prec == "tf32"),
                  NP=NP, **c)
        if warmup:
            return _psg_gram_fused_kernel.warmup(*args, grid=grid, **kw)
        return _psg_gram_fused_kernel[grid](*args, **kw)

    key = (NP, triton.next_power_of_2(T), DA, sum(seg_sizes), add_one, str(a.dtype), prec)
    scratch: list[torch.Tensor] = []  # the timing runs' output, made only if this key is tuned (not per call)

    def timed_launch(c: Config, warmup: bool):
        if not scratch:
            scratch.append(torch.zeros_like(out))
        return launch(c, warmup, target=scratch[0])

    cfg = autotune.pick("fused", key, _FUSED_CANDIDATES[NP], timed_launch, dev)
    launch(cfg, False)
    return out
