"""Triton kernels for per-segment Grams of per-sample gradients of one linear layer.

Notation (docs/maths.md). The layer sees, per sample i and token t, a *shared-side* vector ``a_it`` (length DA) and a
*segmented-side* vector ``b_it`` (length DB). For row blocks (heads' Q/K/V rows) ``a = x`` and ``b = dy``; for
column blocks (a head's columns of an output projection) the roles swap: ``a = dy``, ``b = x``. A segment is a
contiguous range R of the segmented side; its per-sample gradient is ``G_i[R] = Σ_t b_it[R] a_itᵀ`` and the kernels
return ``Θ_R[i, j] = ⟨G_i[R], G_j[R]⟩`` for every segment at once. With ``ADD_ONE`` the shared side is extended by a
constant 1 (that column of G is the bias gradient ``Σ_t b_it[R]``).

Two exact routes:

* ghost (``_ghost_gram_fwd_kernel``): ``Θ_R[i, j] = Σ_{t,s} (a_it·a_js)(b_it[R]·b_js[R])``. A program owns one
  sample pair (i ≥ j) and one (t, s) tile; it builds the token-pair tile ``P = A_i A_jᵀ`` once and reuses it for
  every segment of the layer, so the shared-side work is paid once per layer, not once per head. Nothing of size
  ``[n, n, T, T]`` is ever stored: each program reduces its tile to one scalar per segment.
* per-sample gradient (``_psg_fwd_kernel`` then ``_segment_gram_fwd_kernel``): per-sample gradient tiles of a
  chunk of shared-side columns go to a bounded scratch buffer, then a Gram kernel reduces each segment's tiles over
  all pairs of sample blocks. Chunking keeps the scratch under a byte budget whatever the layer size.

All accumulation is fp32. fp32 inputs use IEEE fp32 dots unless ``allow_tf32``; bf16/fp16 inputs use tensor-core
dots with fp32 accumulation.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from mat_kernels.backend import device_ints as _device_ints
from mat_kernels.backend import interpreter_enabled
from mat_kernels.kernels import triton_autotune as autotune
from mat_kernels.kernels.triton_autotune import Config, config

_MAX_TILE = 64


def _tile(size: int, cap: int = _MAX_TILE) -> int:
    # tl.dot needs every dimension >= 16.
    return max(16, min(cap, triton.next_power_of_2(max(int(size), 1))))


def precision(dtype: torch.dtype, allow_tf32: bool) -> str:
    """``input_precision`` of ``tl.dot`` for inputs of ``dtype``: IEEE for fp32 unless TF32 is allowed."""
    return "ieee" if (dtype == torch.float32 and not allow_tf32) else "tf32"


@functools.lru_cache(maxsize=64)
def _lower_pairs(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    ii, jj = torch.tril_indices(n, n).tolist()
    return _device_ints(tuple(ii), device), _device_ints(tuple(jj), device)


@functools.lru_cache(maxsize=8)
def sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # an H100 SXM (ahead-of-time analysis on a machine without a GPU)


# ----------------------------------------------------------------------------------------------------------------
# ghost route
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _ghost_gram_fwd_kernel(
    a_ptr, b_ptr, pair_i_ptr, pair_j_ptr, seg_start_ptr, seg_size_ptr, seg_own_ptr, out_ptr,
    T, DA, S, SEG_GROUPS,
    sa_n, sa_t, sa_d, sb_n, sb_t, sb_d, so_s, so_i, so_j,
    ADD_ONE: tl.constexpr, PRECISION: tl.constexpr,
    BT: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
):
    # grid dim 0 = (sample pair, segment group): at small n the segments are spread over programs (each recomputes
    # the pair's token-pair tile) so that the grid still fills the GPU
    pid_p = tl.program_id(0) // SEG_GROUPS
    pid_g = tl.program_id(0) % SEG_GROUPS
    pid_t = tl.program_id(1)
    pid_s = tl.program_id(2)
    i = tl.load(pair_i_ptr + pid_p).to(tl.int64)
    j = tl.load(pair_j_ptr + pid_p).to(tl.int64)
    offs_t = pid_t * BT + tl.arange(0, BT)
    offs_s = pid_s * BS + tl.arange(0, BS)
    mt = offs_t < T
    ms = offs_s < T

    # Token-pair tile P[t, s] = a_it · a_js, computed once and shared by every segment below.
    p = tl.zeros((BT, BS), dtype=tl.float32)
    for k0 in range(0, DA, BK):
        offs_k = k0 + tl.arange(0, BK)
        mk = offs_k < DA
        ai = tl.load(a_ptr + i * sa_n + offs_t[:, None] * sa_t + offs_k[None, :] * sa_d,
                     mask=mt[:, None] & mk[None, :], other=0.0)
        aj = tl.load(a_ptr + j * sa_n + offs_k[:, None] * sa_d + offs_s[None, :] * sa_t,
                     mask=mk[:, None] & ms[None, :], other=0.0)
        p += tl.dot(ai, aj, input_precision=PRECISION)
    if ADD_ONE:
        # bias: the shared side carries a constant 1. Out-of-range t/s are harmless: D is zero there.
        p += 1.0

    per_group = tl.cdiv(S, SEG_GROUPS)
    for seg in range(pid_g * per_group, tl.minimum(S, (pid_g + 1) * per_group)):
        r_start = tl.load(seg_start_ptr + seg)
        r_size = tl.load(seg_size_ptr + seg)
        d = tl.zeros((BT, BS), dtype=tl.float32)
        for r0 in range(0, r_size, BR):
            offs_r = r0 + tl.arange(0, BR)
            mr = offs_r < r_size
            rows = r_start + offs_r
            bi = tl.load(b_ptr + i * sb_n + offs_t[:, None] * sb_t + rows[None, :] * sb_d,
                         mask=mt[:, None] & mr[None, :], other=0.0)
            bj = tl.load(b_ptr + j * sb_n + rows[:, None] * sb_d + offs_s[None, :] * sb_t,
                         mask=mr[:, None] & ms[None, :], other=0.0)
            d += tl.dot(bi, bj, input_precision=PRECISION)
        val = tl.sum(tl.sum(p * d, axis=1), axis=0)
        own = tl.load(seg_own_ptr + seg).to(tl.int64)  # the module this segment's Gram adds into
        tl.atomic_add(out_ptr + own * so_s + i * so_i + j * so_j, val)
        if i != j:  # the Gram is symmetric: write the mirrored entry here (no mirroring pass afterwards)
            tl.atomic_add(out_ptr + own * so_s + j * so_i + i * so_j, val)


def ghost_segment_grams(a, b, seg_starts, seg_sizes, *, add_one: bool, allow_tf32: bool,
                        seg_owners=None) -> torch.Tensor:
    """Grams ``[M, n, n]`` (fp32) by the ghost route: segment s adds into ``seg_owners[s]`` (default: its own,
    M = S). See the module docstring."""
    n, T, DA = a.shape
    S = len(seg_starts)
    owners = tuple(range(S)) if seg_owners is None else tuple(seg_owners)
    starts = _device_ints(tuple(seg_starts), a.device)
    sizes = _device_ints(tuple(seg_sizes), a.device)
    pi, pj = _lower_pairs(n, a.device)
    out = torch.zeros(1 + max(owners), n, n, dtype=torch.float32, device=a.device)
    BT = BS = _tile(T)
    BK = _tile(DA)
    BR = _tile(max(seg_sizes))
    tiles = pi.numel() * triton.cdiv(T, BT) * triton.cdiv(T, BS)
    groups = 1 if interpreter_enabled() else max(1, min(S, triton.cdiv(2 * sm_count(a.device), tiles)))
    grid = (pi.numel() * groups, triton.cdiv(T, BT), triton.cdiv(T, BS))
    _ghost_gram_fwd_kernel[grid](
        a, b, pi, pj, starts, sizes, _device_ints(owners, a.device), out,
        T, DA, S, groups,
        *a.stride(), *b.stride(), *out.stride(),
        ADD_ONE=add_one, PRECISION=precision(a.dtype, allow_tf32),
        BT=BT, BS=BS, BK=BK, BR=BR,
    )
    return out


# ----------------------------------------------------------------------------------------------------------------
# per-sample-gradient route
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _psg_fwd_kernel(
    a_ptr, b_ptr, tile_src_ptr, tile_cnt_ptr, tile_dst_ptr, g_ptr,
    T, DA, c0, CW,
    sa_n, sa_t, sa_d, sb_n, sb_t, sb_d, sg_n, sg_r, sg_c,
    ADD_ONE: tl.constexpr, PRECISION: tl.constexpr,
    BR: tl.constexpr, BC: tl.constexpr, BT: tl.constexpr,
):
    """G[i, dst + r, c - c0] = Σ_t b[i, t, src + r] · a[i, t, c] for one row tile and one column tile."""
    i = tl.program_id(0).to(tl.int64)
    pid_r = tl.program_id(1)
    pid_c = tl.program_id(2)
    src = tl.load(tile_src_ptr + pid_r)
    cnt = tl.load(tile_cnt_ptr + pid_r)
    dst = tl.load(tile_dst_ptr + pid_r)
    offs_r = tl.arange(0, BR)
    mr = offs_r < cnt
    offs_cl = pid_c * BC + tl.arange(0, BC)  # column inside this chunk
    mcl = offs_cl < CW
    offs_c = c0 + offs_cl  # column of the shared side (DA means the bias' constant 1)
    mc = mcl & (offs_c < DA)
    bias_tile = ADD_ONE and c0 + (pid_c + 1) * BC > DA  # this tile holds the bias column
    acc = tl.zeros((BR, BC), dtype=tl.float32)
    rs = tl.zeros((BR,), dtype=tl.float32)
    for t0 in range(0, T, BT):
        offs_t = t0 + tl.arange(0, BT)
        mt = offs_t < T
        bt = tl.load(b_ptr + i * sb_n + (src + offs_r)[:, None] * sb_d + offs_t[None, :] * sb_t,
                     mask=mr[:, None] & mt[None, :], other=0.0)
        at = tl.load(a_ptr + i * sa_n + offs_t[:, None] * sa_t + offs_c[None, :] * sa_d,
                     mask=mt[:, None] & mc[None, :], other=0.0)
        acc = tl.dot(bt, at, acc, input_precision=PRECISION)
        if bias_tile:  # the bias column is the row sum of b, added beside the dot, not through its operand
            rs += tl.sum(bt.to(tl.float32), axis=1)
    if bias_tile:
        acc = tl.where((offs_c == DA)[None, :], rs[:, None], acc)
    tl.store(g_ptr + i * sg_n + (dst + offs_r)[:, None] * sg_r + offs_cl[None, :] * sg_c, acc,
             mask=mr[:, None] & mcl[None, :])


@triton.jit
def _segment_gram_fwd_kernel(
    g_ptr, seg_off_ptr, seg_size_ptr, seg_own_ptr, out_ptr,
    n, CW, KS, sg_n, so_s, so_i, so_j,
    PRECISION: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """out[s, I, J] += Σ_k G[I, k] G[J, k] over segment s's flat block of the scratch, one K split per program."""
    seg = tl.program_id(0)
    pid_ij = tl.program_id(1)
    pid_k = tl.program_id(2)
    nb = tl.cdiv(n, BN)
    ib = pid_ij // nb
    jb = pid_ij % nb
    if jb <= ib:
        off = tl.load(seg_off_ptr + seg).to(tl.int64) * CW
        K = tl.load(seg_size_ptr + seg) * CW
        offs_i = ib * BN + tl.arange(0, BN)
        offs_j = jb * BN + tl.arange(0, BN)
        mi = offs_i < n
        mj = offs_j < n
        k_lo = pid_k * KS
        k_hi = tl.minimum(k_lo + KS, K)
        acc = tl.zeros((BN, BN), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BK):
            offs_k = k0 + tl.arange(0, BK)
            mk = offs_k < k_hi
            gi = tl.load(g_ptr + offs_i[:, None].to(tl.int64) * sg_n + off + offs_k[None, :],
                         mask=mi[:, None] & mk[None, :], other=0.0)
            gj = tl.load(g_ptr + offs_j[None, :].to(tl.int64) * sg_n + off + offs_k[:, None],
                         mask=mk[:, None] & mj[None, :], other=0.0)
            acc += tl.dot(gi, gj, input_precision=PRECISION)
        own = tl.load(seg_own_ptr + seg).to(tl.int64)  # the module this segment's Gram adds into
        tl.atomic_add(out_ptr + own * so_s + offs_i[:, None] * so_i + offs_j[None, :] * so_j, acc,
                      mask=mi[:, None] & mj[None, :])
        if jb < ib:  # off-diagonal block: its mirror too (a diagonal block computes both triangles itself)
            tl.atomic_add(out_ptr + own * so_s + offs_j[None, :] * so_i + offs_i[:, None] * so_j, acc,
                          mask=mi[:, None] & mj[None, :])


