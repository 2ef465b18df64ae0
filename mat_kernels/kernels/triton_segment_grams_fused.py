"""The one-launch per-sample-gradient + Gram kernels of ``segment_grams``' psg route, and the byte model that
predicts their time and the two-kernel route's (:mod:`mat_kernels.kernels.triton_segment_grams`), by which the
Gram dispatcher (:mod:`mat_kernels.ops.gram_dispatch`) ranks them. See NOTES.md §7.

* fused (``_psg_gram_fused_kernel``, n ≤ 32): every sample's gradient tile in registers (batched 3-D dot), small
  tiles; nothing per sample leaves the SM.
* tile-local (``_psg_gram_local_kernel``, n ≤ 64): persistent programs; one sample's gradient tile at a time by a
  2-D dot (wgmma-sized: 64 × 64), written to the program's own slot of a small scratch and reduced into the
  ``[n, n]`` Gram by the same program right after (L2-resident re-read). One launch per layout, scratch bounded.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from mat_kernels.backend import device_ints as _device_ints
from mat_kernels.kernels import triton_autotune as autotune
from mat_kernels.kernels.triton_autotune import Config, config
from mat_kernels.kernels.triton_segment_grams import precision, sm_count

__all__ = ["FUSED_MAX_N", "LOCAL_MAX_N", "psg_seconds", "fused_segment_grams", "local_segment_grams"]

FUSED_MAX_N = 32
LOCAL_MAX_N = 64
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


@triton.jit
def _psg_gram_local_kernel(
    a_ptr, b_ptr, tile_src_ptr, tile_cnt_ptr, tile_own_ptr, work_ptr, out_ptr,
    n, T, DA, n_work, n_ctiles,
    sa_n, sa_t, sa_d, sb_n, sb_t, sb_d, so_m, so_i, so_j,
    ADD_ONE: tl.constexpr, PRECISION: tl.constexpr, GRAM_PRECISION: tl.constexpr,
    NP: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
):
    """out[own] += G Gᵀ for each (row tile R, column tile C) this persistent program takes (work items
    pid, pid + programs, ...): G_i[R, C] = Σ_t b_it[R] a_itᵀ[C] one sample at a time (2-D dot), stored in the
    program's slot ``work[pid]`` (``[NP, BR·BC]``), then the slot's ``[NP, NP]`` Gram added into module ``own``.
    The bias column (c = DA) is the row sum of b."""
    pid = tl.program_id(0)
    slot = work_ptr + pid.to(tl.int64) * (NP * BR * BC)
    offs_r = tl.arange(0, BR)
    offs_cl = tl.arange(0, BC)
    offs_n = tl.arange(0, NP)
    mn = offs_n < n
    offs_k = tl.arange(0, BK)
    flat = offs_r[:, None] * BC + offs_cl[None, :]
    for w in range(pid, n_work, tl.num_programs(0)):
        tr = w // n_ctiles
        tc = w % n_ctiles
        src = tl.load(tile_src_ptr + tr)
        mr = offs_r < tl.load(tile_cnt_ptr + tr)
        own = tl.load(tile_own_ptr + tr).to(tl.int64)
        offs_c = tc * BC + offs_cl
        mc = offs_c < DA
        bias_tile = ADD_ONE and (tc + 1) * BC > DA
        a_i = a_ptr + offs_c[None, :] * sa_d  # sample i's pointers, advanced per sample (64-bit arithmetic)
        b_i = b_ptr + (src + offs_r)[:, None] * sb_d
        s_i = slot + flat
        for _ in range(0, n):
            acc = tl.zeros((BR, BC), dtype=tl.float32)
            rs = tl.zeros((BR,), dtype=tl.float32)
            for t0 in range(0, T, BT):
                offs_t = t0 + tl.arange(0, BT)
                mt = offs_t < T
                bt = tl.load(b_i + offs_t[None, :] * sb_t, mask=mr[:, None] & mt[None, :], other=0.0)
                at = tl.load(a_i + offs_t[:, None] * sa_t, mask=mt[:, None] & mc[None, :], other=0.0)
                acc = tl.dot(bt, at, acc, input_precision=PRECISION)
                if bias_tile:  # the bias column: row sum of b beside the dot
                    rs += tl.sum(bt.to(tl.float32), axis=1)
            if bias_tile:
                acc = tl.where((offs_c == DA)[None, :], rs[:, None], acc)
            tl.store(s_i, acc.to(work_ptr.dtype.element_ty))
            a_i += sa_n
            b_i += sb_n
            s_i += BR * BC
        tl.debug_barrier()  # the slot's tiles, written by every thread of the program, are read below
        gram = tl.zeros((NP, NP), dtype=tl.float32)
        for k0 in range(0, BR * BC, BK):
            g = tl.load(slot + offs_n[:, None] * (BR * BC) + k0 + offs_k[None, :], mask=mn[:, None], other=0.0)
            gram = tl.dot(g, tl.trans(g), gram, input_precision=GRAM_PRECISION)
        tl.atomic_add(out_ptr + own * so_m + offs_n[:, None] * so_i + offs_n[None, :] * so_j, gram,
                      mask=mn[:, None] & mn[None, :])
        tl.debug_barrier()  # every read of the slot is done before the next work item rewrites it


# Tile-local kernel: 64 x 64 tiles (a wgmma-sized 2-D dot per sample), the default first; the others timed on a
# GPU. Tensor-core dots (TF32, bf16) compile without spills at 2 stages (sm_90: 242 registers TF32, 152 bf16;
# sm_80: 255 and 201); IEEE fp32 (FFMA) spills at 2 stages and not at 1 (sm_90: 127 registers). NOTES.md §7.
_LOCAL_CANDIDATES = {
    "tc": [config(4, 2, BR=64, BC=64, BT=32, BK=64), config(4, 3, BR=64, BC=64, BT=32, BK=64),
           config(8, 2, BR=64, BC=64, BT=32, BK=64), config(4, 2, BR=64, BC=32, BT=32, BK=64)],
    "ieee": [config(4, 1, BR=64, BC=64, BT=32, BK=64), config(8, 2, BR=64, BC=64, BT=32, BK=32),
             config(4, 2, BR=64, BC=32, BT=32, BK=64), config(8, 1, BR=64, BC=64, BT=32, BK=64)],
}


def local_candidates(prec: str) -> list[Config]:
    """The tile-local kernel's candidate configurations for dot precision ``prec`` (default first)."""
    return _LOCAL_CANDIDATES["ieee" if prec == "ieee" else "tc"]


