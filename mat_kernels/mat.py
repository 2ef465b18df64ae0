"""The MAT controller: measure each module's λmax on a schedule, keep only modules above a dynamic threshold
trainable, and make sure frozen modules are truly frozen.

::

    mat = mat_kernels.MAT(model, optimizer, interval=50, probe=lambda step: probe_batch(step))
    for x, y in loader:
        loss = criterion(model(x), y)
        mat.backward(loss)          # loss.backward()
        mat.step()                  # frozen-safe optimizer step; measure if due; threshold; masks
        mat.zero_grad()

    # or, measuring from the training backward itself (probe=None; NTK output = per-sample loss):
        with mat.measure_step(loss_scale=1 / n):   # loss = mean over the n samples
            mat.backward(criterion(model(x), y))
        mat.step()

What it does (defaults and their provenance in PAPER.md):

* **Modules**: :func:`mat_kernels.discover_modules` (or ``specs=``). Parameters no module owns are trained at every
  step; ``always_trained`` declares them: ``"rest"`` (default: all of them, listed in :attr:`MAT.always_trained`)
  or regular expressions that must cover every one of them (an uncovered parameter is an error).
* **Frozen modules skip their weight-gradient GEMMs**: every ``nn.Linear`` that holds module slices is swapped for
  a :class:`mat_kernels.SparseUpdateLinear` sharing its parameters (so the optimizer stays valid) whose mask the
  controller sets. Weights that are not plain linears (Hugging Face ``Conv1D``, ``nn.Conv2d``, the projections of
  ``nn.MultiheadAttention``) still compute their weight gradient; its frozen part is discarded. :meth:`report`
  says which is which, and a warning says so once.
* **Truly frozen**: :class:`mat_kernels.optim.FrozenSliceOptimizer`: no update, no moment update, no weight decay
  for frozen slices; per-block Adam step counts.
* **Schedule**: measure at step ``warmup_steps`` and every ``interval`` steps after; no gating before two
  measurements (all modules train). ``probe``: None measures from the training backward of that step (NTK output =
  per-sample training loss; forward and backward inside :meth:`measure_step`), else a ``(batch, labels)`` pair or a callable
  ``probe(step) -> (batch, labels)`` measured with :func:`mat_kernels.model_lambda_max` in eval mode (``output``:
  ``"logprob"`` by default).
* **Decisions**: ``active = threshold(λ) & ~converged`` (:mod:`mat_kernels.policy`); ``stop_when_converged``
  sets :attr:`should_stop` once every module has converged.
* **Distributed**: under ``torch.distributed``, λ is averaged over ranks (``all_reduce``) before any decision, so
  every rank applies the same masks.
* :meth:`state_dict` / :meth:`load_state_dict`: a resumed run makes the same decisions. :attr:`log` holds one entry
  per measurement (step, λ per module, threshold, active set) for plotting.
"""
from __future__ import annotations

import contextlib
import re
import warnings
from typing import Callable

import torch
import torch.nn as nn

from .capture import capture_lambda_max
from .model import _check_samples_independent, model_lambda_max
from .modules import ModuleSpec, _is_conv1d, discover_modules, validate_specs
from .optim import Block, FrozenSliceOptimizer
from .policy import TemporalRule, threshold_mask

__all__ = ["MAT"]


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


