"""``mat_kernels::sparse_*``: weight and bias gradients of a linear layer restricted to active blocks, and the input
gradient of partial backpropagation (no gradient through frozen blocks).

The ops are defined in C++ (``csrc/ops.cpp``: schemas and CPU kernels; ``csrc/cuda/``: CUDA kernels) and live in
the extension ``mat_kernels._C``; this module loads it and adds what torch needs to trace and differentiate them:
a fake (meta) kernel for each op (so ``torch.compile`` traces them), autograd formulas for the three functional
ops, and FLOP formulas for ``torch.utils.flop_counter``.

Ops: ``sparse_weight_grad`` / ``sparse_weight_grad_accumulate`` (dW), ``sparse_bias_grad`` /
``sparse_bias_grad_accumulate`` (db), ``sparse_input_grad`` (dX of partial backpropagation).

Maths (tokens flattened: ``X: [T, d_in]``, ``dY: [T, d_out]``): ``dW = M ⊙ (dYᵀ X)``, ``db = m ⊙ Σ_t dY[t]``,
``dX = dY (M ⊙ W)`` (``sparse_input_grad``: no gradient flows through frozen blocks), with ``M`` the 0/1 mask of
active blocks (rows or columns of W) and ``m`` its row mask. The kernels never form ``M``: they walk maximal runs of
active rows/columns and issue one GEMM per run on strided views of ``dY``, ``X``, ``W`` and the output (one batched
GEMM for runs of equal length at a constant spacing, except for the row runs of ``dX``, which all add into the same
output and get one accumulating GEMM each), zero the frozen blocks, and do nothing at all when no block is active.
Accumulation in the input dtype's BLAS (fp32 accumulate for bf16/fp16).

Layout arguments of every op (``starts``, ``sizes``, ``owners``: ``int[]``): the blocks are the ranges
``[starts[s], starts[s] + sizes[s])`` along ``axis`` (0: rows = output features, 1: columns = input features),
range ``s`` owned by module ``owners[s]``; a module may own several ranges (one head's Q, K and V rows of a fused
QKV weight). ``active`` is a 1-D bool (or uint8) **CPU** tensor with one entry per module: it is read on the host,
so planning never synchronises with a GPU, and changing its values needs no recompilation under ``torch.compile``
(it is a graph input, the layout is a constant). Indices in no range are never updated.
"""
from __future__ import annotations

import math

import torch

__all__ = [
    "extension_available",
    "extension_error",
    "require_extension",
    "sparse_weight_grad",
    "sparse_weight_grad_accumulate",
    "sparse_bias_grad",
    "sparse_bias_grad_accumulate",
    "sparse_input_grad",
    "block_mask",
]

_BUILD_HINT = (
    "build it in place with `MAX_JOBS=2 python setup.py build_ext --inplace` (or `pip install --no-build-isolation "
    ".`) from the repository root, against the installed torch"
)

try:
    import mat_kernels._C as _C  # loading the library registers the ops in torch.ops.mat_kernels

    _EXT_ERROR: str | None = None
except ImportError as _e:  # pragma: no cover - depends on the build
    _C = None
    _EXT_ERROR = f"{type(_e).__name__}: {_e}"


def extension_available() -> bool:
    """True when ``mat_kernels._C`` is built and loaded."""
    return _C is not None


def extension_error() -> str | None:
    """Why ``mat_kernels._C`` could not be imported, or None."""
    return _EXT_ERROR


def extension_build() -> dict[str, str] | None:
    """What ``mat_kernels._C`` was built for (``built_devices``, ``torch_version``, ``cuda``), or None when absent."""
    if _C is None:
        return None
    return {"built_devices": _C.BUILT_DEVICES, "torch_version": _C.TORCH_VERSION, "cuda": _C.CUDA_BUILD}


