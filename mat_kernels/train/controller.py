"""The MAT controller: measure each module's mNTK on a schedule, keep only modules whose score clears a dynamic
threshold trainable, and make sure frozen modules are truly frozen.

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

What it does (modules, frozen-skipping, partial backpropagation, schedule, decisions, distributed, ledger,
state): ``docs/mat_controller.md``; defaults and their provenance: docs/paper.md and python/README.md.
"""
from __future__ import annotations

import re
import warnings
import weakref

import torch
import torch.nn as nn

from mat_kernels.measure.discovery import discover_modules, validate_specs
from mat_kernels.measure.forward import check_samples_independent
from mat_kernels.measure.layer import GramOptions
from mat_kernels.measure.specs import ModuleSpec
from mat_kernels.nn.sparse_function import FROZEN_BACKWARD
from mat_kernels.train.deciding import DecidingMixin, layer_groups
from mat_kernels.train.flops import FlopsLedger
from mat_kernels.train.freezing import frozen_optimizer, install_sparse
from mat_kernels.train.measuring import MeasuringMixin
from mat_kernels.train.models import is_compiled, refuse_open_controller, unwrap_model
from mat_kernels.train.permute import HeadPermuter
from mat_kernels.train.policy import (
    CONTROLS,
    CRITERIA,
    NEEDS_HELDOUT,
    POLICIES,
    TemporalRule,
    check_number,
    layer_of,
    threshold_mask,
)

__all__ = ["MAT", "MAT_POLICIES"]

MAT_POLICIES = POLICIES + CONTROLS


