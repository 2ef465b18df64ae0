"""The functional sparse-update linear map: the forward is ``F.linear``; the backward computes ``dX`` in full and
``dW``/``db`` only for the active blocks of the weight (MAT: frozen modules skip their weight-gradient GEMMs).

Three tiers: the ops ``torch.ops.mat_kernels.sparse_*`` (:mod:`mat_kernels.ops.sparse_grad`); the functional,
differentiable :func:`sparse_update_linear` (here: the autograd Function, the CPU/GPU route choice, the checks);
:class:`mat_kernels.SparseUpdateLinear` (:mod:`.sparse_linear`), a drop-in ``nn.Linear`` (same parameters and
``state_dict`` keys) whose active blocks are set in place with ``set_active``.

Layout and mask: the layout is the weight's :class:`mat_kernels.WeightBlocks` (static: a constant under
``torch.compile``); the mask is a 1-D bool **CPU** tensor, one entry per module, read on the host (no GPU sync) and
updated in place (a graph input: changing it never recompiles). ``nn.MultiheadAttention``: :mod:`.sparse_mha`.

Gradients, with ``M`` the 0/1 mask of active rows or columns: ``dX = dY W`` (in full, the default), ``dW = M ⊙
(dYᵀ X)``, ``db = m ⊙ Σ_t dY[t]`` (row blocks own their bias entries; a *shared* bias, always so for column blocks,
gets its full gradient). A wholly frozen layer leaves ``weight.grad`` ``None`` in eager mode (optimizers skip it)
and gets zero gradients under ``torch.compile`` (``None`` would be a data-dependent graph).

Partial backpropagation (``frozen_backward="detach"``, ``SparseUpdateLinear.set_frozen_backward``): no gradient
flows through a frozen block either, ``dX = dY (M ⊙ W)`` (op ``mat_kernels::sparse_input_grad``: one GEMM per run of
active rows or columns), so a frozen head's rows drop out of a fused QKV's input gradient and a wholly frozen layer
returns no input gradient at all (eager), which stops the backward of the branch it sits on.
"""
from __future__ import annotations

import contextlib

import torch

from mat_kernels import backend as _backend
from mat_kernels import routing
from mat_kernels.blocks import BlockSpec, WeightBlocks
from mat_kernels.ops import sparse_grad as _ops