# Ceilings of the byte model below (H100 SXM; HBM measured on this workplace's H100, L2 an assumed ~5.5 TB/s from
# published microbenchmarks) and a per-launch cost. Not yet checked on a GPU: benchmarks/gpu_check.sh times both
# variants (NOTES.md §7).
_HBM_BYTES_PER_S = 3.0e12
_L2_BYTES_PER_S = 5.5e12
_LAUNCH_S = 4e-6
_SMS = 132


L2_RESIDENT_BYTES = 25 << 20  # half an H100's L2 (one partition): live slots beyond it are counted in HBM


def local_programs(work: int, slot_bytes: int, scratch_bytes: int, sm: int) -> int:
    """Programs of the tile-local kernel: one per work item, at most two per SM, and as many slots as
    ``scratch_bytes`` holds (at least one, even when one slot exceeds it)."""
    return min(work, max(1, scratch_bytes // slot_bytes), 2 * sm)


def psg_seconds(n: int, T: int, DA1: int, DB: int, esize: int, scratch_bytes: int = 48 << 20) -> dict:
    """Predicted seconds of each psg variant from the bytes it moves (a prediction from assumed ceilings, not yet
    checked on a GPU: ``benchmarks/bench_psg_variants.py``); the Gram dispatcher
    (:mod:`mat_kernels.ops.gram_dispatch`) ranks the Triton psg kernels by it.

    * fused (n ≤ 32): re-reads its input tiles from L2, once per row tile and per column tile (small tiles);
    * tile-local (n ≤ 64): input tiles re-read at 64 × 64 tiles, plus the slots written and read back (from L2
      while the live slots fit half the L2, else HBM); fewer programs than SMs slow it proportionally;
    * two-kernel: fp32 per-sample gradients to a scratch in HBM and back, in chunks, two launches per chunk.

    Args: n samples, T tokens, DA1 shared width (+1 with a bias), DB summed segment width, esize input bytes.
    Returns: ``{"fused": s, "local": s, "two-kernel": s, "chunks": scratch chunks of the two-kernel route}``
    (None for a variant that cannot run at this n).
    """
    scratch = n * DB * DA1 * 4
    chunks = max(1, triton.cdiv(scratch, scratch_bytes))
    two_l2 = triton.cdiv(DB, 64) * triton.cdiv(DA1, 64) * n * 128 * T * esize
    two_s = max(2 * scratch / _HBM_BYTES_PER_S, two_l2 / _L2_BYTES_PER_S) + (2 * chunks + 3) * _LAUNCH_S
    fused_s = local_s = None
    if n <= FUSED_MAX_N:
        tiles = dict(_FUSED_CANDIDATES[max(16, triton.next_power_of_2(n))][0].tiles)
        BR, BC = tiles["BR"], tiles["BC"]
        fused_l2 = (triton.cdiv(DB, BR) * n * T * DA1 + triton.cdiv(DA1, BC) * n * T * DB) * esize
        fused_s = fused_l2 / _L2_BYTES_PER_S + _LAUNCH_S
    if n <= LOCAL_MAX_N:
        c = dict(local_candidates("tf32")[0].tiles)  # the same tiles for every precision
        work = triton.cdiv(DB, c["BR"]) * triton.cdiv(DA1, c["BC"])
        slot_bytes = max(16, triton.next_power_of_2(n)) * c["BR"] * c["BC"] * esize  # slots in the inputs' dtype
        programs = local_programs(work, slot_bytes, scratch_bytes, _SMS)
        slots = 2 * work * n * c["BR"] * c["BC"] * esize
        l2 = work * n * T * (c["BR"] + c["BC"]) * esize + slots
        hbm = slots if programs * slot_bytes > L2_RESIDENT_BYTES else 0
        local_s = max(l2 / _L2_BYTES_PER_S, hbm / _HBM_BYTES_PER_S) * max(1.0, _SMS / programs) + _LAUNCH_S
    return {"fused": fused_s, "local": local_s, "two-kernel": two_s, "chunks": chunks}


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


def _prologue(kind: str, a, seg_owners, out, allow_tf32: bool, max_n: int):
    """(n, T, DA, padded n, the zeroed or given output, dot precision) of a one-launch kernel; n checked."""
    n, T, DA = a.shape
    if n > max_n:
        raise ValueError(f"the {kind} kernel serves at most {max_n} samples, got n = {n}")
    if out is None:
        out = torch.zeros(1 + max(seg_owners), n, n, dtype=torch.float32, device=a.device)
    return n, T, DA, max(16, triton.next_power_of_2(n)), out, precision(a.dtype, allow_tf32)


def _tuned_launch(kind: str, launch, candidates, a, seg_sizes, add_one: bool, NP: int, prec: str, out):
    """Launch with the configuration tuned for this key (the default one off a GPU); timing runs write to a
    scratch output made only when the key is tuned, never per call."""
    _, T, DA = a.shape
    key = (NP, triton.next_power_of_2(T), DA, sum(seg_sizes), add_one, str(a.dtype), prec)
    scratch: list[torch.Tensor] = []

    def timed_launch(c: Config, warmup: bool):
        if not scratch:
            scratch.append(torch.zeros_like(out))
        return launch(c, warmup, target=scratch[0])

    launch(autotune.pick(kind, key, candidates, timed_launch, a.device), False)
    return out


def fused_segment_grams(a, b, seg_starts, seg_sizes, seg_owners, *, add_one: bool, allow_tf32: bool,
                        out: torch.Tensor | None = None) -> torch.Tensor:
    """Module Grams ``[M, n, n]`` (fp32, M = 1 + max owner) by the fused kernel, for n ≤ :data:`FUSED_MAX_N`:
    one launch, no scratch, the segments of a module summed by the kernel itself. ``out`` (zeros ``[M, n, n]``,
    fp32) is accumulated into when given (results written in place)."""
    n, T, DA, NP, out, prec = _prologue("fused", a, seg_owners, out, allow_tf32, FUSED_MAX_N)
    dev = a.device

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

    return _tuned_launch("fused", launch, _FUSED_CANDIDATES[NP], a, seg_sizes, add_one, NP, prec, out)


def local_segment_grams(a, b, seg_starts, seg_sizes, seg_owners, *, add_one: bool, allow_tf32: bool,
                        scratch_bytes: int = 48 << 20, out: torch.Tensor | None = None) -> torch.Tensor:
    """Module Grams ``[M, n, n]`` (fp32, M = 1 + max owner) by the tile-local kernel, for n ≤ :data:`LOCAL_MAX_N`:
    one launch; a scratch of one ``[NP, BR·BC]`` slot per program in the inputs' dtype, at most ``scratch_bytes``
    (fewer programs if needed; one slot even when that exceeds it). ``out`` (zeros ``[M, n, n]``, fp32) is
    accumulated into when given."""
    n, T, DA, NP, out, prec = _prologue("tile-local", a, seg_owners, out, allow_tf32, LOCAL_MAX_N)
    dev = a.device
    work_dtype = a.dtype  # fp32 slots for fp32 inputs, 16-bit slots for bf16/fp16 (the Gram accumulates in fp32)

    def launch(cfg: Config, warmup: bool, target=None):
        c = cfg.kwargs()
        src, cnt, own = _fused_tiles(tuple(seg_starts), tuple(seg_sizes), tuple(seg_owners), c["BR"])
        dst = out if target is None else target
        n_ctiles = triton.cdiv(DA + int(add_one), c["BC"])
        n_work = len(src) * n_ctiles
        slot_elems = NP * c["BR"] * c["BC"]
        programs = local_programs(n_work, slot_elems * a.element_size(), scratch_bytes, sm_count(dev))
        work = torch.empty(programs * slot_elems, dtype=work_dtype, device=dev)  # caching allocator: no cudaMalloc
        args = (a, b, _device_ints(src, dev), _device_ints(cnt, dev), _device_ints(own, dev), work, dst,
                n, T, DA, n_work, n_ctiles, *a.stride(), *b.stride(), *dst.stride())
        kw = dict(ADD_ONE=add_one, PRECISION=prec, GRAM_PRECISION=precision(work_dtype, prec == "tf32"), NP=NP, **c)
        if warmup:
            return _psg_gram_local_kernel.warmup(*args, grid=(programs,), **kw)
        return _psg_gram_local_kernel[(programs,)](*args, **kw)

    return _tuned_launch("local", launch, local_candidates(prec), a, seg_sizes, add_one, NP, prec, out)
