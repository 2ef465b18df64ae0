"""An optimizer step that leaves frozen module slices bit-for-bit unchanged.

MAT freezes *slices* of tensors (one head's rows of a fused QKV weight, its columns of an output projection).
PyTorch optimizers update whole tensors: a zero gradient still moves a frozen entry through momentum and weight
decay. :class:`FrozenSliceOptimizer` wraps torch's SGD, Adam or AdamW (foreach or fused, as configured) and, per
step:

* a tensor whose entries are all frozen gets ``grad = None``: torch skips it entirely (no update, no moment update,
  no weight decay, no step count);
* a tensor frozen in part: the frozen entries of the parameter and of every optimizer state tensor
  (``momentum_buffer``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``) are copied aside, torch's step runs, and
  they are copied back. State created by this very step is zeroed at frozen entries (as if never touched). Stale
  moments are kept while a slice is frozen and used again when it re-enters (PAPER.md [D]);
* Adam/AdamW bias correction per block: torch counts steps per tensor, but a block frozen for some steps has taken
  fewer. For active blocks whose own count differs from the tensor's, the update of this step is recomputed from
  the saved parameter with that block's count: ``p = p₀·(1 − lr·wd)`` (AdamW) ``− lr/(1−β₁ᵗ) · m / (√(v)/√(1−β₂ᵗ)
  + ε)``, t = the block's count (``max_exp_avg_sq`` in place of ``v`` with amsgrad).

Which entries belong to which module is given per parameter as :class:`mat_kernels.WeightBlocks` (the one
representation, :func:`mat_kernels.group_by_weight` builds them; a bias vector is seen as ``[d_out, 1]``,
:meth:`~mat_kernels.WeightBlocks.for_bias`), in the linear-map orientation of each weight; Hugging Face ``Conv1D``
weights (stored transposed) and convolution weights (``[O, C, kh, kw]`` = ``[O, C·kh·kw]``) are viewed
accordingly.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Sequence, Union

import torch

from mat_kernels.measure.blocks import WeightBlocks

__all__ = ["Block", "FrozenSliceOptimizer", "SUPPORTED_OPTIMIZERS"]

SUPPORTED_OPTIMIZERS = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)
_STATE_KEYS = ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")


@dataclass(frozen=True)
class Block:
    """Entries ``[start, start + size)`` along ``axis`` (0 rows, 1 columns; ``size = None``: the whole tensor) of a
    parameter's linear view, owned by module ``module``: the optimizer's internal unit, one per range of a
    :class:`mat_kernels.WeightBlocks`.

    .. deprecated:: passing lists of ``Block`` to :class:`FrozenSliceOptimizer` is deprecated; give
       :class:`mat_kernels.WeightBlocks` (validated against the parameter's shape) instead."""

    module: int
    axis: int = 0
    start: int = 0
    size: int | None = None


BlocksArg = Union[WeightBlocks, Sequence[WeightBlocks], Sequence[Block]]


def _parts(p: torch.Tensor, given: BlocksArg, transposed: bool) -> list[Block]:
    """The internal blocks of parameter ``p`` from its WeightBlocks (checked against its linear view)."""
    items = [given] if isinstance(given, WeightBlocks) else list(given)
    if items and all(isinstance(b, Block) for b in items):
        warnings.warn("FrozenSliceOptimizer: lists of optim.Block are deprecated; give mat_kernels.WeightBlocks "
                      "(see mat_kernels.group_by_weight)", DeprecationWarning, stacklevel=4)
        return items
    if not items or not all(isinstance(b, WeightBlocks) for b in items):
        raise TypeError(f"blocks of each parameter must be WeightBlocks or a list of them, got {given!r}")
    shape = tuple(_view(p, transposed).shape)
    out = []
    for wb in items:
        if wb.shape is not None and any(s is not None and s != t for s, t in zip(wb.shape, shape)):
            raise ValueError(f"blocks {wb.name}: built for shape {wb.shape}, but the parameter's linear view is "
                             f"{shape}")
        if wb.shape is None or None in wb.shape:
            wb = WeightBlocks(wb.axis, wb.modules, shape, index=wb.index, name=wb.name)  # bounds checked here
        for m, ranges in zip(wb.index, wb.modules):
            if wb.axis == "all":
                out.append(Block(m))
            out += [Block(m, wb.dim, start, size) for start, size in ranges]
    return out


def _view(t: torch.Tensor, transposed: bool) -> torch.Tensor:
    """2-D linear-map view ``[d_out, d_in]`` of a parameter-shaped tensor (1-D: ``[d, 1]``)."""
    if t.dim() == 1:
        return t.unsqueeze(1)
    if transposed:
        return t.t()
    return t if t.dim() == 2 else t.view(t.shape[0], -1)


def _part(t: torch.Tensor, b: Block, transposed: bool) -> torch.Tensor:
    v = _view(t, transposed)
    return v if b.size is None else v.narrow(b.axis, b.start, b.size)


class FrozenSliceOptimizer:
    """Wrap ``optimizer`` so that :meth:`step` never changes frozen blocks. See the module docstring.

    Args:
        optimizer: a ``torch.optim.SGD``, ``Adam`` or ``AdamW`` (others are refused: their state cannot be kept
            frozen without knowing it).
        blocks: ``{parameter: WeightBlocks or [WeightBlocks, ...]}`` for every parameter that holds module entries
            (``index`` of each: the modules' entries of the activity mask); parameters not listed are always
            trained.
        transposed: parameters stored ``[d_in, d_out]`` (Hugging Face ``Conv1D``).
        num_modules: length of the activity masks given to :meth:`step`.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, blocks: dict[torch.Tensor, BlocksArg], *,
                 transposed: set | None = None, num_modules: int):
        if not isinstance(optimizer, SUPPORTED_OPTIMIZERS):
            raise TypeError(
                f"unsupported optimizer {type(optimizer).__name__}: MAT keeps frozen slices frozen (no update, no "
                "moment update, no weight decay) for torch.optim.SGD, Adam and AdamW only"
            )
        for g in optimizer.param_groups:
            if g.get("differentiable"):
                raise ValueError("differentiable=True optimizers are not supported")
        known = {p for g in optimizer.param_groups for p in g["params"]}
        for p in blocks:
            if p not in known:
                raise ValueError("a module parameter is not in the optimizer's param_groups")
        self.optimizer = optimizer
        self.transposed = {id(p) for p in (transposed or ())}
        self.blocks = {p: _parts(p, b, id(p) in self.transposed) for p, b in blocks.items()}
        self.num_modules = num_modules
        for p, parts in self.blocks.items():
            if any(not 0 <= b.module < num_modules for b in parts):
                raise ValueError(f"a block's module index is outside [0, {num_modules}) (num_modules)")
        self.block_steps = torch.zeros(num_modules, dtype=torch.long)
        self.steps_taken = 0  # steps run (a GradScaler skips the call on inf/NaN gradients)
        self._group = {p: g for g in optimizer.param_groups for p in g["params"]}

    # --------------------------------------------------------------------------------------------------------
    def _covers_all(self, p: torch.Tensor, frozen: list[Block]) -> bool:
        if any(b.size is None for b in frozen):
            return True
        v = _view(p, id(p) in self.transposed)
        for axis in (0, 1):
            spans = sorted((b.start, b.start + b.size) for b in frozen if b.axis == axis)
            reach = 0
            for lo, hi in spans:
                if lo > reach:
                    break
                reach = max(reach, hi)
            if reach >= v.shape[axis]:
                return True
        return False

    @torch.no_grad()
    def step(self, active: torch.Tensor, closure=None):
        """One optimizer step with modules ``active`` (bool ``[num_modules]``); inactive modules' blocks are frozen.
        ``closure`` (recomputes the loss and its gradients) runs first: the frozen blocks are set aside from the
        gradients it leaves."""
        active = torch.as_tensor(active, dtype=torch.bool).cpu()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # live groups: the optimizer's load_state_dict replaces the dicts an LR scheduler writes lr into
        self.refresh_param_groups()
        if active.shape != (self.num_modules,):
            raise ValueError(f"active must have shape [{self.num_modules}], got {tuple(active.shape)}")
        saved = []  # (param, block, frozen?, saved param part, {state key: saved part} or None if no state yet)
        adam = isinstance(self.optimizer, (torch.optim.Adam, torch.optim.AdamW))
        for p, blocks in self.blocks.items():
            if p.grad is None:
                continue
            frozen = [b for b in blocks if not bool(active[b.module])]
            if frozen and self._covers_all(p, frozen):
                p.grad = None
                continue
            tr = id(p) in self.transposed
            state = self.optimizer.state.get(p, {})
            prev_steps = int(state["step"]) if adam and "step" in state else 0
            for b in blocks:
                is_frozen = not bool(active[b.module])
                # an active block behind the tensor's step count (it was frozen before) needs its own correction
                if not is_frozen and not (adam and int(self.block_steps[b.module]) != prev_steps):
                    continue
                if is_frozen:
                    _part(p.grad, b, tr).zero_()
                st = {k: _part(state[k], b, tr).clone() for k in _STATE_KEYS
                      if isinstance(state.get(k), torch.Tensor) and state[k].shape == p.shape}
                saved.append((p, b, is_frozen, _part(p, b, tr).clone(), st if state else None))
        self.optimizer.step()
        for p, b, is_frozen, p0, st in saved:
            tr = id(p) in self.transposed
            state = self.optimizer.state.get(p, {})
            if is_frozen:
                _part(p, b, tr).copy_(p0)
                for k in _STATE_KEYS:
                    t = state.get(k)
                    if isinstance(t, torch.Tensor) and t.shape == p.shape:
                        if st is not None and k in st:
                            _part(t, b, tr).copy_(st[k])
                        else:
                            _part(t, b, tr).zero_()  # created by this step: as if never touched
            elif isinstance(self.optimizer, (torch.optim.Adam, torch.optim.AdamW)):
                self._adam_block_fix(p, b, tr, p0)
        self.block_steps += active.long()
        self.steps_taken += 1
        return loss

    def _adam_block_fix(self, p: torch.Tensor, b: Block, tr: bool, p0: torch.Tensor) -> None:
        """Redo this step's Adam update of block ``b`` with the block's own step count if it differs."""
        state = self.optimizer.state[p]
        t_tensor = int(state["step"])
        t_block = int(self.block_steps[b.module]) + 1
        if t_block == t_tensor:
            return
        g = self._group[p]
        lr, (beta1, beta2), eps, wd = float(g["lr"]), g["betas"], g["eps"], g["weight_decay"]
        m = _part(state["exp_avg"], b, tr)
        v = _part(state["max_exp_avg_sq"] if g.get("amsgrad") else state["exp_avg_sq"], b, tr)
        bc1, bc2 = 1 - beta1 ** t_block, 1 - beta2 ** t_block
        new = p0.clone()
        if isinstance(self.optimizer, torch.optim.AdamW):
            new.mul_(1 - lr * wd)
        denom = (v.sqrt() / math.sqrt(bc2)).add_(eps)
        new.addcdiv_(m, denom, value=-lr / bc1)
        _part(p, b, tr).copy_(new)

    def refresh_param_groups(self) -> None:
        """Re-read the wrapped optimizer's ``param_groups`` (``load_state_dict`` replaces their dicts, where an LR
        scheduler writes the learning rate); :meth:`step` does it too."""
        self._group = {p: g for g in self.optimizer.param_groups for p in g["params"]}

    # --------------------------------------------------------------------------------------------------------
    @property
    def param_groups(self) -> list[dict]:
        """The wrapped optimizer's ``param_groups`` (``torch.amp.GradScaler.unscale_`` reads the gradients there)."""
        return self.optimizer.param_groups

    @property
    def state(self):
        """The wrapped optimizer's ``state``."""
        return self.optimizer.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "block_steps": self.block_steps.clone()}

    def load_state_dict(self, sd: dict) -> None:
        self.optimizer.load_state_dict(sd["optimizer"])
        self.block_steps = sd["block_steps"].clone()