def require_extension(device: torch.device | str | None = None) -> None:
    """Raise ``RuntimeError`` saying how to build the extension if it is absent, or lacks ``device``'s kernels."""
    if _C is None:
        raise RuntimeError(f"mat_kernels._C is not built ({_EXT_ERROR}); the sparse-update ops need it: {_BUILD_HINT}")
    if device is not None:
        kind = torch.device(device).type
        built = _C.BUILT_DEVICES.split(",")
        if kind not in built and kind != "meta":
            raise RuntimeError(
                f"mat_kernels._C was built for {_C.BUILT_DEVICES} only, not {kind} (CUDA: {_C.CUDA_BUILD}); rebuild "
                f"with a CUDA torch and toolkit present: {_BUILD_HINT}. `python -m mat_kernels` shows the build."
            )


def block_mask(active: torch.Tensor, starts, sizes, owners, dim: int, *, device, dtype) -> torch.Tensor:
    """The 0/1 vector ``[dim]`` of active indices along the blocked axis, built with tensor ops only (traceable)."""
    # owner index per position; len(active) points at the appended False: indices in no block are frozen.
    # `dim` may be symbolic (dynamic shapes), so no Python list of length dim.
    owner_of = torch.full((dim,), active.shape[0], dtype=torch.long, device=active.device)
    for start, size, owner in zip(starts, sizes, owners):
        owner_of[start:start + size] = owner
    padded = torch.cat([active.to(torch.bool), active.new_zeros(1, dtype=torch.bool)])
    return padded[owner_of].to(device=device, dtype=dtype)


def sparse_weight_grad(dy, x, active, starts, sizes, owners, axis: int) -> torch.Tensor:
    """``dW [d_out, d_in] = dyᵀ x`` on active blocks, zero elsewhere. ``dy: [T, d_out]`` or ``[B, T, d_out]``,
    ``x: [T, d_in]`` or ``[B, T, d_in]`` (same dtype and device); ``axis`` 0: row blocks, 1: column blocks."""
    require_extension(dy.device)
    return torch.ops.mat_kernels.sparse_weight_grad(dy, x, active, starts, sizes, owners, axis)


def sparse_weight_grad_accumulate(grad_weight, dy, x, active, starts, sizes, owners, axis: int) -> None:
    """``grad_weight[active blocks] += dyᵀ x`` in place; frozen blocks are left exactly as they were."""
    require_extension(dy.device)
    torch.ops.mat_kernels.sparse_weight_grad_accumulate(grad_weight, dy, x, active, starts, sizes, owners, axis)


def sparse_bias_grad(dy, active, starts, sizes, owners) -> torch.Tensor:
    """``db [d_out] = Σ_tokens dy`` on active row blocks, zero elsewhere."""
    require_extension(dy.device)
    return torch.ops.mat_kernels.sparse_bias_grad(dy, active, starts, sizes, owners)


def sparse_bias_grad_accumulate(grad_bias, dy, active, starts, sizes, owners) -> None:
    """``grad_bias[active row blocks] += Σ_tokens dy`` in place; frozen entries are left as they were."""
    require_extension(dy.device)
    torch.ops.mat_kernels.sparse_bias_grad_accumulate(grad_bias, dy, active, starts, sizes, owners)


def sparse_input_grad(dy, weight, active, starts, sizes, owners, axis: int) -> torch.Tensor:
    """Input gradient of ``y = x weightᵀ`` with partial backpropagation: ``dX = dy (M ⊙ weight)``.

    No gradient flows through frozen blocks: ``M`` is the 0/1 mask of the active blocks of ``weight [d_out, d_in]``
    (``axis`` 0: rows = output features, 1: columns = input features; indices in no range count as frozen).
    ``dy: [T, d_out]`` or ``[B, T, d_out]`` (any strides, stride 0 included), same dtype and device as ``weight``.
    Returns ``dX`` of ``dy``'s leading shape and last dimension ``d_in``, contiguous, in ``dy``'s dtype; exactly
    zero (and no GEMM) when nothing is active. Layout arguments as for :func:`sparse_weight_grad`. Differentiable
    in ``dy`` and ``weight`` (double backward).
    """
    require_extension(dy.device)
    return torch.ops.mat_kernels.sparse_input_grad(dy, weight, active, starts, sizes, owners, axis)


# ---------------------------------------------------------------------------------------------------------------
# Fake kernels: the same checks as C++ (shapes, dtypes, devices, layout), output metadata only.

