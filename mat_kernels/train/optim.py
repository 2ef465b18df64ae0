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

import contextlib
from dataclasses import dataclass
from typing import Sequence, Union

import torch

from mat_kernels import _backend
from mat_kernels.blocks import WeightBlocks

__all__ = ["FrozenSliceOptimizer", "SUPPORTED_OPTIMIZERS", "TRITON_DEVICES"]

# Devices on which a fused Adam/AdamW group updates a weight with strided active segments (column runs of a
# row-major weight) by the masked kernel (mat_kernels/kernels/triton_masked_adam.py: one launch over the whole weight,
# no copies) instead of copying each segment to a dense tensor for torch's fused kernel and back.
TRITON_DEVICES = {"cuda"}

SUPPORTED_OPTIMIZERS = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)
_STATE_KEYS = ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")


@dataclass(frozen=True)
class _Block:
    """Entries ``[start, start + size)`` along ``axis`` (0 rows, 1 columns; ``size = None``: the whole tensor) of a
    parameter's linear view, owned by module ``module``: the optimizer's internal unit, one per range of a
    :class:`mat_kernels.WeightBlocks`."""

    module: int
    axis: int = 0
    start: int = 0
    size: int | None = None


BlocksArg = Union[WeightBlocks, Sequence[WeightBlocks]]


def _parts(p: torch.Tensor, given: BlocksArg, transposed: bool) -> list[_Block]:
    """The internal blocks of parameter ``p`` from its WeightBlocks (checked against its linear view)."""
    items = [given] if isinstance(given, WeightBlocks) else list(given)
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
                out.append(_Block(m))
            out += [_Block(m, wb.dim, start, size) for start, size in ranges]
    return out


def _view(t: torch.Tensor, transposed: bool) -> torch.Tensor:
    """2-D linear-map view ``[d_out, d_in]`` of a parameter-shaped tensor (1-D: ``[d, 1]``)."""
    if t.dim() == 1:
        return t.unsqueeze(1)
    if transposed:
        return t.t()
    return t if t.dim() == 2 else t.view(t.shape[0], -1)


def _mask_key(active, num_modules: int) -> tuple:
    """The activity mask as a tuple of bools, read on the host (``tolist`` dispatches no aten op)."""
    if isinstance(active, torch.Tensor):
        if active.dtype != torch.bool:
            raise TypeError(f"active must be a bool tensor, got {active.dtype}")
        shape, values = tuple(active.shape), active.tolist()
    else:
        values = [bool(a) for a in active]
        shape = (len(values),)
    if shape != (num_modules,):
        raise ValueError(f"active must have shape [{num_modules}], got {list(shape)}")
    return tuple(values)


@dataclass(frozen=True)
class _Runs:
    """A parameter's entries along its blocked axis as consecutive runs ``(size, module)`` (module -1: owned by no
    module, always trained), and how to cut the stored tensor (and its gradient, its state) along that axis."""

    runs: tuple
    dim: int  # dimension of the stored tensor that the blocked axis is
    flat: bool  # >2-D weight (convolution) cut along its flattened columns

    def splitter(self, sizes: list[int]):
        dim, flat = self.dim, self.flat

        def split(t: torch.Tensor):  # one aten op (two for a flattened >2-D weight): views, no copies
            return (t.flatten(1) if flat else t).split_with_sizes(sizes, dim)
        return split


_WHOLE = _Runs(((1, -1),), 0, False)  # a parameter no module owns: one run, always trained


def _owner_runs(p: torch.Tensor, parts: list[_Block], transposed: bool) -> _Runs:
    if any(b.size is None for b in parts):
        if len({b.module for b in parts}) != 1:
            raise ValueError("a parameter owned whole by a module cannot belong to another module too")
        return _Runs(((1, parts[0].module),), 0, False)
    axes = {b.axis for b in parts}
    if len(axes) != 1:
        raise ValueError("blocks of one parameter must all be rows or all be columns of its linear view")
    (axis,) = axes
    owner = [-1] * _view(p, transposed).shape[axis]
    for b in parts:
        for i in range(b.start, b.start + b.size):
            if owner[i] != -1:
                raise ValueError(f"entry {i} of a parameter belongs to two modules' blocks")
            owner[i] = b.module
    runs = []
    for m in owner:
        if runs and runs[-1][1] == m:
            runs[-1][0] += 1
        else:
            runs.append([1, m])
    if p.dim() == 1:
        dim, flat = 0, False
    elif transposed:
        dim, flat = 1 - axis, False
    else:
        dim, flat = axis, p.dim() > 2 and axis == 1
    return _Runs(tuple((n, m) for n, m in runs), dim, flat)


