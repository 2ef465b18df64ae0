"""The optimizer updates :class:`mat_kernels.train.optim.FrozenSliceOptimizer` takes over segments of parameters:
torch's multi-tensor formulas (``torch/optim/sgd.py``, ``adam.py``: ``_foreach_*`` ops over the segments' views,
bias corrections as host scalars, every segment with its own step count) and, for fused groups, torch's fused kernels
or the masked Adam kernel; plus the optimizer state created as torch's first step creates it."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

__all__ = ["Seg", "sgd_update", "adam_update", "masked_adam_update", "contiguous", "init_state", "steps_in_state"]


def steps_in_state(opt: torch.optim.Optimizer, p: torch.Tensor) -> int:
    """Steps torch's state says ``p`` took (read once, when a state is adopted; never per step)."""
    st = opt.state.get(p, {})
    if "step" in st:
        return int(st["step"])
    return 1 if st.get("momentum_buffer") is not None else 0


def init_state(opt: torch.optim.Optimizer, group: dict, p: torch.Tensor) -> dict:
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
def sgd_update(group: dict, segs: list[Seg], grads: list[torch.Tensor]) -> None:
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
            with contiguous([params[i] for i in idx], bufs) as (ps, bs):
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


def adam_update(group: dict, segs: list[Seg], grads: list[torch.Tensor], decoupled: bool, step_ts) -> None:
    beta1, beta2 = group["betas"]
    lr, eps, wd, amsgrad, maximize = group["lr"], group["eps"], group["weight_decay"], group["amsgrad"], \
        group["maximize"]
    params = [s.param for s in segs]
    m = [s.state["exp_avg"] for s in segs]
    v = [s.state["exp_avg_sq"] for s in segs]
    vmax = [s.state["max_exp_avg_sq"] for s in segs] if amsgrad else []
    if step_ts is not None:  # fused: the step tensors were advanced (FrozenSliceOptimizer.step), the kernel reads them
        fn = torch._fused_adamw_ if decoupled else torch._fused_adam_
        with contiguous(params, m, v, vmax) as (ps, ms, vs, vms):
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


def masked_adam_update(opt, group: dict, pp, companion) -> None:
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


@contextlib.contextmanager
def contiguous(*lists):
    """Contiguous stand-ins for tensors of ``lists`` that are not (torch's fused kernels assume dense storage),
    copied back afterwards; contiguous ones are used as they are."""
    out = [[t if t.is_contiguous() else t.contiguous() for t in ts] for ts in lists]
    yield out
    back = [(t, c) for ts, cs in zip(lists, out) for t, c in zip(ts, cs) if c is not t]
    if back:
        torch._foreach_copy_([t for t, _ in back], [c for _, c in back])


@dataclass
class Seg:
    """A run of entries of one parameter updated together: its views of the parameter and the optimizer state,
    the steps it has taken (host int), and in fused groups its own step tensor."""

    index: int | None  # position in the parameter's split (None: the whole tensor)
    count: int
    param: torch.Tensor
    state: dict
    step_t: torch.Tensor | None = None