# _psg_fwd_kernel: tiles from the shapes (_tile), warps and stages tuned; the default (first) compiles without
# spills at BERT-base shapes on sm_90 and sm_80 (tests/test_triton_aot.py).
_PSG_FWD_CANDIDATES = [config(4, 3), config(8, 3), config(4, 4), config(8, 2)]


@functools.lru_cache(maxsize=256)
def _row_tiles(seg_starts: tuple, seg_sizes: tuple, BR: int):
    """Split segments into row tiles of at most BR rows; pack segments one after another in the scratch."""
    src, cnt, dst, offs = [], [], [], []
    packed = 0
    for start, size in zip(seg_starts, seg_sizes):
        offs.append(packed)
        for r0 in range(0, size, BR):
            src.append(start + r0)
            cnt.append(min(BR, size - r0))
            dst.append(packed + r0)
        packed += size
    return tuple(src), tuple(cnt), tuple(dst), tuple(offs), packed


def _segment_groups(seg_sizes: tuple, n: int, budget_bytes: int, min_cw: int) -> list[list[int]]:
    """Group segments so that each group's scratch at the narrowest chunk width fits the budget."""
    groups, cur, rows = [], [], 0
    for s, size in enumerate(seg_sizes):
        if cur and (rows + size) * n * min_cw * 4 > budget_bytes:
            groups.append(cur)
            cur, rows = [], 0
        cur.append(s)
        rows += size
    groups.append(cur)
    return groups