__all__ = ["sparse_update_linear", "sparse_layout", "as_mask", "mask_snapshot", "TRITON_DEVICES", "LAST_ROUTE",
           "ORIGINAL_LINEAR", "FROZEN_BACKWARD", "check_frozen_backward"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# not F.linear: that is intercepted while a measurement or an nn.MultiheadAttention's sparse updates run
ORIGINAL_LINEAR = routing.ORIGINAL_LINEAR

if _ops.extension_available():  # OpOverloads, resolved once: the backward calls them on every step
    _WEIGHT_GRAD = torch.ops.mat_kernels.sparse_weight_grad.default
    _WEIGHT_GRAD_ACC = torch.ops.mat_kernels.sparse_weight_grad_accumulate.default
    _BIAS_GRAD = torch.ops.mat_kernels.sparse_bias_grad.default
    _BIAS_GRAD_ACC = torch.ops.mat_kernels.sparse_bias_grad_accumulate.default
    _INPUT_GRAD = torch.ops.mat_kernels.sparse_input_grad.default


def sparse_layout(d_out: int, d_in: int, row_blocks: BlockSpec, col_blocks: BlockSpec) -> WeightBlocks:
    """The layout of a sparse-update layer: its WeightBlocks, ranges of different modules disjoint."""
    return WeightBlocks.build(d_out, d_in, row_blocks=row_blocks, col_blocks=col_blocks).check_disjoint()


def as_mask(active, num_modules: int, *, name: str = "active") -> torch.Tensor:
    """Validate an activity mask: a bool tensor (any device) or a sequence of bools, of length ``num_modules``."""
    if isinstance(active, torch.Tensor):
        mask = active
    elif isinstance(active, (list, tuple)):
        if not all(isinstance(a, bool) for a in active):
            raise TypeError(f"{name} must be a bool tensor or a sequence of bools, got {active!r}")
        mask = torch.tensor(active, dtype=torch.bool).reshape(len(active))
    else:
        raise TypeError(f"{name} must be a bool tensor or a sequence of bools, got {type(active).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must have dtype torch.bool, got {mask.dtype}")
    if mask.dim() != 1 or mask.numel() != num_modules:
        raise ValueError(f"{name} must have shape [{num_modules}] (one entry per module), got {tuple(mask.shape)}")
    return mask


def _as_matrix(t: torch.Tensor) -> torch.Tensor:
    """What the ops take: 2-D or 3-D token-major tensors (1-D: one token; >3-D: leading dims flattened)."""
    if t.dim() in (2, 3):
        return t
    return t.reshape(-1, t.shape[-1])


def _check_call(x, weight, bias, active, layout: WeightBlocks, accumulate_grad: bool) -> None:
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [d_out, d_in], got shape {tuple(weight.shape)}")
    if tuple(weight.shape) != layout.shape:
        raise ValueError(f"weight has shape {tuple(weight.shape)} but the layout was built for {layout.shape}")
    if x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x must have d_in = weight.shape[1] = {weight.shape[1]} as its last dimension, got shape "
                         f"{tuple(x.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape [{weight.shape[0]}], got {tuple(bias.shape)}")
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is not None and t.dtype not in _DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; expected float32, bfloat16 or float16 (or float64)")
        if t is not None and t.device != weight.device:
            raise ValueError(f"x, weight and bias must be on the same device, got {name} on {t.device} and weight "
                             f"on {weight.device}")
    if not isinstance(active, torch.Tensor):
        raise TypeError(f"active must be a bool CPU tensor of {layout.num_modules} entries, got "
                        f"{type(active).__name__}")
    if active.dtype != torch.bool:
        raise TypeError(f"active must have dtype torch.bool, got {active.dtype}")
    if active.device.type != "cpu":
        raise ValueError(f"active must be a CPU tensor (the kernels read it on the host to avoid a GPU sync), got "
                         f"{active.device}")
    if active.dim() != 1 or active.numel() != layout.num_modules:
        raise ValueError(f"active must have shape [{layout.num_modules}] (one entry per module), got "
                         f"{tuple(active.shape)}")
    if accumulate_grad:
        if torch.compiler.is_compiling():
            raise ValueError("accumulate_grad=True writes into weight.grad from the backward and works in eager mode "
                             "only; use the default (autograd accumulation) under torch.compile")
        if not weight.is_leaf or (bias is not None and not bias.is_leaf):
            raise ValueError("accumulate_grad=True needs weight and bias to be leaf tensors (parameters)")


