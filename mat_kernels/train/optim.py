"""An optimizer step that updates exactly the active entries and leaves frozen module slices bit-for-bit unchanged.

MAT freezes *slices* of tensors (one head's rows of a fused QKV weight, its columns of an output projection).
PyTorch optimizers update whole tensors: a zero gradient still moves a frozen entry through momentum and weight
decay. :class:`FrozenSliceOptimizer` wraps torch's SGD, Adam or AdamW and takes their step itself, with their
formulas, over *segments*: per parameter, the runs of active entries that have taken equal numbers of steps
(neighbouring runs merge, so an all-active tensor is one segment, as torch takes it):

* frozen entries are neither read nor written, in the parameter or in any state tensor (``momentum_buffer``,
  ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``); a tensor whose entries are all frozen gets ``grad = None``.
  State is created as torch's first step creates it (zeros), so a slice frozen from the start reads as never
  touched; stale moments are kept while a slice is frozen and used again when it re-enters (docs/paper.md [D]);
* every segment keeps its own step count (Adam/AdamW bias correction; SGD's first momentum step), on the host;
* the updates are torch's multi-tensor formulas (``torch/optim/sgd.py``, ``adam.py``: ``_foreach_*`` ops over
  the segments' views, bias corrections as host scalars) for loop and foreach groups, and torch's fused kernels
  (``torch._fused_adam_``, ``_fused_adamw_``, ``_fused_sgd_``, each segment with its own step tensor) for fused
  groups. An active block gets what torch's optimizer gives that block alone with the block's step count: bit for
  bit for loop and foreach, to fp32 rounding for fused (``mat_kernels.testing.tolerances.FUSED_RTOL``);
* the plan (segments, their views of the parameters and state) is built when the mask changes and reused: a step
  with the previous mask does no planning and reads no tensor on the host; per step it dispatches one
  ``split_with_sizes`` per partly frozen gradient and one set of multi-tensor kernels per param group.

Refused: optimizers other than SGD, Adam and AdamW, ``differentiable=True``, ``capturable=True`` without
``fused=True``, complex parameters.

Which entries belong to which module is given per parameter as :class:`mat_kernels.WeightBlocks` (the one
representation, :func:`mat_kernels.group_by_weight` builds them; a bias vector is seen as ``[d_out, 1]``,
:meth:`~mat_kernels.WeightBlocks.for_bias`), in the linear-map orientation of each weight; Hugging Face ``Conv1D``
weights (stored transposed) and convolution weights (``[O, C, kh, kw]`` = ``[O, C·kh·kw]``) are viewed
accordingly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mat_kernels import backend as _backend
from mat_kernels.train.optim_blocks import (
    WHOLE,
    BlocksArg,
    Runs,
    blocks_of,
    is_full,
    mask_key,
    merge_runs,
    owner_runs,
)
from mat_kernels.train.optim_updates import (
    Seg,
    adam_update,
    init_state,
    masked_adam_update,
    sgd_update,
    steps_in_state,
)

__all__ = ["FrozenSliceOptimizer", "SUPPORTED_OPTIMIZERS", "TRITON_DEVICES"]

# Devices on which a fused Adam/AdamW group updates a weight with strided active segments (column runs of a
# row-major weight) by the masked kernel (mat_kernels/kernels/triton_masked_adam.py: one launch over the whole weight,
# no copies) instead of copying each segment to a dense tensor for torch's fused kernel and back.
TRITON_DEVICES = {"cuda"}

SUPPORTED_OPTIMIZERS = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)
_STATE_KEYS = ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def _pair_companions(planned: list) -> None:
    """Give each masked weight of a group one whole, contiguous, always-updated tensor of the same dtype and device
    to update in its launch, the nearest after it in the group's order (a layer's bias follows its weight)."""
    for i, host in enumerate(planned):
        if host.masked is None:
            continue
        for pp in planned[i + 1:] + planned[:i]:
            s = pp.segs[0] if pp.split is None else None
            if (s is not None and pp.masked is None and pp.host is None and s.step_t is not None
                    and pp.p.dtype == host.p.dtype and pp.p.device == host.p.device and pp.p.is_contiguous()
                    and all(t.is_contiguous() for t in s.state.values())):
                pp.host, host.masked.companion = host, pp
                break


@dataclass
class _Planned:
    p: torch.Tensor
    split: object  # None (one segment: the whole tensor) or a function cutting p-shaped tensors into segments
    segs: list
    active_runs: list  # indices of the runs this mask updates
    taken: int = 0  # steps taken under this plan (folded into the runs' counts when the plan is replaced)
    masked: _Masked | None = None  # updated by the masked kernel
    host: _Planned | None = None  # a companion: updated in its host's masked launch when both have gradients


@dataclass
class _Masked:
    """A weight whose step is one launch of the masked Adam kernel: its 2-D view and state views, the run of each
    entry along the blocked axis, each run's activity and step count on the device (the counts advanced by the
    step's multi-tensor add with ``act_f`` as the increment), and the companion updated in the same launch."""

    view: object  # function: a parameter-shaped tensor -> its 2-D view the kernel takes
    axis: int
    run: torch.Tensor
    act: torch.Tensor
    act_f: torch.Tensor
    steps: torch.Tensor
    companion: _Planned | None = None