_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _fake_check_matrix(t, op, name):
    torch._check_value(t.dim() in (2, 3), lambda: f"{op}: {name} must be 2-D or 3-D, got shape {tuple(t.shape)}")
    torch._check_type(t.dtype in _FLOATS,
                      lambda: f"{op}: {name} must be float32, bfloat16 or float16 (or float64), got {t.dtype}")


def _fake_check_active(active, op):
    torch._check_value(active.device.type == "cpu", lambda: f"{op}: active must be a CPU tensor, got {active.device}")
    torch._check_type(active.dtype in (torch.bool, torch.uint8),
                      lambda: f"{op}: active must be a bool (or uint8) tensor, got {active.dtype}")
    torch._check_value(active.dim() == 1, lambda: f"{op}: active must be 1-D, got shape {tuple(active.shape)}")


def _fake_check_pair(dy, x, op):
    _fake_check_matrix(dy, op, "dy")
    _fake_check_matrix(x, op, "x")
    torch._check_value(dy.dim() == x.dim(), lambda: f"{op}: dy and x must have the same rank")
    for d in range(dy.dim() - 1):
        torch._check_value(dy.shape[d] == x.shape[d],
                           lambda: f"{op}: dy and x must agree in every dimension but the last")
    torch._check_type(dy.dtype == x.dtype, lambda: f"{op}: dy and x must have the same dtype")
    torch._check_value(dy.device == x.device, lambda: f"{op}: dy and x must be on the same device")


def _fake_check_layout(active, starts, sizes, owners, dim, op):
    # dim may be symbolic under dynamic shapes; the bounds check then becomes a guard/runtime assert.
    torch._check_value(len(starts) == len(sizes) == len(owners),
                       lambda: f"{op}: starts, sizes and owners must have the same length")
    for start, size in zip(starts, sizes):
        torch._check_value(size > 0 and start >= 0, lambda: f"{op}: block ranges must have start >= 0, size > 0")
        torch._check_value(start + size <= dim, lambda: f"{op}: block range out of bounds")
    torch._check_value(active.shape[0] == 1 + max(owners, default=-1),
                       lambda: f"{op}: active must have one entry per module")


def _fake_check_out(out, name, dy, shape, op):
    torch._check_type(out.dtype == dy.dtype, lambda: f"{op}: {name} and dy must have the same dtype")
    torch._check_value(out.device == dy.device, lambda: f"{op}: {name} and dy must be on the same device")
    torch._check_value(tuple(out.shape) == tuple(shape), lambda: f"{op}: {name} must have shape {tuple(shape)}")


def _weight_grad_fake(dy, x, active, starts, sizes, owners, axis):
    op = "mat_kernels::sparse_weight_grad"
    _fake_check_pair(dy, x, op)
    _fake_check_active(active, op)
    torch._check_value(axis in (0, 1), lambda: f"{op}: axis must be 0 or 1")
    _fake_check_layout(active, starts, sizes, owners, dy.shape[-1] if axis == 0 else x.shape[-1], op)
    return dy.new_empty((dy.shape[-1], x.shape[-1]))


def _weight_grad_accumulate_fake(grad_weight, dy, x, active, starts, sizes, owners, axis):
    op = "mat_kernels::sparse_weight_grad_accumulate"
    _fake_check_pair(dy, x, op)
    _fake_check_active(active, op)
    torch._check_value(axis in (0, 1), lambda: f"{op}: axis must be 0 or 1")
    _fake_check_out(grad_weight, "grad_weight", dy, (dy.shape[-1], x.shape[-1]), op)
    _fake_check_layout(active, starts, sizes, owners, dy.shape[-1] if axis == 0 else x.shape[-1], op)


def _bias_grad_fake(dy, active, starts, sizes, owners):
    op = "mat_kernels::sparse_bias_grad"
    _fake_check_matrix(dy, op, "dy")
    _fake_check_active(active, op)
    _fake_check_layout(active, starts, sizes, owners, dy.shape[-1], op)
    return dy.new_empty((dy.shape[-1],))