def _merge(runs: _Runs, keys: list) -> tuple[list[int], list]:
    """Sizes and keys of the segments: a key is a run's step count (active) or None (frozen); neighbouring runs with
    equal keys merge (an all-active tensor whose blocks took equal steps is one segment)."""
    sizes, out = [], []
    for (n, _), k in zip(runs.runs, keys):
        if out and out[-1] == k:
            sizes[-1] += n
        else:
            sizes.append(n)
            out.append(k)
    return sizes, out


def _full(t, p) -> bool:
    return isinstance(t, torch.Tensor) and t.shape == p.shape


def _steps_in_state(opt: torch.optim.Optimizer, p: torch.Tensor) -> int:
    """Steps torch's state says ``p`` took (read once, when a state is adopted; never per step)."""
    st = opt.state.get(p, {})
    if "step" in st:
        return int(st["step"])
    return 1 if st.get("momentum_buffer") is not None else 0


def _init_state(opt: torch.optim.Optimizer, group: dict, p: torch.Tensor) -> dict:
    """``opt.state[p]``, created as torch's first step would (zeros; SGD's momentum buffer as zeros, filled by
    each segment's first step)."""
    state = opt.state[p]
    if isinstance(opt, torch.optim.SGD):
        if group["momentum"] != 0 and state.get("momentum_buffer") is None:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state.setdefault("momentum_buffer", None)
        return state
    if len(state) == 0:
        from torch.optim.optimizer import _get_scalar_dtype

        fused = bool(group.get("fused"))
        state["step"] = (torch.zeros((), dtype=_get_scalar_dtype(is_fused=fused), device=p.device)
                         if fused or group.get("capturable") else torch.tensor(0.0, dtype=_get_scalar_dtype()))
        for k in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group.get("amsgrad") else ()):
            state[k] = torch.zeros_like(p, memory_format=torch.preserve_format)
    elif group.get("amsgrad") and "max_exp_avg_sq" not in state:
        state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return state


# ------------------------------------------------------------------------------------------------------------
# the updates: torch's multi-tensor formulas (torch/optim/sgd.py, adam.py) over segment views, step counts on the
# host; fused groups call torch's fused kernels (on contiguous copies of segments that are not contiguous)
# ------------------------------------------------------------------------------------------------------------
def _sgd(group: dict, segs: list[_Seg], grads: list[torch.Tensor]) -> None:
    lr, momentum, dampening = group["lr"], group["momentum"], group["dampening"]
    wd, nesterov, maximize = group["weight_decay"], group["nesterov"], group["maximize"]
    params = [s.param for s in segs]
    if group.get("fused"):
        first = [i for i, s in enumerate(segs) if s.count == 0]
        rest = [i for i, s in enumerate(segs) if s.count != 0]
        for idx, is_first in ((first, True), (rest, False)):
            if not idx:
                continue
            bufs = [] if momentum == 0 else [segs[i].state["momentum_buffer"] for i in idx]
            with _contiguous([params[i] for i in idx], bufs) as (ps, bs):
                torch._fused_sgd_(ps, [grads[i].contiguous() for i in idx], bs, weight_decay=wd,
                                  momentum=momentum, lr=lr, dampening=dampening, nesterov=nesterov,
                                  maximize=maximize, is_first_step=is_first and momentum != 0)
        return
    lr = float(lr)
    if maximize:
        grads = torch._foreach_neg(grads)
    if wd != 0:
        grads = torch._foreach_add(grads, params, alpha=wd)
    if momentum != 0:
        bufs = [s.state["momentum_buffer"] for s in segs]
        first = [i for i, s in enumerate(segs) if s.count == 0]
        rest = [i for i, s in enumerate(segs) if s.count != 0]
        if rest:
            br = [bufs[i] for i in rest]
            torch._foreach_mul_(br, momentum)
            torch._foreach_add_(br, [grads[i] for i in rest], alpha=1 - dampening)
        if first:  # torch's first step: the buffer is a copy of the gradient
            torch._foreach_copy_([bufs[i] for i in first], [grads[i] for i in first])
        grads = torch._foreach_add(grads, bufs, alpha=momentum) if nesterov else bufs
    torch._foreach_add_(params, grads, alpha=-lr)