def psg_segment_grams(
    a, b, seg_starts, seg_sizes, *, add_one: bool, allow_tf32: bool, scratch_bytes: int = 48 << 20,
    seg_owners=None,
) -> torch.Tensor:
    """Grams ``[M, n, n]`` (fp32) by the two-kernel per-sample-gradient route, scratch ≤ ``scratch_bytes``;
    segment s adds into ``seg_owners[s]`` (default: its own, M = S)."""
    owners = tuple(range(len(seg_starts))) if seg_owners is None else tuple(seg_owners)
    n, T, DA = a.shape
    dev = a.device
    DA1 = DA + int(add_one)
    BR = _tile(max(seg_sizes))
    BT = _tile(T)
    BC = _tile(DA1)
    BN = _tile(n)
    prec_in = precision(a.dtype, allow_tf32)
    # the scratch is fp32: its Gram dots run TF32 tensor cores whenever the inputs' dots do (bf16/fp16 or allow_tf32)
    prec_g = precision(torch.float32, prec_in == "tf32")
    out = torch.zeros(1 + max(owners), n, n, dtype=torch.float32, device=dev)
    interp = interpreter_enabled()
    for group in _segment_groups(tuple(seg_sizes), n, scratch_bytes, BC):
        g_starts = tuple(seg_starts[s] for s in group)
        g_sizes = tuple(seg_sizes[s] for s in group)
        src, cnt, dst, offs, packed = _row_tiles(g_starts, g_sizes, BR)
        t_src, t_cnt, t_dst = _device_ints(src, dev), _device_ints(cnt, dev), _device_ints(dst, dev)
        t_off, t_size = _device_ints(offs, dev), _device_ints(g_sizes, dev)
        # chunk width: as many shared-side columns as the budget allows, a multiple of BC
        cw_max = max(BC, (scratch_bytes // (4 * n * packed)) // BC * BC)
        cw_max = min(cw_max, triton.cdiv(DA1, BC) * BC)
        scratch = torch.empty(n * packed * cw_max, dtype=torch.float32, device=dev)
        t_own = _device_ints(tuple(owners[s] for s in group), dev)
        nb = triton.cdiv(n, BN)
        def psg_fwd(cfg: Config, warmup: bool, c0: int = 0):
            cw = min(cw_max, DA1 - c0)
            g = scratch[: n * packed * cw].view(n, packed, cw)
            grid = (n, len(src), triton.cdiv(cw, BC))
            args = (a, b, t_src, t_cnt, t_dst, g, T, DA, c0, cw, *a.stride(), *b.stride(), *g.stride())
            kw = dict(ADD_ONE=add_one, PRECISION=prec_in, BR=BR, BC=BC, BT=BT, **cfg.kwargs())
            if warmup:
                return _psg_fwd_kernel.warmup(*args, grid=grid, **kw)
            _psg_fwd_kernel[grid](*args, **kw)
            return g

        # warps and stages tuned on a GPU (it writes only the scratch, which the chunk below rewrites)
        cfg = autotune.pick("psg_fwd", (n, triton.next_power_of_2(T), DA1, packed, BR, BC, str(a.dtype), prec_in),
                            _PSG_FWD_CANDIDATES, psg_fwd, dev)
        for c0 in range(0, DA1, cw_max):
            cw = min(cw_max, DA1 - c0)
            g = psg_fwd(cfg, False, c0)
            k_max = max(g_sizes) * cw
            # Split K so that small Grams still fill the GPU; one split in the interpreter (fewest programs).
            programs = len(group) * nb * nb
            split = 1 if interp else max(1, min(triton.cdiv(k_max, 4 * 64), triton.cdiv(4 * 132, programs)))
            ks = triton.cdiv(triton.cdiv(k_max, split), 64) * 64
            _segment_gram_fwd_kernel[(len(group), nb * nb, triton.cdiv(k_max, ks))](
                g, t_off, t_size, t_own, out,
                n, cw, ks, g.stride(0), *out.stride(),
                PRECISION=prec_g, BN=BN, BK=64,
            )
    return out