def _bias_grad_accumulate_fake(grad_bias, dy, active, starts, sizes, owners):
    op = "mat_kernels::sparse_bias_grad_accumulate"
    _fake_check_matrix(dy, op, "dy")
    _fake_check_active(active, op)
    _fake_check_out(grad_bias, "grad_bias", dy, (dy.shape[-1],), op)
    _fake_check_layout(active, starts, sizes, owners, dy.shape[-1], op)


def _input_grad_fake(dy, weight, active, starts, sizes, owners, axis):
    op = "mat_kernels::sparse_input_grad"
    _fake_check_matrix(dy, op, "dy")
    torch._check_value(weight.dim() == 2,
                       lambda: f"{op}: weight must be 2-D [d_out, d_in], got shape {tuple(weight.shape)}")
    torch._check_type(dy.dtype == weight.dtype, lambda: f"{op}: dy and weight must have the same dtype")
    torch._check_value(dy.device == weight.device, lambda: f"{op}: dy and weight must be on the same device")
    torch._check_value(dy.shape[-1] == weight.shape[0],
                       lambda: f"{op}: dy.size(-1) must equal d_out = weight.size(0), got dy {tuple(dy.shape)} and "
                               f"weight {tuple(weight.shape)}")
    _fake_check_active(active, op)
    torch._check_value(axis in (0, 1), lambda: f"{op}: axis must be 0 or 1")
    _fake_check_layout(active, starts, sizes, owners, weight.shape[0] if axis == 0 else weight.shape[1], op)
    return dy.new_empty((*dy.shape[:-1], weight.shape[1]))


# ---------------------------------------------------------------------------------------------------------------
# Autograd of the functional ops (used for double backward, e.g. gradient penalties). With G the incoming
# gradient of dW and G' = M ⊙ G: ∂L/∂dY = X G'ᵀ and ∂L/∂X = dY G'. For db: ∂L/∂dY[t] = m ⊙ g for every token t.
# For dX = dY (M ⊙ W), with G the incoming gradient of dX: ∂L/∂dY = G (M ⊙ W)ᵀ and ∂L/∂W = M ⊙ (dYᵀ G) summed over
# tokens, which is sparse_weight_grad(dY, G) itself (active blocks only).


def _gemm_grad_setup(ctx, inputs, output):
    """sparse_weight_grad(dy, x, ...) and sparse_input_grad(dy, weight, ...): save dy, the other operand, the mask."""
    dy, other, active, starts, sizes, owners, axis = inputs
    ctx.layout = (tuple(starts), tuple(sizes), tuple(owners), axis)
    ctx.save_for_backward(dy, other, active)


def _weight_grad_backward(ctx, grad):
    dy, x, active = ctx.saved_tensors
    starts, sizes, owners, axis = ctx.layout
    mask = block_mask(active, starts, sizes, owners, grad.shape[axis], device=grad.device, dtype=grad.dtype)
    g = grad * (mask[:, None] if axis == 0 else mask[None, :])
    d_dy = x @ g.t() if ctx.needs_input_grad[0] else None
    d_x = dy @ g if ctx.needs_input_grad[1] else None
    return d_dy, d_x, None, None, None, None, None


def _bias_grad_setup(ctx, inputs, output):
    dy, active, starts, sizes, owners = inputs
    ctx.layout = (tuple(starts), tuple(sizes), tuple(owners))
    ctx.dy_shape = dy.shape
    ctx.save_for_backward(active)


def _bias_grad_backward(ctx, grad):
    (active,) = ctx.saved_tensors
    starts, sizes, owners = ctx.layout
    mask = block_mask(active, starts, sizes, owners, grad.shape[0], device=grad.device, dtype=grad.dtype)
    d_dy = (grad * mask).expand(ctx.dy_shape) if ctx.needs_input_grad[0] else None
    return d_dy, None, None, None, None


def _input_grad_backward(ctx, grad):
    dy, weight, active = ctx.saved_tensors
    starts, sizes, owners, axis = ctx.layout
    d_dy = d_w = None
    if ctx.needs_input_grad[0]:
        mask = block_mask(active, starts, sizes, owners, weight.shape[axis], device=weight.device,
                          dtype=weight.dtype)
        wm = weight * (mask[:, None] if axis == 0 else mask[None, :])
        d_dy = grad @ wm.t()
    if ctx.needs_input_grad[1]:
        d_w = torch.ops.mat_kernels.sparse_weight_grad(dy, grad, active, starts, sizes, owners, axis)
    return d_dy, d_w, None, None, None, None, None