def _adam(group: dict, segs: list[_Seg], grads: list[torch.Tensor], decoupled: bool, step_ts) -> None:
    beta1, beta2 = group["betas"]
    lr, eps, wd, amsgrad, maximize = group["lr"], group["eps"], group["weight_decay"], group["amsgrad"], \
        group["maximize"]
    params = [s.param for s in segs]
    m = [s.state["exp_avg"] for s in segs]
    v = [s.state["exp_avg_sq"] for s in segs]
    vmax = [s.state["max_exp_avg_sq"] for s in segs] if amsgrad else []
    if step_ts is not None:  # fused: the step tensors were advanced (FrozenSliceOptimizer.step), the kernel reads them
        fn = torch._fused_adamw_ if decoupled else torch._fused_adam_
        with _contiguous(params, m, v, vmax) as (ps, ms, vs, vms):
            fn(ps, [g.contiguous() for g in grads], ms, vs, vms, step_ts, amsgrad=amsgrad, lr=lr, beta1=beta1,
               beta2=beta2, weight_decay=wd, eps=eps, maximize=maximize)
        return
    lr, beta1, beta2 = float(lr), float(beta1), float(beta2)
    if maximize:
        grads = torch._foreach_neg(grads)
    if wd != 0:
        if decoupled:
            torch._foreach_mul_(params, 1 - lr * wd)
        else:
            grads = torch._foreach_add(grads, params, alpha=wd)
    torch._foreach_lerp_(m, grads, 1 - beta1)
    torch._foreach_mul_(v, beta2)
    torch._foreach_addcmul_(v, grads, grads, 1 - beta2)
    steps = [float(s.count + 1) for s in segs]
    step_size = [(lr / (1 - beta1 ** t)) * -1 for t in steps]
    bc2_sqrt = [(1 - beta2 ** t) ** 0.5 for t in steps]
    if amsgrad:
        torch._foreach_maximum_(vmax, v)
        denom = torch._foreach_sqrt(vmax)
    else:
        denom = torch._foreach_sqrt(v)
    torch._foreach_div_(denom, bc2_sqrt)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, m, denom, step_size)


def _masked_adam(opt, group: dict, pp, companion) -> None:
    """The masked kernel's launch for ``pp`` (and ``companion``, a whole contiguous tensor of the group)."""
    from mat_kernels.kernels.triton_masked_adam import masked_adam_step

    mk, view = pp.masked, pp.masked.view
    st = opt.state[pp.p]
    amsgrad = group["amsgrad"]
    comp = None
    if companion is not None:
        cs = companion.segs[0]
        comp = (companion.p, companion.p.grad, cs.state["exp_avg"], cs.state["exp_avg_sq"],
                cs.state.get("max_exp_avg_sq"), cs.step_t)
    masked_adam_step(view(pp.p), view(pp.p.grad), (view(st["exp_avg"]), view(st["exp_avg_sq"]),
                     view(st["max_exp_avg_sq"]) if amsgrad else None), mk.run, mk.act, mk.steps, axis=mk.axis,
                     lr=group["lr"], betas=group["betas"], eps=group["eps"], weight_decay=group["weight_decay"],
                     amsgrad=amsgrad, maximize=group["maximize"], companion=comp,
                     adamw=isinstance(opt, torch.optim.AdamW) or bool(group.get("decoupled_weight_decay")))


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