class _SparseUpdateLinearFunction(torch.autograd.Function):
    """y = F.linear(x, W, b); backward: dX = dY W (or dY (M ⊙ W) with ``detach``), dW/db on active blocks only.

    ``mode`` (static, a tuple of bools): ``(detach, weight_grad, shared_bias)``: ``detach``: no gradient flows
    through frozen blocks; ``weight_grad``: False computes no dW/db at all (λ measurement: dX only);
    ``shared_bias``: the bias belongs to no block and gets its full gradient.

    Old-style ``forward(ctx, ...)``: the ``setup_context`` style binds arguments with ``inspect`` on every call,
    which costs more host time than the whole forward of a small layer.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, active, starts, sizes, owners, axis, accumulate_grad, mode):
        needs_x, needs_w = ctx.needs_input_grad[:2]
        ctx.layout = (starts, sizes, owners, axis)
        ctx.accumulate_grad = accumulate_grad
        ctx.mode = mode
        if accumulate_grad:
            ctx.params = (weight, bias)
        # Save only what the requested gradients need: X for dW, W for dX. The backward must use the mask of its own
        # forward even if set_active runs in between: eager mode saves a snapshot taken once per change of the mask
        # (no clone per step); a compiled graph clones (a few bytes on the CPU).
        if torch.compiler.is_compiling():
            snapshot, ctx.summary = active.clone(), None
        else:
            snapshot, ctx.summary = mask_snapshot(active)
        ctx.save_for_backward(x if needs_w and mode[1] else None, weight if needs_x else None, snapshot)
        return ORIGINAL_LINEAR(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight, active = ctx.saved_tensors
        starts, sizes, owners, axis = ctx.layout
        detach, weight_grad, shared_bias = ctx.mode
        needs_x, needs_w, needs_b = ctx.needs_input_grad[:3]
        compiling = torch.compiler.is_compiling()
        # Eager: decisions on the mask's values are free (it lives on the CPU). Compiled: the graph cannot depend on
        # them, so the ops run (no GEMM inside for frozen blocks) and return zeros.
        any_active, all_active = (True, False) if compiling or ctx.summary is None else ctx.summary
        dx = dw = db = None
        want_w = needs_w and weight_grad and any_active
        want_b = needs_b and weight_grad and (any_active or shared_bias)
        # GPU, any block active: the Triton kernels (one launch for dW and db, one for the detach dX of a partly
        # active layer)
        triton_masks = None
        if any_active and not compiling and not ctx.accumulate_grad and not torch.is_grad_enabled() and \
                (want_w or (detach and needs_x and not all_active)):
            triton_masks = _triton_masks(dy, active, ctx.layout, weight, x)
        if needs_x:
            if not detach or all_active:
                dx = dy.matmul(weight)
            elif any_active and triton_masks is not None:
                dx = _triton.masked_input_grad(dy.reshape(-1, dy.shape[-1]), weight, triton_masks,
                                               allow_tf32=_tf32()).view(*dy.shape[:-1], weight.shape[1])
            elif any_active:
                dx = _INPUT_GRAD(_as_matrix(dy), weight, active, starts, sizes, owners, axis).view(
                    *dy.shape[:-1], weight.shape[1])
            # else: a wholly frozen layer under partial backpropagation passes no gradient (None stops the branch)
        if want_w and triton_masks is not None:
            dy2 = dy.reshape(-1, dy.shape[-1])
            dw, db = _triton.masked_weight_grad(dy2, x.reshape(-1, x.shape[-1]), triton_masks,
                                                bias=None if not want_b else "shared" if shared_bias else "own",
                                                allow_tf32=_tf32())
        elif want_w or want_b:
            dy2 = _as_matrix(dy)
            # Eager, no double backward: call the C++ kernels directly, below the ops' (Python) autograd layer,
            # whose per-call host cost would otherwise exceed a small layer's GEMM time on a GPU.
            below = contextlib.nullcontext() if compiling or torch.is_grad_enabled() else \
                torch._C._AutoDispatchBelowAutograd()
            with below:
                if ctx.accumulate_grad:
                    _accumulate_into_grads(ctx.params, dy2, x, active, starts, sizes, owners, axis, want_w, want_b,
                                           shared_bias)
                else:
                    if want_w:
                        dw = _WEIGHT_GRAD(dy2, _as_matrix(x), active, starts, sizes, owners, axis)
                    if want_b:
                        db = _bias_grad(dy2, active, starts, sizes, owners, shared_bias)
        return dx, dw, db, None, None, None, None, None, None, None


# Devices whose sparse backward runs the Triton kernels (mat_kernels/kernels/triton_sparse_grad.py) when any block of
# a layer is active: CUDA with Triton importable. Elsewhere, or without Triton, the ATen plans of the C++ ops run
# (the CPU's gathered GEMM; on CUDA a warning says once why the kernels are not used). ``LAST_ROUTE`` names the
# route ("triton" or "aten") and the reason of the last eager backward that computed a weight gradient or a
# partial-backpropagation dX, for inspection (accumulate_grad, double backward and compiled graphs always run the
# ops and do not update it); "dense" when an eager layer with every block active ran as a plain linear (off the
# Triton devices: its forward sets it).
TRITON_DEVICES = {"cuda"}
LAST_ROUTE = {"route": None, "reason": None}
_triton = None


def _tf32() -> bool:
    return torch.backends.cuda.matmul.allow_tf32


def _triton_masks(dy, active, layout, weight, x):
    """The device masks of ``active`` for the Triton kernels, built once per (mask snapshot, layout, device,
    dtype); None (and ``LAST_ROUTE`` says why) when the kernels cannot run here."""
    global _triton
    device = dy.device
    if device.type not in TRITON_DEVICES:
        LAST_ROUTE.update(route="aten", reason=f"{device.type} tensors: the C++ ops' plans")
        return None
    if dy.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        LAST_ROUTE.update(route="aten", reason=f"{dy.dtype}: the Triton kernels take fp32, bf16 and fp16")
        return None
    reason = _backend.kernel_unusable(device)
    if reason is not None:
        LAST_ROUTE.update(route="aten", reason=reason)
        _backend.warn_once(f"sparse-triton:{reason}", "mat_kernels: the sparse-update backward on "
                           f"{device.type} runs the ATen plans (one GEMM per group of runs), not the Triton "
                           f"kernels: {reason}")
        return None
    if _triton is None:
        from mat_kernels.kernels import triton_sparse_grad

        _triton = triton_sparse_grad
    starts, sizes, owners, axis = layout
    N, K = (weight.shape if weight is not None else (dy.shape[-1], x.shape[-1]))
    block_k = _triton.tile_config(dy.dtype)["BK"]
    cache = active.__dict__.setdefault("_mat_device_masks", {})
    key = (tuple(starts), tuple(sizes), tuple(owners), axis, N, K, device, block_k)
    masks = cache.get(key)
    if masks is None:
        blocked = _ops.block_mask(active, starts, sizes, owners, N if axis == 0 else K, device="cpu",
                                  dtype=torch.bool)
        rows = blocked if axis == 0 else torch.ones(N, dtype=torch.bool)
        cols = blocked if axis == 1 else torch.ones(K, dtype=torch.bool)
        masks = cache[key] = _triton.device_masks(rows, cols, device, block_k, axis)
    LAST_ROUTE.update(route="triton", reason=None)
    return masks


def mask_snapshot(active: torch.Tensor) -> tuple[torch.Tensor, tuple[bool, bool]]:
    """A copy of a mask that nothing writes into, and its ``(any, all)``, made and read on the host once per change of
    the mask (kept on the tensor with its version counter, which every in-place write advances), not once per step."""
    version = active._version
    cached = getattr(active, "_mat_snapshot", None)
    if cached is None or cached[0] != version:
        cached = (version, active.clone(), (bool(active.any()), bool(active.all())))
        active._mat_snapshot = cached
    return cached[1], cached[2]


def _bias_grad(dy2, active, starts, sizes, owners, shared_bias):
    if not shared_bias:
        return _BIAS_GRAD(dy2, active, starts, sizes, owners)
    return dy2.reshape(-1, dy2.shape[-1]).sum(0)  # a shared bias belongs to no block: always its full gradient


@torch.no_grad()
def _accumulate_into_grads(params, dy2, x, active, starts, sizes, owners, axis, want_w, want_b, shared_bias):
    weight, bias = params
    if want_w:
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        _WEIGHT_GRAD_ACC(weight.grad, dy2, _as_matrix(x), active, starts, sizes, owners, axis)
    if want_b:
        if bias.grad is None:
            bias.grad = torch.zeros_like(bias)
        if shared_bias:
            bias.grad.add_(dy2.reshape(-1, dy2.shape[-1]).sum(0))
        else:
            _BIAS_GRAD_ACC(bias.grad, dy2, active, starts, sizes, owners)


def _autocast_enabled(device_type: str) -> bool:
    # is_autocast_enabled raises for device types without autocast (e.g. meta)
    return device_type in _AUTOCAST_DEVICES and torch.is_autocast_enabled(device_type)


_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "hpu", "mps", "mtia", "xla")


FROZEN_BACKWARD = ("dw", "detach")


def check_frozen_backward(value) -> str:
    """``value`` if it is one of :data:`FROZEN_BACKWARD`, else ``ValueError``."""
    if value not in FROZEN_BACKWARD:
        raise ValueError(f"frozen_backward must be one of {FROZEN_BACKWARD}, got {value!r}")
    return value


def sparse_update_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    active: torch.Tensor,
    row_blocks: BlockSpec = None,
    col_blocks: BlockSpec = None,
    layout: WeightBlocks | None = None,
    accumulate_grad: bool = False,
    frozen_backward: str = "dw",
    shared_bias: bool = False,
    weight_grad: bool = True,
) -> torch.Tensor:
    """``y = x Wᵀ + b`` whose backward computes ``dX`` in full and ``dW``/``db`` only for active blocks.

    Args:
        x: ``[..., d_in]`` (2-D ``[T, d_in]`` and 3-D ``[B, T, d_in]`` reach the kernels without reshaping).
        weight: ``[d_out, d_in]``; bias: ``[d_out]`` or None. float32, bfloat16 or float16 (float64 accepted), same
            dtype as ``x`` (under ``torch.autocast`` they are cast like ``F.linear`` would be) and device.
        active: 1-D bool CPU tensor, one entry per module of the layout (``[1]`` for the whole weight). Pass a
            tensor you update in place (``active.copy_(...)``) so ``torch.compile`` does not recompile.
        row_blocks / col_blocks: block spec of the layout (see :class:`mat_kernels.WeightBlocks`), or ``layout``
            prebuilt;
            none of them: the whole weight is one module.
        accumulate_grad: eager-only gradient-accumulation mode: the backward adds the active blocks' ``dW``/``db``
            straight into ``weight.grad``/``bias.grad`` (allocated as zeros on first use) instead of returning a
            full-size gradient that autograd then adds, so frozen blocks cost no memory traffic at all. Autograd
            hooks on ``weight``/``bias`` (e.g. DDP's) do not fire in this mode.
        frozen_backward: ``"dw"`` (default): frozen blocks skip their weight gradient only, ``dX = dY W`` is exact;
            ``"detach"``: no gradient flows through frozen blocks either, ``dX = dY (M ⊙ W)`` (partial
            backpropagation; a wholly frozen layer returns no input gradient in eager mode).
        shared_bias: the bias belongs to no block and gets its full gradient at every backward (always so for
            column blocks; for row blocks the default is that each block owns its bias entries).
        weight_grad: False: compute no weight or bias gradient at all, only ``dX`` (a measurement's backward).

    Returns:
        ``[..., d_out]``, the same as ``F.linear(x, weight, bias)``.
    """
    if layout is None:
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError("weight must be a 2-D tensor [d_out, d_in]")
        layout = sparse_layout(weight.shape[0], weight.shape[1], row_blocks, col_blocks)
    elif row_blocks is not None or col_blocks is not None:
        raise ValueError("give either layout or row_blocks/col_blocks, not both")
    elif not isinstance(layout, WeightBlocks):
        raise TypeError(f"layout must be a WeightBlocks, got {type(layout).__name__}")
    else:
        layout.check_disjoint()
    if isinstance(x, torch.Tensor) and _autocast_enabled(x.device.type):
        if accumulate_grad:
            raise ValueError("accumulate_grad=True is not supported under torch.autocast (the gradient would be "
                             "accumulated in the autocast dtype)")
        dtype = torch.get_autocast_dtype(x.device.type)

        def cast(t):
            eligible = t is not None and t.dtype in (torch.float32, torch.float16, torch.bfloat16)
            return t.to(dtype) if eligible else t

        x, weight, bias = cast(x), cast(weight), cast(bias)
    _check_call(x, weight, bias, active, layout, accumulate_grad)
    if x.dtype != weight.dtype:
        raise TypeError(f"x and weight must have the same dtype, got {x.dtype} and {weight.dtype}")
    _ops.require_extension(x.device)
    detach = check_frozen_backward(frozen_backward) == "detach"
    mode = (detach, bool(weight_grad), bool(shared_bias) or layout.dim == 1)
    return _SparseUpdateLinearFunction.apply(x, weight, bias, active, layout.starts, layout.sizes, layout.owners,
                                             layout.dim, accumulate_grad, mode)