if _C is not None:
    torch.library.register_fake("mat_kernels::sparse_weight_grad")(_weight_grad_fake)
    torch.library.register_fake("mat_kernels::sparse_weight_grad_accumulate")(_weight_grad_accumulate_fake)
    torch.library.register_fake("mat_kernels::sparse_bias_grad")(_bias_grad_fake)
    torch.library.register_fake("mat_kernels::sparse_bias_grad_accumulate")(_bias_grad_accumulate_fake)
    torch.library.register_fake("mat_kernels::sparse_input_grad")(_input_grad_fake)
    torch.library.register_autograd("mat_kernels::sparse_weight_grad", _weight_grad_backward,
                                    setup_context=_gemm_grad_setup)
    torch.library.register_autograd("mat_kernels::sparse_bias_grad", _bias_grad_backward,
                                    setup_context=_bias_grad_setup)
    torch.library.register_autograd("mat_kernels::sparse_input_grad", _input_grad_backward,
                                    setup_context=_gemm_grad_setup)


# ---------------------------------------------------------------------------------------------------------------
# FLOPs: torch.utils.flop_counter counts mm/bmm/convolutions but knows nothing of custom ops, so a step through
# these ops would be counted as if its weight (and input) gradients cost nothing. The formulas are registered here,
# when the ops load, so every FlopCounterMode sees them without a call by the user. They count what the kernels
# execute: the GEMMs of the active blocks only (2 × multiply-adds). Bias sums are elementwise work, not counted.


def _active_width(active, sizes, owners) -> int:
    """Rows (columns) of the active blocks. The mask is a CPU tensor read on the host when the op runs. A fake mask
    (inductor estimates a graph node's FLOPs on fake tensors: ``torch._inductor.fx_utils.count_flops_fx``) has no
    values, and a compiled graph serves every mask: the count is then every block's, an upper bound."""
    if isinstance(active, torch.Tensor) and torch._subclasses.fake_tensor.is_fake(active):
        return sum(sizes)
    act = active.bool().tolist() if isinstance(active, torch.Tensor) else list(active)
    return sum(s for s, o in zip(sizes, owners) if act[o])


def _weight_grad_flops(dy, x, active, starts, sizes, owners, axis, *args, out_val=None, **kwargs) -> int:
    tokens = math.prod(dy.shape[:-1])  # (not numel // d_out: d_out may be 0)
    width = _active_width(active, sizes, owners)
    return 2 * tokens * (width * x.shape[-1] if axis == 0 else dy.shape[-1] * width)


def _input_grad_flops(dy, weight, active, starts, sizes, owners, axis, *args, out_val=None, **kwargs) -> int:
    # dX = dY (M ⊙ W): the GEMMs contract (axis 0) or produce (axis 1) the active width only; the other
    # dimension of W (d_in for row blocks, d_out for column blocks) is full.
    tokens = math.prod(dy.shape[:-1])
    width = _active_width(active, sizes, owners)
    return 2 * tokens * width * (weight.shape[1] if axis == 0 else weight.shape[0])


def _weight_grad_accumulate_flops(grad_weight, dy, x, active, starts, sizes, owners, axis, *args, out_val=None,
                                  **kwargs) -> int:
    return _weight_grad_flops(dy, x, active, starts, sizes, owners, axis)


if _C is not None:
    from torch.utils.flop_counter import register_flop_formula

    register_flop_formula(torch.ops.mat_kernels.sparse_weight_grad, get_raw=True)(_weight_grad_flops)
    register_flop_formula(torch.ops.mat_kernels.sparse_weight_grad_accumulate, get_raw=True)(
        _weight_grad_accumulate_flops)
    register_flop_formula(torch.ops.mat_kernels.sparse_input_grad, get_raw=True)(_input_grad_flops)