@contextlib.contextmanager
def _contiguous(*lists):
    """Contiguous stand-ins for tensors of ``lists`` that are not (torch's fused kernels assume dense storage),
    copied back afterwards; contiguous ones are used as they are."""
    out = [[t if t.is_contiguous() else t.contiguous() for t in ts] for ts in lists]
    yield out
    back = [(t, c) for ts, cs in zip(lists, out) for t, c in zip(ts, cs) if c is not t]
    if back:
        torch._foreach_copy_([t for t, _ in back], [c for _, c in back])


@dataclass
class _Seg:
    """A run of entries of one parameter updated together: its views of the parameter and the optimizer state,
    the steps it has taken (host int), and in fused groups its own step tensor."""

    index: int | None  # position in the parameter's split (None: the whole tensor)
    count: int
    param: torch.Tensor
    state: dict
    step_t: torch.Tensor | None = None


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
    state_obj: object  # the optimizer's state dict it was built on (load_state_dict replaces it)
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
        self.blocks = {p: _parts(p, b, id(p) in self.transposed) for p, b in blocks.items()}
        self.num_modules = num_modules
        for p, parts in self.blocks.items():
            if any(not 0 <= b.module < num_modules for b in parts):
                raise ValueError(f"a block's module index is outside [0, {num_modules}) (num_modules)")
        self._runs = {p: _owner_runs(p, self.blocks[p], id(p) in self.transposed) if p in self.blocks else _WHOLE
                      for p in known}
        self._steps = [0] * num_modules  # steps each module took (block_steps; host ints: no device reads)
        for p, runs in self._runs.items():
            for _, m in runs.runs:
                if m >= 0:
                    self._steps[m] = max(self._steps[m], _steps_in_state(optimizer, p))
        self._run_steps: dict = {}
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
        self._run_steps = {p: [self._steps[m] if m >= 0 else _steps_in_state(self.optimizer, p)
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
        key = _mask_key(active, self.num_modules)
        plan = self._plan
        if plan is not None and plan.state_obj is not self.optimizer.state:  # the optimizer's state was loaded
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
            _masked_adam(self.optimizer, group, pp, c)
            for s in pp.segs + (c.segs if c is not None else []):
                s.count += 1
        for group, segs, grads in work:
            if isinstance(self.optimizer, torch.optim.SGD):
                _sgd(group, segs, grads)
            else:
                decoupled = isinstance(self.optimizer, torch.optim.AdamW) or bool(group.get("decoupled_weight_decay"))
                _adam(group, segs, grads, decoupled, [s.step_t for s in segs] if group.get("fused") else None)
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
                sizes, seg_keys = _merge(runs, keys)
                state = _init_state(opt, group, p)
                tensors = {k: t for k, t in state.items() if k in _STATE_KEYS and _full(t, p)}
                if len(sizes) == 1:
                    split, segs = None, [_Seg(None, seg_keys[0], p, tensors)]
                else:
                    split = runs.splitter(sizes)
                    pviews, views = split(p), {k: split(t) for k, t in tensors.items()}
                    segs = [_Seg(i, k, pviews[i], {n: v[i] for n, v in views.items()})
                            for i, k in enumerate(seg_keys) if k is not None]
                masked = self._masked_plan(group, p, runs, keys, counts, segs, tensors) if split else None
                if group.get("fused") and "step" in state and masked is None:  # fused Adam reads each segment's count
                    for s in segs:
                        s.step_t = torch.full_like(state["step"], s.count)
                planned.append(_Planned(p, split, segs, active_runs, masked=masked))
            _pair_companions(planned)
            groups.append((gi, planned))
        return _Plan(key, opt.state, groups, frozen)

    def _masked_plan(self, group: dict, p, runs: _Runs, keys: list, counts: list, segs: list, tensors: dict):
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
        return {"optimizer": self.optimizer.state_dict(), "block_steps": self.block_steps.clone()}

    def load_state_dict(self, sd: dict) -> None:
        self.optimizer.load_state_dict(sd["optimizer"])
        self.block_steps = sd["block_steps"].clone()  # (and adopts the loaded state)