@dataclass
class _Plan:
    """What one activity mask updates, built when the mask changes and reused by every step with that mask."""

    key: tuple
    groups: list  # [(group index, [_Planned])]
    frozen: list  # parameters with every entry frozen: grad set to None, nothing read or written
    one: torch.Tensor | None = None  # the increment of the scalar step counts when masked counts take tensors


class FrozenSliceOptimizer:
    """Wrap ``optimizer`` so that :meth:`step` updates exactly the active entries. See the module docstring.

    Args:
        optimizer: a ``torch.optim.SGD``, ``Adam`` or ``AdamW`` (others are refused: their state cannot be kept
            frozen without knowing it).
        blocks: ``{parameter: WeightBlocks or [WeightBlocks, ...]}`` for every parameter that holds module entries
            (``index`` of each: the modules' entries of the activity mask); parameters not listed are always
            trained.
        transposed: parameters stored ``[d_in, d_out]`` (Hugging Face ``Conv1D``).
        num_modules: length of the activity masks given to :meth:`step`.

    Attributes:
        module_order: ``None``, or an object with ``to_identity(steps)`` / ``to_slots(steps)`` when modules do not
            sit where their index says (``MAT(permute_heads=True)`` sets its head permuter here):
            :meth:`state_dict` then writes ``block_steps`` in the modules' original order and
            :meth:`load_state_dict` reads that order back, as the wrapped optimizer's state is.
        plans_built: how often a plan was built (once per new mask or loaded state, never per step).
        routes: ``{parameter: (route, reason)}`` for every parameter whose active segments are strided (column runs
            of a row-major weight): ``("masked kernel", None)`` (one launch of
            :mod:`mat_kernels.kernels.triton_masked_adam`), ``("segment copies", why)`` (fused groups without it: each
            segment copied to a dense tensor and back) or ``("views", why)`` (loop / foreach groups). On CUDA a
            warning says once why the masked kernel is not used.
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
            if g.get("capturable") and not g.get("fused"):
                raise ValueError("capturable=True is supported with fused=True only: the foreach update takes its "
                                 "bias corrections as host scalars")
        known = [p for g in optimizer.param_groups for p in g["params"]]
        for p in blocks:
            if not any(p is q for q in known):
                raise ValueError("a module parameter is not in the optimizer's param_groups")
        if any(torch.is_complex(p) for p in known):
            raise TypeError("complex parameters are not supported")
        self.optimizer = optimizer
        self.transposed = {id(p) for p in (transposed or ())}
        self.blocks = {p: blocks_of(p, b, id(p) in self.transposed) for p, b in blocks.items()}
        self.num_modules = num_modules
        for p, parts in self.blocks.items():
            if any(not 0 <= b.module < num_modules for b in parts):
                raise ValueError(f"a block's module index is outside [0, {num_modules}) (num_modules)")
        self._runs = {p: owner_runs(p, self.blocks[p], id(p) in self.transposed) if p in self.blocks else WHOLE
                      for p in known}
        self._steps = [0] * num_modules  # steps each module took (block_steps; host ints: no device reads)
        for p, runs in self._runs.items():
            for _, m in runs.runs:
                if m >= 0:
                    self._steps[m] = max(self._steps[m], steps_in_state(optimizer, p))
        self._run_steps: dict = {}
        self.module_order = None
        self.steps_taken = 0  # steps run (a GradScaler skips the call on inf/NaN gradients)
        self._plan: _Plan | None = None
        self.plans_built = 0
        self.routes: dict = {}
        self.refresh_from_optimizer()

    @property
    def block_steps(self) -> torch.Tensor:
        """``[num_modules]`` int64: the optimizer steps each module's blocks have taken (Adam bias correction)."""
        return torch.tensor(self._steps, dtype=torch.long)

    @block_steps.setter
    def block_steps(self, value) -> None:
        steps = torch.as_tensor(value).tolist()
        if len(steps) != self.num_modules:
            raise ValueError(f"block_steps must have {self.num_modules} entries, got {len(steps)}")
        self._steps = [int(v) for v in steps]
        self.refresh_from_optimizer()

    def refresh_from_optimizer(self) -> None:
        """Adopt the wrapped optimizer's state after its ``load_state_dict`` (new state tensors, new ``param_groups``
        dicts): every run of entries takes its module's step count (``block_steps``; an entry no module owns, the
        tensor's count in torch's state), and the next step builds a new plan. :meth:`step` notices a replaced
        state by itself."""
        self._plan = None
        self._state_seen = self.optimizer.state  # (load_state_dict replaces it: step() then adopts the new one)
        self._run_steps = {p: [self._steps[m] if m >= 0 else steps_in_state(self.optimizer, p)
                               for _, m in runs.runs] for p, runs in self._runs.items()}

    # --------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, active: torch.Tensor, closure=None):
        """One optimizer step with modules ``active`` (bool ``[num_modules]``); inactive modules' blocks are frozen.
        ``closure`` (recomputes the loss and its gradients) runs first. A step with the mask of the previous one
        reuses its plan: no planning, no tensor reads on the host, one ``split_with_sizes`` per partly frozen
        gradient and one set of multi-tensor (or fused) kernels per param group."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        key = mask_key(active, self.num_modules)
        plan = self._plan
        # the optimizer's state was loaded since the last adoption (also when that adoption left no plan yet, e.g. a
        # MAT state loaded before the optimizer's: entries no module owns take their counts from the new state)
        if self._state_seen is not self.optimizer.state:
            self.refresh_from_optimizer()
            plan = None
        if plan is None or plan.key != key:
            self._fold(plan)
            plan = self._plan = self._build_plan(key)
        stepped, work, masked = [], [], []
        for gi, planned in plan.groups:
            group = self.optimizer.param_groups[gi]
            segs, grads, group_stepped = [], [], []
            for pp in planned:
                g = pp.p.grad
                if g is None:  # torch skips a tensor without gradient
                    continue
                if g.is_sparse:
                    raise RuntimeError(f"{type(self.optimizer).__name__} does not support sparse gradients")
                group_stepped.append(pp)
                if pp.masked is not None:
                    c = pp.masked.companion
                    rides = c is not None and c.p.grad is not None and c.p.grad.is_contiguous()
                    masked.append((group, pp, c if rides else None))
                    continue
                if pp.host is not None and pp.host.p.grad is not None and g.is_contiguous():
                    continue  # updated in its host's masked launch
                if pp.split is None:
                    grads.append(g)
                else:
                    parts = pp.split(g)
                    grads += [parts[s.index] for s in pp.segs]
                segs += pp.segs
            stepped += group_stepped
            if segs:
                work.append((group, segs, grads))
        # Step counts, advanced before the updates read them: the fused kernels' per-segment step tensors and
        # torch's per-tensor counts (kept for state_dict(); the updates use the segments' own counts). Those on the
        # parameters' device (fused and capturable groups) take one multi-tensor add for the whole step, the host
        # ones (the others) another, a CPU op.
        steps = [self.optimizer.state[pp.p]["step"] for pp in stepped if "step" in self.optimizer.state[pp.p]]
        step_ts = [s.step_t for _, segs, _ in work for s in segs if s.step_t is not None]
        step_ts += [c.segs[0].step_t for _, _, c in masked if c is not None]
        on_host = [t for t in steps if t.device.type == "cpu"] if step_ts or masked else steps
        on_device = step_ts + ([t for t in steps if t.device.type != "cpu"] if step_ts or masked else [])
        if on_device and on_host and on_device[0].device.type == "cpu":  # a CPU model: one list
            on_device, on_host = on_device + on_host, []
        if masked:  # the masked weights' per-run counts advance by their activity, in the same multi-tensor add
            if plan.one is None:
                plan.one = torch.ones((), device=masked[0][1].p.device)
            incs = [plan.one] * len(on_device) + [pp.masked.act_f for _, pp, _ in masked]
            on_device = on_device + [pp.masked.steps for _, pp, _ in masked]
            torch._foreach_add_(on_device, incs)
            on_device = []
        for ts in (on_device, on_host):
            if ts:
                torch._foreach_add_(ts, 1)
        for group, pp, c in masked:
            masked_adam_update(self.optimizer, group, pp, c)
            for s in pp.segs + (c.segs if c is not None else []):
                s.count += 1
        for group, segs, grads in work:
            if isinstance(self.optimizer, torch.optim.SGD):
                sgd_update(group, segs, grads)
            else:
                decoupled = isinstance(self.optimizer, torch.optim.AdamW) or bool(group.get("decoupled_weight_decay"))
                adam_update(group, segs, grads, decoupled, [s.step_t for s in segs] if group.get("fused") else None)
            for s in segs:
                s.count += 1
        for p in plan.frozen:
            p.grad = None
        for pp in stepped:
            pp.taken += 1
        for m, a in enumerate(key):
            if a:
                self._steps[m] += 1
        self.steps_taken += 1
        return loss

    def _fold(self, plan: _Plan | None) -> None:
        if plan is None:
            return
        for _, planned in plan.groups:
            for pp in planned:
                counts = self._run_steps[pp.p]
                for j in pp.active_runs:
                    counts[j] += pp.taken
                pp.taken = 0

    def _build_plan(self, key: tuple) -> _Plan:
        """Segments of every parameter for mask ``key``: runs of active entries with equal step counts, merged; their
        views of the parameter and of the state (created here as torch would, zeros where frozen)."""
        self.plans_built += 1
        opt = self.optimizer
        groups, frozen = [], []
        for gi, group in enumerate(opt.param_groups):
            planned = []
            for p in group["params"]:
                runs, counts = self._runs[p], self._run_steps[p]
                keys = [c if m < 0 or key[m] else None for (_, m), c in zip(runs.runs, counts)]
                active_runs = [j for j, k in enumerate(keys) if k is not None]
                if not active_runs:
                    frozen.append(p)
                    continue
                sizes, seg_keys = merge_runs(runs, keys)
                state = init_state(opt, group, p)
                tensors = {k: t for k, t in state.items() if k in _STATE_KEYS and is_full(t, p)}
                if len(sizes) == 1:
                    split, segs = None, [Seg(None, seg_keys[0], p, tensors)]
                else:
                    split = runs.splitter(sizes)
                    pviews, views = split(p), {k: split(t) for k, t in tensors.items()}
                    segs = [Seg(i, k, pviews[i], {n: v[i] for n, v in views.items()})
                            for i, k in enumerate(seg_keys) if k is not None]
                masked = self._masked_plan(group, p, runs, keys, counts, segs, tensors) if split else None
                if group.get("fused") and "step" in state and masked is None:  # fused Adam reads each segment's count
                    for s in segs:
                        s.step_t = torch.full_like(state["step"], s.count)
                planned.append(_Planned(p, split, segs, active_runs, masked=masked))
            _pair_companions(planned)
            groups.append((gi, planned))
        return _Plan(key, groups, frozen)

    def _masked_plan(self, group: dict, p, runs: Runs, keys: list, counts: list, segs: list, tensors: dict):
        """The masked-kernel record of ``p`` when its active segments are strided views in a fused Adam/AdamW group
        and the kernel can run here; None otherwise, with the route and its reason in :attr:`routes`."""
        if all(s.param.is_contiguous() for s in segs):
            return None
        reason = None
        if isinstance(self.optimizer, torch.optim.SGD) or not group.get("fused"):
            reason = "the masked kernel takes fused Adam/AdamW groups (fused=True)"
        elif p.device.type not in TRITON_DEVICES:
            reason = f"{p.device.type} tensors (mat_kernels.train.optim.TRITON_DEVICES)"
        elif p.dtype not in (torch.float32, torch.bfloat16, torch.float16) or p.numel() >= 2 ** 31:
            reason = f"{p.dtype} [{p.numel()} entries]: the kernel takes fp32/bf16/fp16 below 2^31 entries"
        elif any(torch.is_tensor(h) for h in (group["lr"], *group["betas"])):
            reason = "a tensor learning rate or betas (read on the host per step)"
        elif any(t.stride() != p.stride() for t in tensors.values()):
            reason = "optimizer state stored with other strides than the parameter"
        else:
            reason = _backend.kernel_unusable(p.device)
        if reason is not None:
            self.routes[p] = ("segment copies" if group.get("fused") else "views", reason)
            if p.device.type == "cuda":
                _backend.warn_once(f"masked-adam:{reason}", "mat_kernels: FrozenSliceOptimizer updates strided "
                                   f"segments without the masked kernel (one copy per segment): {reason}")
            return None
        self.routes[p] = ("masked kernel", None)
        flat = runs.flat or p.dim() > 2
        sizes = torch.tensor([n for n, _ in runs.runs])
        act = [k is not None for k in keys]
        dev = p.device
        return _Masked(view=(lambda t: t.flatten(1)) if flat else (lambda t: t), axis=1 if flat else runs.dim,
                       run=torch.repeat_interleave(torch.arange(len(sizes), dtype=torch.int32), sizes).to(dev),
                       act=torch.tensor(act, dtype=torch.int8).to(dev),
                       act_f=torch.tensor(act, dtype=torch.float32).to(dev),
                       steps=torch.tensor([float(c) for c in counts], dtype=torch.float32).to(dev))

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
        """The wrapped optimizer's ``state_dict`` and ``block_steps``, both in the modules' original order."""
        steps = self.block_steps
        return {"optimizer": self.optimizer.state_dict(),
                "block_steps": steps if self.module_order is None else self.module_order.to_identity(steps)}

    def load_state_dict(self, sd: dict) -> None:
        steps = torch.as_tensor(sd["block_steps"]).clone()
        if steps.shape != (self.num_modules,):  # checked before anything is loaded
            raise ValueError(f"block_steps must have {self.num_modules} entries, got shape {tuple(steps.shape)}")
        self.optimizer.load_state_dict(sd["optimizer"])
        # (the setter adopts the loaded state)
        self.block_steps = steps if self.module_order is None else self.module_order.to_slots(steps)
