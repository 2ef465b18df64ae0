"""Sparse-update layers: :class:`SparseUpdateLinear`, a drop-in ``nn.Linear`` (same parameters and ``state_dict``
keys), and :class:`SparseUpdateConv1D` (Hugging Face's transposed ``Conv1D``), whose backward computes ``dX`` in
full and ``dW``/``db`` only for the active blocks set in place with ``set_active`` (the functional map and its
gradients: :mod:`mat_kernels.nn.sparse_function`; ``nn.MultiheadAttention``: :mod:`.sparse_mha`)."""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from mat_kernels import routing
from mat_kernels.blocks import BlockSpec
from mat_kernels.nn import sparse_function
from mat_kernels.nn.sparse_function import (
    LAST_ROUTE,
    ORIGINAL_LINEAR,
    as_mask,
    check_frozen_backward,
    mask_snapshot,
    sparse_layout,
    sparse_update_linear,
)
from mat_kernels.ops import sparse_grad as _ops

__all__ = ["SparseUpdateLinear", "SparseUpdateConv1D", "SparseUpdateMixin"]


class SparseUpdateMixin(routing.ExactBackward):
    """What the sparse-update layers (here and :mod:`mat_kernels.nn.sparse_mha`) share: the layout, the CPU activity
    mask, the backward modes. The layer's linear map is ``self._linear_weight()`` (``[out_features, in_features]``,
    a view of the stored weight)."""

    def _init_sparse(self, row_blocks, col_blocks, accumulate_grad, frozen_backward, shared_bias) -> None:
        _ops.require_extension()
        self.layout = sparse_layout(self.out_features, self.in_features, row_blocks, col_blocks)
        self.accumulate_grad = bool(accumulate_grad)
        self.frozen_backward = check_frozen_backward(frozen_backward)
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
        self._active.copy_(as_mask(active, self.layout.num_modules))

    def set_frozen_backward(self, mode: str) -> None:
        """``"dw"``: frozen blocks skip their weight gradient only; ``"detach"``: no gradient flows through them."""
        self.frozen_backward = check_frozen_backward(mode)

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

    def _dense_forward(self, input: torch.Tensor) -> torch.Tensor:
        return ORIGINAL_LINEAR(input, self._linear_weight(), self.bias)

    def _linear_weight_in(self) -> int:
        return self.weight.shape[1]

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        w = self.weight
        triton = input.device.type in sparse_function.TRITON_DEVICES if isinstance(input, torch.Tensor) else False
        if self._override is None and not self.accumulate_grad and not triton \
                and not torch.compiler.is_compiling() and mask_snapshot(self._active)[1][1] \
                and isinstance(input, torch.Tensor) and input.dim() >= 1 and input.device == w.device \
                and input.dtype == w.dtype and input.shape[-1] == self._linear_weight_in():
            # Every block active, eager, not routed to the Triton kernels (CPU): the layer is a plain linear and
            # autograd's own backward is exactly the sparse one; skipping the custom Function saves its host cost
            # (what made an all-active MAT step slower than a dense one). A compiled graph keeps the ops (no
            # dependence on the mask's values: no recompilation), and CUDA keeps the one-launch dW + db kernel.
            # Inputs F.linear would reject take the sparse path, whose errors name the argument.
            LAST_ROUTE.update(route="dense", reason="every block active: autograd's linear backward")
            return self._dense_forward(input)
        detach, weight_grad = self._override or (self.frozen_backward == "detach", True)
        return sparse_update_linear(input, self._linear_weight(), self.bias, active=self._active,
                                    layout=self.layout, accumulate_grad=self.accumulate_grad,
                                    frozen_backward="detach" if detach else "dw", shared_bias=self.shared_bias,
                                    weight_grad=weight_grad)


def _sharing(new: nn.Module, source: nn.Module, in_features: int, out_features: int) -> nn.Module:
    """``new`` (made with ``__new__``) initialised as a module holding ``source``'s weight and bias objects (so an
    optimizer built on ``source`` stays valid) in ``source``'s train/eval mode."""
    nn.Module.__init__(new)
    new.in_features, new.out_features = in_features, out_features
    new.weight = source.weight
    new.register_parameter("bias", source.bias)
    new.train(source.training)
    return new


class SparseUpdateLinear(SparseUpdateMixin, nn.Linear):
    """``nn.Linear`` whose backward updates only active blocks of its weight (and bias).

    Same parameters (``weight [out_features, in_features]``, ``bias [out_features]``) and ``state_dict`` keys as
    ``nn.Linear``; the activity mask is not part of the state (the MAT controller owns it). The mask lives on the
    CPU whatever device the module is moved to. All modules start active, so a fresh layer trains exactly like
    ``nn.Linear``.

    Args:
        in_features, out_features, bias, device, dtype: as ``nn.Linear``.
        row_blocks / col_blocks: block spec (see :class:`mat_kernels.WeightBlocks`); neither: the whole weight is one
            module.
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
        new = _sharing(cls.__new__(cls), linear, linear.in_features, linear.out_features)
        new._init_sparse(row_blocks, col_blocks, accumulate_grad, frozen_backward, shared_bias)
        return new

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` sharing this layer's parameters (e.g. for export)."""
        return _sharing(nn.Linear.__new__(nn.Linear), self, self.in_features, self.out_features)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._state_repr()}"


class SparseUpdateConv1D(SparseUpdateMixin, nn.Module):
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
        new = _sharing(cls.__new__(cls), conv, *weight.shape)
        new.nx, new.nf = weight.shape
        new._init_sparse(row_blocks, col_blocks, False, frozen_backward, shared_bias)
        return new

    def _linear_weight(self) -> torch.Tensor:
        return self.weight.t()

    def _linear_weight_in(self) -> int:
        return self.nx

    def _dense_forward(self, input: torch.Tensor) -> torch.Tensor:  # HF Conv1D's own forward
        return torch.addmm(self.bias, input.reshape(-1, self.nx), self.weight).view(*input.shape[:-1], self.nf)

    def extra_repr(self) -> str:
        return f"nf={self.nf}, nx={self.nx}, {self._state_repr()}"

