"""Sparse-update linear layer: the forward is ``F.linear``; the backward computes ``dX`` in full and ``dW``/``db``
only for the active blocks of the weight (MAT: frozen modules skip their weight-gradient GEMMs).

Three tiers:

* ops ``torch.ops.mat_kernels.sparse_*`` (:mod:`mat_kernels.ops.sparse_grad`): the gradients themselves;
* :func:`sparse_update_linear`: functional, differentiable ``y = x Wᵀ + b``;
* :class:`SparseUpdateLinear`: a drop-in ``nn.Linear`` (same parameters and ``state_dict`` keys) whose active
  blocks are changed in place with :meth:`SparseUpdateLinear.set_active`.

Layout and mask. A :class:`SparseLayout` is the static part: the blocks along one axis of W as ranges
``(start, size)`` grouped into modules (the same block specs as :func:`mat_kernels.estimate_lambda_max`: an int
for equal blocks, a list of ranges, or a list of lists of ranges such as :func:`mat_kernels.fused_qkv_heads`), or
the whole tensor as one module. The mask is a 1-D bool **CPU** tensor with one entry per module: the kernels read it
on the host (no GPU synchronisation) and, under ``torch.compile``, it is a graph input while the layout is a
constant, so changing which modules are active never recompiles, and updating it in place never reallocates.

Gradients, with ``M`` the 0/1 mask of active rows (row blocks) or columns (column blocks):
``dX = dY W`` (in full, the default), ``dW = M ⊙ (dYᵀ X)``, and ``db = m ⊙ Σ_t dY[t]`` for row blocks (each row block
owns its bias entries). A *shared* bias (column blocks always; row blocks with ``shared_bias=True``) belongs to no
block: it gets its full gradient ``Σ_t dY[t]`` at every backward, whatever the mask. When no block is active the
weight is wholly frozen: in eager mode ``weight.grad`` (and an unshared ``bias.grad``) stay ``None``, so optimizers
skip them. Under ``torch.compile`` that choice would be a data-dependent graph, so a compiled wholly-frozen layer
gets zero gradients instead (freeze it structurally with ``requires_grad_(False)`` if ``None`` matters; that
recompiles once).

Partial backpropagation (``frozen_backward="detach"``, :meth:`SparseUpdateLinear.set_frozen_backward`): no gradient
flows through a frozen block either, ``dX = dY (M ⊙ W)`` (op ``mat_kernels::sparse_input_grad``: one GEMM per run of
active rows or columns), so a frozen head's rows drop out of a fused QKV's input gradient and a wholly frozen layer
returns no input gradient at all (eager), which stops the backward of the branch it sits on.
"""
from __future__ import annotations

import contextlib
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from mat_kernels.measure.blocks import BlockSpec, WeightBlocks
from mat_kernels.ops import sparse_grad as _ops