class MAT(MeasuringMixin, DecidingMixin):
    """Modular Adaptive Training controller (module docstring; what it does: docs/mat_controller.md).

    Args:
        model: the model (a ``DistributedDataParallel`` wrapper is unwrapped for discovery and probes).
        optimizer: ``torch.optim.SGD``, ``Adam`` or ``AdamW`` over the model's parameters.
        specs: modules (default: discovery with ``out_proj``).
        always_trained: ``"rest"`` or a list of regular expressions covering every parameter in no module.
        warmup_steps, interval: measurement schedule (steps are counted by :meth:`step`).
        gate_after: number of measurements before the first gating decision (all modules train until then).
        probe: None (training backward), ``(batch, labels)`` or ``probe(step) -> (batch, labels)``.
        output: NTK output of probe measurements (``"logprob"``, ``"loss"``, ``"projection"``).
        criterion: score of a module from its Gram (:mod:`mat_kernels.train.policy`): ``"lambda"`` (λmax, MAT),
            ``"trace"``, ``"grad_norm"``, ``"coherence"``, ``"offdiag_coherence"``, ``"lambda_ratio"``, or
            ``"heldout"`` (⟨ḡ_train, ḡ_heldout⟩: needs ``heldout``, ``output="loss"`` and a ``probe``; decided by
            the ``"positive"`` policy, the default for it).
        heldout: a held-out probe ``(batch, labels)`` or ``heldout(step) -> (batch, labels)``: a slice of the
            *training* data kept out of the training batches (never the validation set), measured together with
            ``probe`` in one pass (criterion ``"heldout"``).
        policy, alpha, q, top_k: threshold (:func:`mat_kernels.train.policy.threshold_mask`); ``"random"``: the
            ablation at the same budget as ``"mean"``; ``"positive"``: scores above 0; the controls at the
            criterion's own active counts: ``"shuffle"`` (each decision of ``"mean"``, its count per layer and
            kind kept, the modules picked at random) and ``"fixed"`` (the first decision kept for the run).
        seed: seed of the random policies' choices.
        smoothing: weight ρ of the past in an exponential moving average of the scores across measurements
            (``s_t = ρ·s_{t−1} + (1−ρ)·score_t``); 0: no smoothing.
        hysteresis: relative band h around the threshold τ: an active module stays active while its score is above
            τ·(1−h), a frozen one re-enters only above τ·(1+h) (threshold policies ``mean``, ``max``,
            ``quantile``); 0: none.
        group_by: ``"kind"`` (default): threshold each kind of module (heads, output heads, FFN blocks, convs,
            experts) against its own kind; ``"layer"``: each kind within its layer (the modules' name prefix, e.g.
            the heads of one attention layer), kinds with one module per layer across layers; ``"all"``: one
            threshold over all modules. Raw λmax grows with a module's size (an FFN block has ~8× a head's
            parameters and, measured, a λ an order of magnitude larger), so one global α·mean would freeze every
            head for good [D].
        beta, patience, temporal_rule: the temporal convergence rule (off with ``temporal_rule=False``).
        stop_when_converged: set :attr:`should_stop` when every module has converged.
        frozen_backward: ``"dw"`` (exact gradients; frozen modules skip their weight gradient) or ``"detach"``
            (partial backpropagation: no gradient flows through a frozen module).
        sparse_backward: swap ``nn.Linear``/``Conv1D`` layers for sparse-update twins and gate whole weights of
            other layers by ``requires_grad`` (needs the C++ extension for the former).
        lambda_kwargs: Gram settings (:class:`mat_kernels.GramOptions` fields or ``"options"``, validated here) and
            probe settings of :func:`mat_kernels.model_lambda_max` (``forward``, ``causal``, ...).
        ledger: a :class:`mat_kernels.train.flops.FlopsLedger` to record measurements in (default: a new one,
            :attr:`ledger`).
        permute_heads: at each decision, reorder every attention's interchangeable heads (with their output-
            projection columns, parameters, gradients, optimizer state and step counts) so that the active ones are
            contiguous: one GEMM per section of a weight instead of one per run of heads. Decisions, logs, results
            and ``state_dict()`` (model, optimizer, MAT) stay in the original order; ``close()`` moves everything
            back. Refused where heads are not interchangeable (:mod:`mat_kernels.train.permute`).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, specs: list[ModuleSpec] | None = None,
                 out_proj: str = "separate", always_trained="rest", warmup_steps: int = 300, interval: int = 100,
                 gate_after: int = 2, probe=None, output: str = "logprob", criterion: str = "lambda",
                 heldout=None, policy: str | None = None, alpha: float = 1.0, q: float = 0.5,
                 top_k: int | None = None, seed: int = 0,
                 smoothing: float = 0.0, hysteresis: float = 0.0, group_by: str = "kind", beta: float = 1e-3,
                 patience: int = 2, temporal_rule: bool = True, stop_when_converged: bool = False,
                 frozen_backward: str = "dw", sparse_backward: bool = True, lambda_kwargs: dict | None = None,
                 ledger: FlopsLedger | None = None, permute_heads: bool = False):
        for name, v, lo in (("warmup_steps", warmup_steps, 0), ("interval", interval, 1), ("gate_after", gate_after, 1),
                            ("seed", seed, 0)):
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
        if probe is not None and not callable(probe) and not (isinstance(probe, (tuple, list)) and len(probe) == 2):
            raise TypeError("probe must be None, a (batch, labels) pair or a callable probe(step) -> (batch, labels)")
        if output not in ("logprob", "loss", "projection"):
            raise ValueError(f"output must be 'logprob', 'loss' or 'projection', got {output!r}")
        if criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
        if heldout is not None and not callable(heldout) and not (isinstance(heldout, (tuple, list))
                                                                  and len(heldout) == 2):
            raise TypeError("heldout must be None, a (batch, labels) pair or a callable heldout(step) -> (batch, "
                            "labels)")
        if criterion in NEEDS_HELDOUT and heldout is None:
            raise ValueError(f"criterion={criterion!r} needs a held-out probe: pass heldout=(batch, labels)")
        if heldout is not None and probe is None:
            raise ValueError("heldout: a held-out probe is measured with the training probe in one pass: pass "
                             "probe=(batch, labels) too")
        if criterion in NEEDS_HELDOUT and output != "loss":
            raise ValueError(f"criterion={criterion!r} aligns loss gradients: pass output='loss', got {output!r}")
        policy = ("positive" if criterion in NEEDS_HELDOUT else "mean") if policy is None else policy
        if policy not in MAT_POLICIES:
            raise ValueError(f"policy must be one of {MAT_POLICIES}, got {policy!r}")
        alpha = check_number("alpha", alpha, lo=0)
        threshold_mask(torch.ones(max(top_k or 1, 1)), policy if policy in POLICIES else "mean", alpha=alpha, q=q,
                       k=top_k)  # validates q and top_k
        smoothing = check_number("smoothing", smoothing, lo=0, hi=1, hi_open=True)
        hysteresis = check_number("hysteresis", hysteresis, lo=0, hi=1, hi_open=True)
        if hysteresis and policy not in ("mean", "max", "quantile"):
            raise ValueError(f"hysteresis applies to threshold policies (mean, max, quantile), not policy={policy!r}")
        beta = check_number("beta", beta, lo=0)
        if group_by not in ("kind", "layer", "all"):
            raise ValueError(f"group_by must be 'kind', 'layer' or 'all', got {group_by!r}")
        if frozen_backward not in FROZEN_BACKWARD:
            raise ValueError(f"frozen_backward must be one of {FROZEN_BACKWARD}, got {frozen_backward!r}")
        if ledger is not None and not isinstance(ledger, FlopsLedger):
            raise TypeError(f"ledger must be a mat_kernels.train.flops.FlopsLedger or None, got "
                            f"{type(ledger).__name__}")
        if lambda_kwargs is not None and not isinstance(lambda_kwargs, dict):
            raise TypeError(f"lambda_kwargs must be a dict or None, got {type(lambda_kwargs).__name__}")
        self.model = model
        self.module = unwrap_model(model)
        disc = discover_modules(self.module, out_proj=out_proj) if specs is None else None
        self.specs = list(specs if specs is not None else disc.specs)
        validate_specs(self.module, self.specs)
        self.names = [s.name for s in self.specs]
        self.kinds = [s.kind for s in self.specs]
        layers = layer_groups(self.specs)
        kinds = {"kind": self.kinds, "all": ["all"] * len(self.specs), "layer": layers}[group_by]
        # the shuffle control's groups: every module's kind within its layer
        per_layer = [f"{k}@{layer_of(s.name)}" for k, s in zip(self.kinds, self.specs)]
        self._layer_kind = [[i for i, x in enumerate(per_layer) if x == key] for key in dict.fromkeys(per_layer)]
        self.groups = {k: torch.tensor([i for i, x in enumerate(kinds) if x == k]) for k in dict.fromkeys(kinds)}
        self.always_trained = self._always_trained(always_trained)
        self.warmup_steps, self.interval, self.gate_after = warmup_steps, interval, gate_after
        self.probe, self.output, self.criterion, self.heldout = probe, output, criterion, heldout
        self.policy = dict(policy=policy, alpha=alpha, q=q, k=top_k)
        self.smoothing, self.hysteresis = smoothing, hysteresis
        self.rule = TemporalRule(beta, patience) if temporal_rule else None
        self.stop_when_converged = stop_when_converged
        self.frozen_backward = frozen_backward
        self.lambda_kwargs = dict(lambda_kwargs or {})
        gram = {k: v for k, v in self.lambda_kwargs.items() if k in GramOptions.__dataclass_fields__}  # validated now:
        self.gram_options = GramOptions.of(self.lambda_kwargs.get("options"), **gram)
        self._model_kwargs = {k: v for k, v in self.lambda_kwargs.items() if k not in gram and k != "options"}
        self.ledger = ledger if ledger is not None else FlopsLedger()
        self._rng = torch.Generator().manual_seed(seed)
        M = len(self.specs)
        self.active = torch.ones(M, dtype=torch.bool)
        self.converged = torch.zeros(M, dtype=torch.bool)
        self._smoothed: torch.Tensor | None = None
        self._fixed: torch.Tensor | None = None  # policy="fixed": the first decision
        self._n_train: int | None = None  # samples of the training probe in the last measurement (heldout)
        self.step_count = 0
        self.measurements = 0
        self.should_stop = False
        self.log: list[dict] = []
        self._pending: torch.Tensor | None = None
        self._captured = None  # (capture, seconds) of this step's training backward, committed by step()
        self._in_measure = False
        refuse_open_controller(self.module)
        self.optimizer = frozen_optimizer(self.module, self.specs, optimizer)  # validates before any layer is swapped
        if not isinstance(permute_heads, bool):
            raise TypeError(f"permute_heads must be a bool, got {type(permute_heads).__name__}")
        self._perm = HeadPermuter(self.module, self.specs, self.optimizer) if permute_heads else None
        self._hooks = self._perm.install_hooks() if self._perm is not None else []
        self.optimizer.module_order = self._perm  # its state_dict's block_steps in the original order
        self._swapped: list[tuple[nn.Module, str, nn.Module]] = []  # (parent, child, original layer), for close()
        self.closed = False
        self.sparse_layers, self.gated, self.masked_weights = install_sparse(
            self.module, self.specs, wanted=sparse_backward, frozen_backward=self.frozen_backward,
            swapped=self._swapped)
        self.compiled = is_compiled(model)
        self._marked = [self.module] + [layer if isinstance(layer, nn.Module) else layer.attention
                                        for layer, _, _ in self.sparse_layers] + [g.owner for g in self.gated]
        for mod in self._marked:  # a second MAT on any of these is refused while this one is open
            mod.__dict__["_mat_controller"] = weakref.ref(self)
        self._apply_masks()

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

    # ------------------------------------------------------------------------------------------------ loop
    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``. When this step measures from the training backward (``probe=None``), it must run
        inside :meth:`measure_step`, which also saw the forward."""
        self._check_open()
        if self.probe is None and self.measuring_now() and not self._in_measure:
            raise ValueError("this step measures λ from the training backward (probe=None): run the forward and "
                             "backward inside `with mat.measure_step(loss_scale=...)`")
        loss.backward()

    def step(self, closure=None, *, scaler: torch.amp.GradScaler | None = None, grad_scale: float | None = None):
        """Optimizer step keeping frozen slices frozen, then (if due) measurement and new masks.

        ``scaler``: the ``torch.amp.GradScaler`` whose scaled loss the backward ran on
        (``mat.backward(scaler.scale(loss))``); it unscales the gradients (unless ``scaler.unscale_(mat.optimizer)``
        already did, e.g. for clipping) and skips the step if they hold inf/NaN. A skipped step takes no
        measurement, no decision and no ledger entry, and is not counted (the measurement due is taken at the next
        step); λ from a scaled loss is unscaled by the scale in force. Call ``scaler.update()`` afterwards, as
        usual. ``grad_scale``: instead of ``scaler``, the scale of a loss scaler that steps MAT from outside (it
        calls this method only for finite gradients: Lightning's ``16-mixed``, accelerate).
        ``closure`` (re-evaluates the loss, with its backward) runs first, before the frozen slices are set aside."""
        self._check_open()
        if scaler is not None and grad_scale is not None:
            raise ValueError("give scaler (a GradScaler MAT steps through) or grad_scale (a scale applied outside), "
                             "not both")
        if grad_scale is not None:
            grad_scale = check_number("grad_scale", grad_scale, lo=0, lo_open=True)
        loss, stepped = self._optimizer_step(closure, scaler)
        if not stepped:
            self._captured = None
            return loss
        if self._captured is not None:
            enabled = scaler is not None and scaler.is_enabled()
            self._pending = self._take_capture(scaler.get_scale() if enabled else grad_scale or 1.0)
        if self.probe is not None and self.measuring_now():
            self._pending = self.measure()
        self.step_count += 1
        if self._pending is not None:
            self._decide(self._pending)
            self._pending = None
        return loss

    def _optimizer_step(self, closure, scaler) -> tuple:
        """``(loss, whether the step was taken)``: the frozen-slice step, through ``scaler`` if given."""
        if scaler is None:
            return self.optimizer.step(self._slot_active(), closure), True
        if not isinstance(scaler, torch.amp.GradScaler):
            raise TypeError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
        if closure is not None and scaler.is_enabled():
            raise ValueError("scaler: a GradScaler does not support closures (torch.amp.GradScaler.step)")
        # GradScaler keeps its per-optimizer stages privately; an optimizer other than MAT's that was unscaled or
        # stepped by it this iteration means gradients unscaled twice, or a step that bypassed the frozen slices
        from torch.amp.grad_scaler import OptState

        states = getattr(scaler, "_per_optimizer_states", {})
        others = [k for k, st in states.items() if k != id(self.optimizer) and st.get("stage") is not OptState.READY]
        if others:
            raise ValueError(
                "scaler: this GradScaler unscaled or stepped another optimizer than MAT's in this iteration (the one "
                "you built MAT with?); call scaler.unscale_(mat.optimizer) (e.g. before clipping) and "
                "mat.step(scaler=scaler), never scaler.step(optimizer)")
        before = self.optimizer.steps_taken
        loss = scaler.step(self.optimizer, self._slot_active())  # -> self.optimizer.step(...) unless inf/NaN
        return loss, self.optimizer.steps_taken != before

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def set_active(self, active) -> None:
        """Force the activity mask (bool ``[M]``, the modules' order) until the next decision: masks into the layers
        and, with ``permute_heads``, the heads reordered for it (benchmarks, ablations)."""
        active = torch.as_tensor(active)
        if active.dtype != torch.bool or tuple(active.shape) != (len(self.specs),):
            raise ValueError(f"active must be a bool tensor of shape [{len(self.specs)}], got {active.dtype} "
                             f"{list(active.shape)}")
        self.active = active.clone()
        if self._perm is not None:
            self._perm.arrange(self.active)
        self._apply_masks()

    def _slot_active(self) -> torch.Tensor:
        """The activity of what sits at each module's place: the modules' own unless heads were permuted."""
        return self.active if self._perm is None else self._perm.slot_active(self.active)

    def _apply_masks(self) -> None:
        active = self._slot_active()
        with torch.no_grad():
            for layer, order, extra in self.sparse_layers:
                mask = active[order]
                layer.set_active(torch.cat([mask, torch.ones(extra, dtype=torch.bool)]) if extra else mask)
        compiled = self.compiled or is_compiled(self.model)
        if compiled and self.gated and not getattr(self, "_warned_compiled", False):
            self._warned_compiled = True
            warnings.warn(
                f"mat_kernels.MAT: the model is compiled, so the {sum(len(g.tensors) for g in self.gated)} weight(s) "
                "that are gated by requires_grad elsewhere keep requiring grad (flipping it would recompile the "
                "model at every decision): their frozen weight gradients are computed and discarded. "
                f"{[n for g in self.gated for n in g.names][:4]}", UserWarning, stacklevel=3)
        for gate in self.gated:
            gate.apply(bool(active[gate.modules].any()), keep_requires_grad=compiled)

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("this MAT controller was closed (close()): train with mat.optimizer.optimizer, or "
                               "build a new MAT")

    def close(self) -> None:
        """Undo what the controller installed: the original layers are put back (they share the parameters, so the
        model trains densely with its current weights), ``nn.MultiheadAttention`` routing and ``requires_grad``
        gates are removed (every gated weight requires grad again). The wrapped optimizer stays usable as a plain
        one through ``mat.optimizer.optimizer``. Idempotent; the controller cannot be used afterwards."""
        if self.closed:
            return
        if self._perm is not None:  # heads back in their original order, hooks off
            self._perm.restore()
            for h in self._hooks:
                h.remove()
            self._hooks = []
            self.optimizer.module_order = None
        for layer, _, _ in self.sparse_layers:
            if hasattr(layer, "remove"):  # SparseUpdateMHAWeight
                layer.remove()
        for parent, child, original in reversed(self._swapped):
            setattr(parent, child, original)
        for gate in self.gated:
            gate.remove()
        for mod in self._marked:
            mod.__dict__.pop("_mat_controller", None)
        self.sparse_layers, self.gated, self._swapped, self._marked = [], [], [], []
        self.closed = True

    # ------------------------------------------------------------------------------------------------ info
    def active_fraction(self) -> float:
        return float(self.active.float().mean())

    def report(self) -> dict:
        """Which modules skip their weight-gradient GEMMs (sparse-update layers, or weights gated by
        ``requires_grad``), which weights only discard frozen gradients, and which parameters are always trained."""
        return {
            "modules": len(self.specs),
            "active": int(self.active.sum()),
            "converged": int(self.converged.sum()),
            "sparse_backward_layers": len(self.sparse_layers),
            "gated_weights": [n for g in self.gated for n in g.names],
            "masked_weights": list(self.masked_weights),
            "always_trained": list(self.always_trained),
            "frozen_backward": self.frozen_backward,
        }

    def state_dict(self) -> dict:
        return {
            "step_count": self.step_count, "measurements": self.measurements, "active": self.active.clone(),
            "converged": self.converged.clone(), "should_stop": self.should_stop, "log": list(self.log),
            "rule": self.rule.state_dict() if self.rule is not None else None, "names": list(self.names),
            "block_steps": self._module_steps(), "rng": self._rng.get_state(),
            "smoothed": None if self._smoothed is None else self._smoothed.clone(),
            "fixed": None if self._fixed is None else self._fixed.clone(),
        }

    def load_state_dict(self, sd: dict) -> None:
        if sd["names"] != self.names:
            raise ValueError("the saved MAT state was made for other modules")
        self.step_count, self.measurements = sd["step_count"], sd["measurements"]
        self.active, self.converged = sd["active"].clone(), sd["converged"].clone()
        self.should_stop, self.log = sd["should_stop"], list(sd["log"])
        if self.rule is not None and sd["rule"] is not None:
            self.rule.load_state_dict(sd["rule"])
        steps = sd["block_steps"].clone()
        self.optimizer.block_steps = steps if self._perm is None else self._perm.to_slots(steps)
        if self._perm is not None:
            self._perm.arrange(self.active)
        if sd.get("rng") is not None:
            self._rng.set_state(sd["rng"])
        self._smoothed = sd.get("smoothed")
        self._fixed = sd.get("fixed")
        self._apply_masks()

    def _module_steps(self) -> torch.Tensor:
        """Optimizer steps each module took (original order)."""
        steps = self.optimizer.block_steps
        return steps if self._perm is None else self._perm.to_identity(steps)

    def check_probe_model(self) -> None:
        """Raise if samples interact in the model (train-mode BatchNorm) when measuring from the training backward."""
        check_samples_independent(self.module)