class MAT:
    """Modular Adaptive Training controller. See the module docstring.

    Args:
        model: the model (a ``DistributedDataParallel`` wrapper is unwrapped for discovery and probes).
        optimizer: ``torch.optim.SGD``, ``Adam`` or ``AdamW`` over the model's parameters.
        specs: modules (default: discovery with ``out_proj``).
        always_trained: ``"rest"`` or a list of regular expressions covering every parameter in no module.
        warmup_steps, interval: measurement schedule (steps are counted by :meth:`step`).
        probe: None (training backward), ``(batch, labels)`` or ``probe(step) -> (batch, labels)``.
        output: NTK output of probe measurements (``"logprob"``, ``"loss"``, ``"projection"``).
        policy, alpha, q, top_k: threshold (:func:`mat_kernels.policy.threshold_mask`).
        group_by: ``"kind"`` (default): threshold each kind of module (heads, output heads, FFN blocks, convs,
            experts) against its own kind; ``"all"``: one threshold over all modules. Raw λmax grows with a module's
            size (an FFN block has ~8× a head's parameters and, measured, a λ an order of magnitude larger), so one
            global α·mean would freeze every head for good [D].
        beta, temporal_rule: the temporal convergence rule (off with ``temporal_rule=False``).
        stop_when_converged: set :attr:`should_stop` when every module has converged.
        sparse_backward: swap ``nn.Linear`` layers for ``SparseUpdateLinear`` (needs the C++ extension).
        lambda_kwargs: passed to :func:`mat_kernels.model_lambda_max` / ``layer_grams`` (``method``, ``backend``...).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, specs: list[ModuleSpec] | None = None,
                 out_proj: str = "separate", always_trained="rest", warmup_steps: int = 0, interval: int = 100,
                 probe=None, output: str = "logprob", policy: str = "mean", alpha: float = 1.0, q: float = 0.5,
                 top_k: int | None = None, group_by: str = "kind", beta: float = 1e-3, temporal_rule: bool = True,
                 stop_when_converged: bool = False, sparse_backward: bool = True, lambda_kwargs: dict | None = None):
        if not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be a non-negative int, got {warmup_steps!r}")
        if not isinstance(interval, int) or interval < 1:
            raise ValueError(f"interval must be a positive int, got {interval!r}")
        if probe is not None and not callable(probe) and not (isinstance(probe, (tuple, list)) and len(probe) == 2):
            raise TypeError("probe must be None, a (batch, labels) pair or a callable probe(step) -> (batch, labels)")
        threshold_mask(torch.ones(max(top_k or 1, 1)), policy, alpha=alpha, q=q, k=top_k)  # validates the policy
        if group_by not in ("kind", "all"):
            raise ValueError(f"group_by must be 'kind' or 'all', got {group_by!r}")
        self.model = model
        self.module = _unwrap(model)
        disc = discover_modules(self.module, out_proj=out_proj) if specs is None else None
        self.specs = list(specs if specs is not None else disc.specs)
        validate_specs(self.module, self.specs)
        self.names = [s.name for s in self.specs]
        kinds = [s.kind for s in self.specs] if group_by == "kind" else ["all"] * len(self.specs)
        self.groups = {k: torch.tensor([i for i, x in enumerate(kinds) if x == k]) for k in dict.fromkeys(kinds)}
        self.always_trained = self._always_trained(always_trained)
        self.warmup_steps, self.interval, self.probe, self.output = warmup_steps, interval, probe, output
        self.policy = dict(policy=policy, alpha=alpha, q=q, k=top_k)
        self.rule = TemporalRule(beta) if temporal_rule else None
        self.stop_when_converged = stop_when_converged
        self.lambda_kwargs = dict(lambda_kwargs or {})
        M = len(self.specs)
        self.active = torch.ones(M, dtype=torch.bool)
        self.converged = torch.zeros(M, dtype=torch.bool)
        self.step_count = 0
        self.measurements = 0
        self.should_stop = False
        self.log: list[dict] = []
        self._pending: torch.Tensor | None = None
        self._in_measure = False
        self.last_measure_extra_flops = 0  # FLOPs of the last probe measurement that FlopCounterMode cannot see
        self.optimizer = self._frozen_optimizer(optimizer)  # validates before any layer is swapped
        self.sparse_layers, self.masked_weights = self._install_sparse(sparse_backward)

    # ------------------------------------------------------------------------------------------------ setup
    def _always_trained(self, spec) -> list[str]:
        in_modules = {p for s in self.specs for p in s.param_names()}
        rest = [n for n, p in self.module.named_parameters() if n not in in_modules and p.requires_grad]
        if spec == "rest":
            return rest
        if not isinstance(spec, (list, tuple)) or not all(isinstance(x, str) for x in spec):
            raise TypeError("always_trained must be 'rest' or a list of regular expressions")
        uncovered = [n for n in rest if not any(re.search(pat, n) for pat in spec)]
        if uncovered:
            raise ValueError(f"parameters in no module and not declared always trained: {uncovered[:8]}"
                             f"{' ...' if len(uncovered) > 8 else ''}; add patterns to always_trained or modules")
        return rest

    def _owner(self, pname: str):
        owner_name, attr = pname.rsplit(".", 1) if "." in pname else ("", pname)
        return owner_name, self.module.get_submodule(owner_name) if owner_name else self.module, attr

    def _install_sparse(self, wanted: bool):
        """Swap plain nn.Linear layers holding module slices for SparseUpdateLinear; return (layers, others)."""
        from .ops import sparse_update as ops

        by_weight: dict[str, list[tuple[int, object]]] = {}
        for m, spec in enumerate(self.specs):
            for sl in spec.slices:
                by_weight.setdefault(sl.weight, []).append((m, sl))
        layers, masked = [], []
        reason = None
        if wanted and not ops.extension_available():
            reason = f"the C++ extension is not built ({ops.extension_error()})"
        mha_children = {id(mod.out_proj) for mod in self.module.modules() if isinstance(mod, nn.MultiheadAttention)}
        for wname, items in by_weight.items():
            owner_name, owner, attr = self._owner(wname)
            axes = {sl.axis for _, sl in items}
            plain = type(owner) is nn.Linear and attr == "weight" and id(owner) not in mha_children
            if not wanted or reason is not None or not plain or len(axes) != 1:
                masked.append(wname)
                continue
            from .sparse_linear import SparseUpdateLinear

            axis = axes.pop()
            per_module: dict[int, list] = {}  # a head's Q, K and V ranges are one module of the layer
            for m, sl in items:
                per_module.setdefault(m, []).extend(sl.ranges)
            order = list(per_module)
            if axis == "all":
                layer = SparseUpdateLinear.from_linear(owner)
            else:
                blocks = list(per_module.values())
                layer = SparseUpdateLinear.from_linear(owner, **({"row_blocks": blocks} if axis == "rows"
                                                                 else {"col_blocks": blocks}))
            parent_name, child = owner_name.rsplit(".", 1) if "." in owner_name else ("", owner_name)
            parent = self.module.get_submodule(parent_name) if parent_name else self.module
            setattr(parent, child, layer)
            layers.append((layer, order))
        if masked and wanted:
            why = reason or "they are not plain nn.Linear layers with one block axis"
            warnings.warn(
                f"mat_kernels.MAT: {len(masked)} weight(s) compute their full weight gradient, of which the frozen "
                f"part is discarded ({why}): {masked[:4]}{' ...' if len(masked) > 4 else ''}. MAT.report() lists them.",
                UserWarning, stacklevel=3,
            )
        return layers, masked

    def _frozen_optimizer(self, optimizer) -> FrozenSliceOptimizer:
        params = dict(self.module.named_parameters())
        blocks: dict[torch.Tensor, list[Block]] = {}
        transposed = set()
        for m, spec in enumerate(self.specs):
            for sl in spec.slices:
                _, owner, attr = self._owner(sl.weight)
                w = params[sl.weight]
                if _is_conv1d(owner):
                    transposed.add(w)
                if sl.axis == "all":
                    blocks.setdefault(w, []).append(Block(m))
                    if sl.bias is not None:
                        blocks.setdefault(params[sl.bias], []).append(Block(m))
                    continue
                axis = 0 if sl.axis == "rows" else 1
                for start, size in sl.ranges:
                    blocks.setdefault(w, []).append(Block(m, axis, start, size))
                    if sl.bias is not None:
                        blocks.setdefault(params[sl.bias], []).append(Block(m, 0, start, size))
        return FrozenSliceOptimizer(optimizer, blocks, transposed=transposed, num_modules=len(self.specs))

    # ------------------------------------------------------------------------------------------------ loop
    def measuring_now(self) -> bool:
        """Whether the step about to run measures λ (counted by :meth:`step`)."""
        s = self.step_count - self.warmup_steps
        return s >= 0 and s % self.interval == 0 and not self.should_stop

    @contextlib.contextmanager
    def measure_step(self, *, loss_scale: float):
        """Context for one training step's forward and backward. When this step measures λ from the training
        backward (``probe=None``), the module Grams are captured from it; otherwise it does nothing.
        ``loss = loss_scale · Σ_i s_i`` (``1/n`` for a mean over the n samples of the batch)::

            with mat.measure_step(loss_scale=1 / n):
                loss = criterion(model(x), y)
                mat.backward(loss)
            mat.step()
        """
        if self.probe is not None or not self.measuring_now():
            yield
            return
        kw = {k: v for k, v in self.lambda_kwargs.items() if k not in ("output", "causal")}
        self._in_measure = True
        try:
            with capture_lambda_max(self.module, self.specs, loss_scale=loss_scale, **kw) as cap:
                yield
            lam = cap.lambda_max()
        finally:
            self._in_measure = False
        self._pending = torch.tensor([lam[n] for n in self.names], dtype=torch.float64)

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``. When this step measures from the training backward (``probe=None``), it must run
        inside :meth:`measure_step`, which also saw the forward."""
        if self.probe is None and self.measuring_now() and not self._in_measure:
            raise ValueError("this step measures λ from the training backward (probe=None): run the forward and "
                             "backward inside `with mat.measure_step(loss_scale=...)`")
        loss.backward()

    def step(self, closure=None):
        """Optimizer step keeping frozen slices frozen, then (if due) measurement and new masks."""
        loss = self.optimizer.step(self.active, closure)
        if self.probe is not None and self.measuring_now():
            self._pending = self.measure()
        self.step_count += 1
        if self._pending is not None:
            self._decide(self._pending)
            self._pending = None
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def _set_masks(self) -> None:
        for layer, order in self.sparse_layers:
            layer.set_active(self.active[order])

    def measure(self) -> torch.Tensor:
        """λmax of every module on the probe batch (eval mode, restored after): float64 ``[M]``."""
        batch, labels = self.probe(self.step_count) if callable(self.probe) else self.probe
        was = [(m, m.training) for m in self.module.modules()]
        self.module.eval()
        try:
            res = model_lambda_max(self.module, batch, labels=labels, specs=self.specs,
                                   **{"output": self.output, **self.lambda_kwargs})
        finally:
            for m, t in was:
                m.train(t)
        # Grams (Triton or behind a custom op) are invisible to FlopCounterMode; eigvalsh ~ (4/3)·n³ per module
        self.last_measure_extra_flops = res.gram_flops + len(self.specs) * (4 * res.n ** 3) // 3
        return torch.tensor([res.lambda_max[n] for n in self.names], dtype=torch.float64)

    def _decide(self, lam: torch.Tensor) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            dev = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
            t = lam.to(dev)
            torch.distributed.all_reduce(t)
            lam = t.cpu() / torch.distributed.get_world_size()
        self.measurements += 1
        if self.rule is not None:
            self.converged = self.rule.update(lam)
        thr, tau = torch.ones_like(self.active), {}
        if self.measurements >= 2:
            for kind, idx in self.groups.items():
                k = self.policy["k"]
                if k is not None:  # top-k per group: the same share of each group
                    k = max(1, round(k * len(idx) / len(self.specs)))
                thr[idx], tau[kind] = threshold_mask(lam[idx], self.policy["policy"], alpha=self.policy["alpha"],
                                                     q=self.policy["q"], k=k)
        self.active = thr & ~self.converged
        self._set_masks()
        self.log.append({"step": self.step_count, "lambda": lam.tolist(), "threshold": tau,
                         "active": self.active.tolist(), "converged": self.converged.tolist()})
        if self.stop_when_converged and bool(self.converged.all()):
            self.should_stop = True

    # ------------------------------------------------------------------------------------------------ info
    def active_fraction(self) -> float:
        return float(self.active.float().mean())

    def report(self) -> dict:
        """Which modules skip their weight-gradient GEMMs, which weights only discard frozen gradients, and which
        parameters are always trained."""
        return {
            "modules": len(self.specs),
            "active": int(self.active.sum()),
            "converged": int(self.converged.sum()),
            "sparse_backward_layers": len(self.sparse_layers),
            "masked_weights": list(self.masked_weights),
            "always_trained": list(self.always_trained),
        }

    def state_dict(self) -> dict:
        return {
            "step_count": self.step_count, "measurements": self.measurements, "active": self.active.clone(),
            "converged": self.converged.clone(), "should_stop": self.should_stop, "log": list(self.log),
            "rule": self.rule.state_dict() if self.rule is not None else None, "names": list(self.names),
            "block_steps": self.optimizer.block_steps.clone(),
        }

    def load_state_dict(self, sd: dict) -> None:
        if sd["names"] != self.names:
            raise ValueError("the saved MAT state was made for other modules")
        self.step_count, self.measurements = sd["step_count"], sd["measurements"]
        self.active, self.converged = sd["active"].clone(), sd["converged"].clone()
        self.should_stop, self.log = sd["should_stop"], list(sd["log"])
        if self.rule is not None and sd["rule"] is not None:
            self.rule.load_state_dict(sd["rule"])
        self.optimizer.block_steps = sd["block_steps"].clone()
        self._set_masks()

    def check_probe_model(self) -> None:
        """Raise if samples interact in the model (train-mode BatchNorm) when measuring from the training backward."""
        _check_samples_independent(self.module)