__all__ = ["SparseLayout", "sparse_update_linear", "SparseUpdateLinear", "SparseUpdateConv1D"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_ORIG_LINEAR = F.linear

if _ops.extension_available():  # OpOverloads, resolved once: the backward calls them on every step
    _WEIGHT_GRAD = torch.ops.mat_kernels.sparse_weight_grad.default
    _WEIGHT_GRAD_ACC = torch.ops.mat_kernels.sparse_weight_grad_accumulate.default
    _BIAS_GRAD = torch.ops.mat_kernels.sparse_bias_grad.default
    _BIAS_GRAD_ACC = torch.ops.mat_kernels.sparse_bias_grad_accumulate.default
    _INPUT_GRAD = torch.ops.mat_kernels.sparse_input_grad.default


SparseLayout = WeightBlocks
"""The layout of a sparse-update layer: the :class:`mat_kernels.WeightBlocks` of its weight, built with
``SparseLayout.build(d_out, d_in, row_blocks=..., col_blocks=...)`` (ranges of different modules disjoint)."""


def _layout(d_out: int, d_in: int, row_blocks: BlockSpec, col_blocks: BlockSpec) -> WeightBlocks:
    return WeightBlocks.build(d_out, d_in, row_blocks=row_blocks, col_blocks=col_blocks).check_disjoint()


def _as_mask(active, num_modules: int, *, name: str = "active") -> torch.Tensor:
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


def _check_call(x, weight, bias, active, layout: SparseLayout, accumulate_grad: bool) -> None:
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
        # Save only what the requested gradients need: X for dW, W for dX. The mask is copied (a few bytes on the
        # CPU) so that the backward uses the mask of its own forward even if set_active runs in between.
        ctx.save_for_backward(x if needs_w and mode[1] else None, weight if needs_x else None, active.clone())
        return _ORIG_LINEAR(x, weight, bias)  # not F.linear: it is rerouted while an nn.MultiheadAttention runs

    @staticmethod
    def backward(ctx, dy):
        x, weight, active = ctx.saved_tensors
        starts, sizes, owners, axis = ctx.layout
        detach, weight_grad, shared_bias = ctx.mode
        needs_x, needs_w, needs_b = ctx.needs_input_grad[:3]
        compiling = torch.compiler.is_compiling()
        # Eager: decisions on the mask's values are free (it lives on the CPU). Compiled: the graph cannot depend on
        # them, so the ops run (no GEMM inside for frozen blocks) and return zeros.
        any_active = compiling or bool(active.any())
        all_active = not compiling and bool(active.all())
        dx = dw = db = None
        if needs_x:
            if not detach or all_active:
                dx = dy.matmul(weight)
            elif any_active:
                dx = _INPUT_GRAD(_as_matrix(dy), weight, active, starts, sizes, owners, axis).view(
                    *dy.shape[:-1], weight.shape[1])
            # else: a wholly frozen layer under partial backpropagation passes no gradient (None stops the branch)
        want_w = needs_w and weight_grad and any_active
        want_b = needs_b and weight_grad and (any_active or shared_bias)
        if want_w or want_b:
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


def sparse_update_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    active: torch.Tensor,
    row_blocks: BlockSpec = None,
    col_blocks: BlockSpec = None,
    layout: SparseLayout | None = None,
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
        row_blocks / col_blocks: block spec of the layout (see :class:`SparseLayout`), or ``layout`` prebuilt;
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
        layout = _layout(weight.shape[0], weight.shape[1], row_blocks, col_blocks)
    elif row_blocks is not None or col_blocks is not None:
        raise ValueError("give either layout or row_blocks/col_blocks, not both")
    elif not isinstance(layout, WeightBlocks):
        raise TypeError(f"layout must be a WeightBlocks (SparseLayout), got {type(layout).__name__}")
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
    detach = _check_frozen_backward(frozen_backward) == "detach"
    mode = (detach, bool(weight_grad), bool(shared_bias) or layout.dim == 1)
    return _SparseUpdateLinearFunction.apply(x, weight, bias, active, layout.starts, layout.sizes, layout.owners,
                                             layout.dim, accumulate_grad, mode)


FROZEN_BACKWARD = ("dw", "detach")


def _check_frozen_backward(value) -> str:
    if value not in FROZEN_BACKWARD:
        raise ValueError(f"frozen_backward must be one of {FROZEN_BACKWARD}, got {value!r}")
    return value


class _SparseUpdateMixin:
    """What the sparse-update layers share: the layout, the CPU activity mask, the backward modes. The layer's
    linear map is ``self._linear_weight()`` (``[out_features, in_features]``, a view of the stored weight)."""

    def _init_sparse(self, row_blocks, col_blocks, accumulate_grad, frozen_backward, shared_bias) -> None:
        _ops.require_extension()
        self.layout = _layout(self.out_features, self.in_features, row_blocks, col_blocks)
        self.accumulate_grad = bool(accumulate_grad)
        self.frozen_backward = _check_frozen_backward(frozen_backward)
        self.shared_bias = bool(shared_bias) or self.layout.dim == 1
        # Exact backward with or without weight gradients, whatever frozen_backward says (set by a measurement).
        self._override: tuple[bool, bool] | None = None
        # A plain attribute, not a buffer: Module.to()/cuda() must not move it off the CPU.
        self._active = torch.ones(self.layout.num_modules, dtype=torch.bool)

    @property
    def num_modules(self) -> int:
        return self.layout.num_modules

    @property
    def active(self) -> torch.Tensor:
        """A copy of the activity mask (bool ``[num_modules]``, CPU); change it with :meth:`set_active`."""
        return self._active.clone()

    def set_active(self, active) -> None:
        """Set which modules are updated from the next forward on: bool tensor or sequence of bools
        ``[num_modules]``. Copied in place into the CPU mask (no reallocation; a CUDA tensor costs one sync).

        A backward always uses the mask of its own forward: a change between a forward and its backward applies
        from the next forward on."""
        self._active.copy_(_as_mask(active, self.layout.num_modules))

    def set_frozen_backward(self, mode: str) -> None:
        """``"dw"``: frozen blocks skip their weight gradient only; ``"detach"``: no gradient flows through them."""
        self.frozen_backward = _check_frozen_backward(mode)

    @contextlib.contextmanager
    def exact_backward(self, *, weight_grad: bool):
        """Within the context, forwards record an exact backward (``dX = dY W`` whatever ``frozen_backward`` says),
        with the active blocks' weight gradients (``weight_grad=True``) or none at all (a measurement's backward)."""
        prev, self._override = self._override, (False, bool(weight_grad))
        try:
            yield
        finally:
            self._override = prev

    def _linear_weight(self) -> torch.Tensor:
        return self.weight

    def _state_repr(self) -> str:
        return (f"layout={self.layout.describe()}, active={int(self._active.sum())}/{self.layout.num_modules}, "
                f"frozen_backward={self.frozen_backward!r}")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        detach, weight_grad = self._override or (self.frozen_backward == "detach", True)
        return sparse_update_linear(input, self._linear_weight(), self.bias, active=self._active,
                                    layout=self.layout, accumulate_grad=self.accumulate_grad,
                                    frozen_backward="detach" if detach else "dw", shared_bias=self.shared_bias,
                                    weight_grad=weight_grad)


class SparseUpdateLinear(_SparseUpdateMixin, nn.Linear):
    """``nn.Linear`` whose backward updates only active blocks of its weight (and bias).

    Same parameters (``weight [out_features, in_features]``, ``bias [out_features]``) and ``state_dict`` keys as
    ``nn.Linear``; the activity mask is not part of the state (the MAT controller owns it). The mask lives on the
    CPU whatever device the module is moved to. All modules start active, so a fresh layer trains exactly like
    ``nn.Linear``.

    Args:
        in_features, out_features, bias, device, dtype: as ``nn.Linear``.
        row_blocks / col_blocks: block spec (see :class:`SparseLayout`); neither: the whole weight is one module.
        accumulate_grad: see :func:`sparse_update_linear` (eager-only).
        frozen_backward: ``"dw"`` (default) or ``"detach"`` (no gradient through frozen blocks), see
            :func:`sparse_update_linear`; changed with :meth:`set_frozen_backward`.
        shared_bias: the bias belongs to no block (full gradient at every backward); always so for column blocks.

    Example::

        qkv = SparseUpdateLinear(768, 2304, row_blocks=mat_kernels.fused_qkv_heads(12, 64))
        qkv.set_active(lam > threshold)   # bool [12]; in place, no recompilation under torch.compile
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 row_blocks: BlockSpec = None, col_blocks: BlockSpec = None, accumulate_grad: bool = False,
                 frozen_backward: str = "dw", shared_bias: bool = False):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_sparse(row_blocks, col_blocks, accumulate_grad, frozen_backward, shared_bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, row_blocks: BlockSpec = None, col_blocks: BlockSpec = None,
                    accumulate_grad: bool = False, frozen_backward: str = "dw",
                    shared_bias: bool = False) -> "SparseUpdateLinear":
        """Wrap an existing ``nn.Linear``, sharing its parameter objects (optimizers built on it stay valid)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight = linear.weight
        new.register_parameter("bias", linear.bias)
        new.train(linear.training)
        new._init_sparse(row_blocks, col_blocks, accumulate_grad, frozen_backward, shared_bias)
        return new

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` sharing this layer's parameters (e.g. for export)."""
        lin = nn.Linear.__new__(nn.Linear)
        nn.Module.__init__(lin)
        lin.in_features, lin.out_features = self.in_features, self.out_features
        lin.weight = self.weight
        lin.register_parameter("bias", self.bias)
        lin.train(self.training)
        return lin

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._state_repr()}"


class SparseUpdateConv1D(_SparseUpdateMixin, nn.Module):
    """Hugging Face's ``Conv1D`` (GPT-2: ``y = x @ W + b`` with ``W`` stored ``[in_features, out_features]``) whose
    backward updates only active blocks. Blocks are stated in the linear-map orientation ``[out_features,
    in_features]`` like everywhere in mat_kernels: row blocks are *columns* of the stored weight. The kernels run on
    the transposed view (no copy); parameters and ``state_dict`` keys are the ``Conv1D``'s.

    Build it from a ``Conv1D`` with :meth:`from_conv1d` (which shares its parameters); :class:`mat_kernels.MAT`
    does so for every ``Conv1D`` whose weight holds module slices.
    """

    @classmethod
    def from_conv1d(cls, conv, *, row_blocks: BlockSpec = None, col_blocks: BlockSpec = None,
                    frozen_backward: str = "dw", shared_bias: bool = False) -> "SparseUpdateConv1D":
        """Wrap a Hugging Face ``Conv1D`` (weight ``[nx, nf]``, bias ``[nf]``), sharing its parameters."""
        weight = getattr(conv, "weight", None)
        if type(conv).__name__ != "Conv1D" or not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise TypeError(f"conv must be a Hugging Face Conv1D, got {type(conv).__name__}")
        new = cls()
        new.nx, new.nf = weight.shape
        new.in_features, new.out_features = new.nx, new.nf
        new.weight = conv.weight
        new.register_parameter("bias", conv.bias)
        new.train(conv.training)
        new._init_sparse(row_blocks, col_blocks, False, frozen_backward, shared_bias)
        return new

    def _linear_weight(self) -> torch.Tensor:
        return self.weight.t()

    def extra_repr(self) -> str:
        return f"nf={self.nf}, nx={self.nx}, {self._state_repr()}"


# ----------------------------------------------------------------------------------------------------------------
# nn.MultiheadAttention: no layer to swap
# ----------------------------------------------------------------------------------------------------------------
# id(parameter) -> its sparse-update state. Weak values: when the controller (MAT) that holds a state is gone, the
# entry goes too and the attention trains through plain F.linear again; while a state lives it holds its
# parameter, so the id cannot be reused by another tensor.
_MHA_WEIGHTS: "weakref.WeakValueDictionary[int, SparseUpdateMHAWeight]" = weakref.WeakValueDictionary()
_MHA_BY_MODULE: dict[int, list] = {}  # id(attention module) -> weak references to its weights' states
_MHA_PATCH_DEPTH = [0]


def _mha_sparse_linear(input, weight, bias=None):
    """``F.linear`` while a gated ``nn.MultiheadAttention`` runs its forward: calls on a gated weight (or on a row
    view of it: cross-attention splits ``in_proj_weight`` into Q and K/V rows) take the sparse-update route."""
    holder, r0 = _MHA_WEIGHTS.get(id(weight)), 0
    if holder is None and isinstance(weight, torch.Tensor) and weight._base is not None:
        holder = _MHA_WEIGHTS.get(id(weight._base))
        if holder is not None:
            p = holder.weight
            if weight.dim() != 2 or weight.stride() != p.stride() or weight.shape[1] != p.shape[1]:
                holder = None  # not a block of whole rows: leave it to autograd (exact)
            else:
                r0 = (weight.storage_offset() - p.storage_offset()) // p.stride(0)
    if holder is None:
        return _ORIG_LINEAR(input, weight, bias)
    return holder._call(input, weight, bias, r0)


class SparseUpdateMHAWeight(_SparseUpdateMixin):
    """Sparse updates for a weight of ``nn.MultiheadAttention`` (``in_proj_weight``, ``q/k/v_proj_weight``,
    ``out_proj.weight``), which ``F.multi_head_attention_forward`` passes straight to ``F.linear`` (whole, or as
    row views for cross-attention): there is no layer to swap. While the attention module runs its forward,
    ``torch.nn.functional.linear`` is routed through :func:`sparse_update_linear` for this weight (forward pre- and
    post-hooks; restored even when the forward raises), with the layout restricted to the rows a view covers.

    Same interface as :class:`SparseUpdateLinear` (``set_active``, ``exact_backward``, ``set_frozen_backward``);
    not an ``nn.Module`` (the parameter stays where it is). :meth:`remove` undoes the hooks.
    """

    def __init__(self, attention: nn.MultiheadAttention, weight: torch.Tensor, *, row_blocks: BlockSpec = None,
                 col_blocks: BlockSpec = None, frozen_backward: str = "dw", shared_bias: bool = False):
        if not isinstance(attention, nn.MultiheadAttention):
            raise TypeError(f"attention must be an nn.MultiheadAttention, got {type(attention).__name__}")
        owned = [attention.in_proj_weight, attention.q_proj_weight, attention.k_proj_weight,
                 attention.v_proj_weight, attention.out_proj.weight]
        if not any(weight is p for p in owned if p is not None):
            raise ValueError("weight must be one of the attention module's projection weights")
        if id(weight) in _MHA_WEIGHTS:
            raise ValueError("this weight already has a SparseUpdateMHAWeight (another MAT on this model?); "
                             "remove() it first")
        self.attention, self.weight = attention, weight
        self.out_features, self.in_features = weight.shape
        self._init_sparse(row_blocks, col_blocks, False, frozen_backward, shared_bias)
        self._views: dict[tuple[int, int], tuple[SparseLayout, torch.Tensor]] = {}
        self._routed = 0  # calls taken through the sparse route (a forward with none was bypassed)
        _MHA_WEIGHTS[id(weight)] = self
        refs = _MHA_BY_MODULE.setdefault(id(attention), [])
        refs[:] = [r for r in refs if r() is not None]  # states whose MAT is gone
        refs.append(weakref.ref(self))
        self._handles = [attention.register_forward_pre_hook(_mha_enter),
                         attention.register_forward_hook(_mha_exit, always_call=True)]

    def remove(self) -> None:
        """Remove the hooks; the weight trains through plain ``F.linear`` again."""
        for h in self._handles:
            h.remove()
        self._handles = []
        _MHA_WEIGHTS.pop(id(self.weight), None)
        refs = [r for r in _MHA_BY_MODULE.get(id(self.attention), ()) if r() is not None and r() is not self]
        if refs:
            _MHA_BY_MODULE[id(self.attention)] = refs
        else:
            _MHA_BY_MODULE.pop(id(self.attention), None)

    def _view(self, r0: int, rows: int) -> tuple[SparseLayout, torch.Tensor | None]:
        """The layout of rows ``[r0, r0 + rows)`` and the indices of its modules in the full mask."""
        if r0 == 0 and rows == self.out_features:
            return self.layout, None
        key = (r0, rows)
        if key not in self._views:
            if self.layout.dim != 0:
                raise ValueError("a row view of a weight with column blocks")
            per_module: dict[int, list[tuple[int, int]]] = {}
            for s, n, m in zip(self.layout.starts, self.layout.sizes, self.layout.owners):
                lo, hi = max(s, r0), min(s + n, r0 + rows)
                if lo < hi:
                    per_module.setdefault(m, []).append((lo - r0, hi - lo))
            order = sorted(per_module)
            sub = _layout(rows, self.in_features, [per_module[m] for m in order], None)
            self._views[key] = (sub, torch.tensor(order, dtype=torch.long))
        return self._views[key]

    def _call(self, x, weight, bias, r0: int):
        self._routed += 1
        layout, idx = self._view(r0, weight.shape[0])
        active = self._active if idx is None else self._active[idx]
        detach, weight_grad = self._override or (self.frozen_backward == "detach", True)
        # in_proj_bias entries follow their rows unless the layout says the bias is shared (column blocks)
        return sparse_update_linear(x, weight, bias, active=active, layout=layout,
                                    frozen_backward="detach" if detach else "dw",
                                    shared_bias=self.shared_bias, weight_grad=weight_grad)

    def __repr__(self) -> str:
        return f"SparseUpdateMHAWeight({tuple(self.weight.shape)}, {self._state_repr()})"


def _holders_of(module) -> list["SparseUpdateMHAWeight"]:
    """The live states of this attention module's weights (a short list: no scan of every registered weight)."""
    refs = _MHA_BY_MODULE.get(id(module), ())
    return [h for h in (r() for r in refs) if h is not None and h.attention is module and h._handles]


def _mha_enter(module, args, kwargs=None):
    if _MHA_PATCH_DEPTH[0] == 0:
        F.linear = _mha_sparse_linear
    _MHA_PATCH_DEPTH[0] += 1
    module._mk_routed = sum(h._routed for h in _holders_of(module))


def _mha_exit(module, args, output):
    if _MHA_PATCH_DEPTH[0] == 0:
        return  # an earlier pre-hook raised before ours ran: nothing to undo
    _MHA_PATCH_DEPTH[0] -= 1
    if _MHA_PATCH_DEPTH[0] == 0:
        F.linear = _ORIG_LINEAR
    holders = _holders_of(module)
    before = getattr(module, "_mk_routed", None)
    if before is None or not holders or not torch.is_grad_enabled():
        return
    from mat_kernels.measure import capture  # a measurement's recording F.linear (registered later) takes precedence on purpose

    if capture._PATCH_DEPTH[0] == 0 and any(h.weight.requires_grad for h in holders) and \
            sum(h._routed for h in holders) == before:
        # The attention ran with gradients but never through the routed F.linear: torch.compile traced it with
        # the original F.linear (or something else replaced it). Training would silently differ from eager.
        raise RuntimeError(
            "mat_kernels: the sparse updates of this nn.MultiheadAttention's weights (SparseUpdateMHAWeight, "
            "installed by MAT) were bypassed: its forward never called the routed F.linear (torch.compile does "
            "this). Run the attention eagerly, or build MAT(..., sparse_backward=False) (frozen heads then compute "
            "their full weight gradient, discarded by the optimizer)")
