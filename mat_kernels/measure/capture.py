"""Capture of the inputs and output gradients the MAT modules need, with each layer's Grams built as soon as its
output gradient arrives (then both are dropped), so the memory held is one layer's output gradient at a time.

A *site* is one weight used as a linear map: ``nn.Linear``, Hugging Face ``Conv1D`` (transposed storage),
``nn.Conv2d`` (a linear map on unfolded patches) or the projections of ``nn.MultiheadAttention``. Every forward
call of a site is a *record*: its input ``x`` (a detached view; autograd already keeps it for the weight
gradient, so this costs no memory) and, when the backward reaches it, the output gradient ``dy``. The sample
axis of x and dy is put first (``[n, T, d]``) by the site's layout, and :func:`mat_kernels.layer_grams` gives the
Grams of every module slice on that site; Grams of slices add into each module's ``[n, n]`` Gram.

How calls are seen:

* ``nn.Linear``, ``Conv1D``, ``nn.Conv2d``: forward hooks on the layer; a tensor hook on its output for dy.
* ``nn.MultiheadAttention``: it calls ``F.linear`` on its own parameters (``in_proj_weight``, row views of it for
  cross-attention, ``out_proj.weight``), so no hook on ``out_proj`` ever fires. Within the capture a recording
  handler of :mod:`mat_kernels.routing` sees those calls (while the attention module runs its forward), outside
  any sparse-update routing of the same weights, so it records what that route computes. Its tensors are
  sequence-first (``[T, n, E]``, and ``[T·n, E]`` for ``out_proj``).

Several calls of one weight (shared weights) are one per-sample gradient: their tokens are concatenated before
the Gram. With gradient checkpointing, calls recomputed during the backward are ignored unless their output
gradient arrives (reentrant checkpointing), so both variants measure the same thing.

``tap=True`` (used by :func:`mat_kernels.model_lambda_max`, which owns the backward): each captured output is
returned as ``out + z`` with ``z`` a zero scalar leaf, and the backward asks for the gradient of ``z`` only. The
values are unchanged (``+ 0``), every layer's dy is computed, and no weight gradient is computed or stored.
(Reentrant checkpointing supports only a plain ``.backward()``: there weight gradients are computed, and the
model's ``.grad`` is restored afterwards.)
"""
from __future__ import annotations

import contextlib
import functools
import time

import torch
import torch.nn as nn

from mat_kernels import routing
from mat_kernels.layers import layer_type_of, layer_types
from mat_kernels.measure.capture_records import Record, Site, gemm_dtype, site_grams
from mat_kernels.measure.discovery import group_by_weight
from mat_kernels.measure.forward import check_samples_independent
from mat_kernels.measure.layer import GramOptions
from mat_kernels.measure.result import LambdaMaxResult
from mat_kernels.measure.specs import ModuleSpec

__all__ = ["LambdaCapture", "capture_lambda_max"]

# what a capture's Grams are over when one step accumulates gradients over several micro-batches
MICRO_BATCHES = ("first", "all")


class LambdaCapture:
    """Context manager that captures what the given modules need during a forward and backward pass, and builds
    their Grams layer by layer. See :func:`capture_lambda_max` (the public constructor) for the arguments."""

    def __init__(self, model: nn.Module, specs: list[ModuleSpec], *, n: int | None = None,
                 loss_scale: float | str = 1.0,
                 tap: bool = False, sample_dim: int = 0, micro_batches: str = "first",
                 options: GramOptions | None = None, **gram_settings):
        if micro_batches not in MICRO_BATCHES:
            raise ValueError(f"micro_batches must be one of {MICRO_BATCHES}, got {micro_batches!r}")
        self._by_weight = group_by_weight(model, specs)  # validates the specs
        if sample_dim not in (0, 1):
            raise ValueError(f"sample_dim must be 0 (inputs [n, ...]) or 1 (sequence-first [T, n, ...]), got "
                             f"{sample_dim!r}")
        self.sample_dim = sample_dim
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n <= 0):
            raise ValueError(f"n must be a positive int (the number of samples), got {n!r}")
        if loss_scale != "mean" and (isinstance(loss_scale, bool) or not isinstance(loss_scale, (int, float))
                                     or not loss_scale > 0):
            raise ValueError(f"loss_scale must be a positive number or 'mean', got {loss_scale!r}")
        self.model, self.specs, self.n, self.tap = model, list(specs), n, tap
        self.loss_scale = loss_scale if loss_scale == "mean" else float(loss_scale)
        self.options = GramOptions.of(options, **gram_settings)  # validated here, before any forward
        self.sites: dict[str, Site] = {}
        self._by_id: dict[int, Site] = {}
        self._build_sites()
        self.grams: torch.Tensor | None = None
        self.backend: str | None = None
        self.held_bytes = 0
        self.peak_held_bytes = 0
        self.gram_seconds = 0.0  # host wall time spent building Grams (inside the backward's hooks)
        self._records: dict[tuple, list[Record]] = {}
        self._done: set[tuple] = set()
        self._handles: list = []
        self._in_mha = 0  # depth of captured nn.MultiheadAttention forwards running
        self._stack = contextlib.ExitStack()
        self._z = torch.zeros((), requires_grad=True) if tap else None
        self._tapped = 0
        self.micro_batches = micro_batches
        self.micro_n: int | None = n  # samples per micro-batch (the first one's; all must match)
        self._micro = 0  # index of the micro-batch whose forward runs (a forward after a backward starts the next)
        self._after_backward = False

    # ------------------------------------------------------------------------------------------------ sites
    def _build_sites(self) -> None:
        params = dict(self.model.named_parameters())
        owners = dict(self.model.named_modules())
        for wname, groups in self._by_weight.items():
            site = self.sites[wname] = self._make_site(wname, params, owners)
            site.sample_dim = self._sample_dim_of(wname, owners)
            self._by_id[id(site.param)] = site
            for g in groups:  # a whole weight is all its rows
                site.groups.append(("rows" if g.axis == "all" else g.axis, g.bias,
                                    [(m, list(r)) for m, r in g.entries()]))

    def _sample_dim_of(self, name: str, owners) -> int:
        # nn.TransformerEncoderLayer / DecoderLayer say whether their tensors are sequence-first
        parts = name.split(".")[:-1]
        for k in range(len(parts), -1, -1):
            mod = owners.get(".".join(parts[:k]))
            if isinstance(mod, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
                return 0 if mod.self_attn.batch_first else 1
        return self.sample_dim

    def _make_site(self, name: str, params, owners) -> Site:
        owner_name, attr = name.rsplit(".", 1) if "." in name else ("", name)
        owner = owners[owner_name]
        parent = owners.get(owner_name.rsplit(".", 1)[0] if "." in owner_name else "") if owner_name else None
        layer = layer_type_of(owner, attr, parent)
        if layer is None:
            raise ValueError(f"parameter {name} belongs to a {type(owner).__name__}, which is no registered layer type "
                             f"({layer_types()}); mat_kernels.layers.register_layer_type teaches it one")
        p = params[name]
        d_out, d_in = layer.linear_shape(owner, attr, p)
        return Site(name, layer, owner, layer.scope(owner, parent), p, d_out, d_in)

    # ------------------------------------------------------------------------------------------------ hooks
    def __enter__(self) -> "LambdaCapture":
        if self._handles:
            raise RuntimeError("this capture is already active")
        # Sparse-update layers and gates (MAT) run the exact backward while captured: gradients must flow through
        # frozen blocks (frozen_backward="detach" would stop them), and a measurement's own backward needs no dW.
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(routing.exact_backward(self.model, weight_grad=not self.tap))
        scopes_done = set()
        for site in self.sites.values():
            if site.layer.calls == "linear":
                if not scopes_done:
                    self._stack.enter_context(routing.linear_handler(self._on_linear, routing.RECORD))
                if id(site.scope) in scopes_done:
                    continue
                scopes_done.add(id(site.scope))
                self._handles.append(site.scope.register_forward_pre_hook(self._mha_enter))
                self._handles.append(site.scope.register_forward_hook(self._mha_exit, always_call=True))
            else:
                self._handles.append(site.owner.register_forward_hook(functools.partial(self._module_hook, site)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._stack.close()

    def _module_hook(self, site: Site, module, inputs, output):
        x = inputs[0] if inputs else None
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{site.weight}: the layer's first positional input must be a tensor")
        bias = getattr(module, "bias", None)
        return self._record(site, x, output, 0, site.d_out, bias is not None)

    def _mha_enter(self, module, args):
        self._in_mha += 1  # (an interrupted forward leaves it raised: harmless, the capture ends with its `with`)

    def _mha_exit(self, module, args, output):
        self._in_mha = max(self._in_mha - 1, 0)

    def _on_linear(self, nxt, input, weight, bias=None):
        """The ``F.linear`` handler: records the calls an ``nn.MultiheadAttention`` makes on a captured weight."""
        out = nxt(input, weight, bias)
        site, r0, rows = self._lookup(weight) if self._in_mha else (None, 0, 0)
        if site is None:
            return out
        new = self._record(site, input, out, r0, rows, bias is not None)
        return out if new is None else new

    def _lookup(self, weight: torch.Tensor):
        site = self._by_id.get(id(weight))
        if site is not None:
            return site, 0, site.d_out
        base = weight._base
        site = self._by_id.get(id(base)) if base is not None else None
        if site is None:
            return None, 0, 0
        r0 = routing.is_view_of_rows(weight, site.param)
        if r0 is None:
            raise ValueError(f"{site.weight}: used through a view that is not a block of whole rows")
        return site, r0, weight.shape[0]

    # ------------------------------------------------------------------------------------------------ records
    def _record(self, site: Site, x, out, r0: int, rows: int, has_bias: bool):
        site.calls += 1
        if not isinstance(out, torch.Tensor) or not out.requires_grad:
            site.no_grad_calls += 1
            return None
        # A call made while autograd executes a node is a recomputation (gradient checkpointing). Non-reentrant
        # checkpointing recomputes before the layer's own output gradient is known; its recomputed outputs never
        # receive one, so they must not hold back the forward call's record.
        in_backward = torch._C._current_autograd_node() is not None
        if not in_backward and self._after_backward:  # a forward after a backward: the next micro-batch
            self._next_micro(site, x)
        if self.n is None:
            self.n = self.micro_n = self._samples_in(site, x)
        if self._micro > 0 and self.micro_batches == "first":  # the Gram is over the first micro-batch's samples;
            out.register_hook(self._saw_backward)  # only where the next micro-batch starts is still watched
            return None
        rec = Record(site, x.detach(), r0, rows, has_bias, in_backward, micro=self._micro,
                     dtype=gemm_dtype(site, x, out))
        self._records.setdefault((site.weight, r0, rows), []).append(rec)
        if self.tap and not in_backward:
            out = out + self._z
            self._tapped += 1
            out.register_hook(functools.partial(self._on_dy, rec))
            return out
        out.register_hook(functools.partial(self._on_dy, rec))
        return None

    def _samples_in(self, site: Site, x: torch.Tensor) -> int:
        return site.layer.samples_in(site, x)

    def _next_micro(self, site: Site, x: torch.Tensor) -> None:
        self._micro += 1
        self._after_backward = False
        n = self._samples_in(site, x)
        if self.micro_n is not None and n != self.micro_n:
            raise ValueError(
                f"micro_batches: micro-batch {self._micro} of this step has {n} samples, the first had {self.micro_n}; "
                "one capture needs micro-batches of equal size, so that loss_scale weighs every sample alike "
                "(loss = loss_scale · Σ_i s_i over all micro-batches)")

    def _saw_backward(self, grad):
        self._after_backward = True

    def _on_dy(self, rec: Record, grad: torch.Tensor | None):
        self._after_backward = True
        if grad is None:
            raise RuntimeError(
                f"{rec.site.weight}: no gradient reached this layer's output in the backward; a measurement needs "
                "the gradient of every captured layer (was the branch detached, e.g. by a layer's forward hook?)")
        rec.dy = grad.detach()
        self.held_bytes += rec.dy.numel() * rec.dy.element_size()
        self.peak_held_bytes = max(self.peak_held_bytes, self.held_bytes)
        key = (rec.site.weight, rec.r0, rec.rows)
        if self.micro_batches == "all":
            self.held_bytes += rec.x.numel() * rec.x.element_size()  # held past the backward: built at the end
            self.peak_held_bytes = max(self.peak_held_bytes, self.held_bytes)
            return None
        if key in self._done:
            raise RuntimeError(
                f"{rec.site.weight}: a second forward call's gradient arrived after the Gram of the first was "
                "built: a second backward through the same forward (retain_graph=True; run one backward per "
                "micro-batch), or shared weights under reentrant gradient checkpointing (use use_reentrant=False)"
            )
        if rec.backward_phase:
            group = [rec]
        else:
            group = [r for r in self._records[key] if not r.backward_phase]
            if any(r.dy is None for r in group):
                return None  # wait for the other calls of this weight
        self._build(rec.site, [group])
        for r in group:
            self.held_bytes -= r.dy.numel() * r.dy.element_size()
            r.x = r.dy = None
            self._records[key].remove(r)
        self._done.add(key)
        return None

    # ------------------------------------------------------------------------------------------------ Grams
    def _build(self, site: Site, micro_groups: list[list[Record]]) -> None:
        t0 = time.perf_counter()
        try:
            self._build_grams(site, micro_groups)
        finally:
            self.gram_seconds += time.perf_counter() - t0

    def _build_grams(self, site: Site, micro_groups: list[list[Record]]) -> None:
        """Grams of one weight from its calls (:func:`~mat_kernels.measure.capture_records.site_grams`), added into
        the modules' Grams."""
        if self.grams is None:
            device = micro_groups[0][0].x.device
            self.grams = torch.zeros(len(self.specs), self.n, self.n, dtype=torch.float32, device=device)
        for mods, res in site_grams(site, micro_groups, self.micro_n, self.options):
            self.backend = res.backend
            self.grams.index_add_(0, torch.tensor(mods, device=self.grams.device), res.grams)

    # ------------------------------------------------------------------------------------------------ driving
    def backward(self, total: torch.Tensor) -> None:
        """Backward of the scalar ``total = Σ_i s_i`` that computes every captured layer's output gradient.

        With ``tap=True`` the gradient is asked for the zero tap only (no weight gradient is computed). Layers whose
        forward ran without grad (reentrant checkpointing) are reached through their weights instead.
        """
        if not isinstance(total, torch.Tensor) or total.numel() != 1 or not total.requires_grad:
            raise ValueError("total must be a scalar tensor that requires grad (Σ_i s_i of the captured forward)")
        if any(s.no_grad_calls for s in self.sites.values()):
            # Reentrant checkpointing ran these layers without grad and recomputes them in the backward, which it
            # supports only through .backward() without inputs=: run it, keeping the model's .grad as it was.
            params = [p for p in self.model.parameters() if p.requires_grad]
            stash = [p.grad for p in params]
            for p in params:
                p.grad = None
            try:
                total.backward()
            finally:
                for p, g in zip(params, stash):
                    p.grad = g
            return
        if not self._tapped:
            raise RuntimeError("no captured layer ran with gradients in the forward pass")
        torch.autograd.grad(total, [self._z], allow_unused=True)

    def check_complete(self) -> None:
        """Raise if a module's layer never ran in the forward pass (nothing would be measured for it)."""
        if self.micro_batches == "all" and self._records:
            self._build_deferred()
        for site in self.sites.values():
            if site.calls == 0:
                users = [self.specs[m].name for _, _, entries in site.groups for m, _ in entries]
                raise RuntimeError(
                    f"layer {site.weight} (modules {users[:3]}{'...' if len(users) > 3 else ''}) was never called in "
                    "the forward pass, or was called through a path mat_kernels cannot see (e.g. the fused inference "
                    "path of nn.MultiheadAttention, taken when its weights do not require grad)"
                )
            if site.no_grad_calls == site.calls and not self._done_for(site):
                raise RuntimeError(f"layer {site.weight} ran only without gradients; nothing was captured for it")

    def _done_for(self, site: Site) -> bool:
        return any(k[0] == site.weight for k in self._done)

    def _build_deferred(self) -> None:
        """``micro_batches="all"``: every weight's Gram over the samples of all micro-batches, from the records held
        through the step (calls that got no output gradient, e.g. non-reentrant checkpointing's recomputations, are
        skipped)."""
        if self._micro > 0:
            self.n = self.micro_n * (self._micro + 1)
        for key, recs in list(self._records.items()):
            got = [r for r in recs if r.dy is not None]
            if not got:
                continue
            by_micro: dict[int, list[Record]] = {}
            for r in got:
                by_micro.setdefault(r.micro, []).append(r)
            if len(by_micro) != self._micro + 1:
                raise RuntimeError(f"{key[0]}: the layer ran in {len(by_micro)} of the step's {self._micro + 1} "
                                   "micro-batches; micro_batches='all' needs it in every one")
            self._build(got[0].site, [by_micro[k] for k in sorted(by_micro)])
            self._done.add(key)
        self._records.clear()
        self.held_bytes = 0

    def module_grams(self) -> torch.Tensor:
        """``[M, n, n]`` fp32 Grams (module order of ``specs``), divided by ``loss_scale²``. With
        ``micro_batches="all"`` the Grams are built here, over the samples of every micro-batch."""
        if self.micro_batches == "all" and self._records:
            self._build_deferred()
        if self.grams is None:
            raise RuntimeError("no output gradient reached any captured layer: run the backward inside the capture")
        self._records.clear()
        scale = self.loss_scale
        if scale == "mean":  # the loss is the mean over every sample of the step: micro_n per micro-batch
            scale = 1.0 / (self.micro_n * (self._micro + 1))
        return self.grams / (scale ** 2)


def capture_lambda_max(model: nn.Module, specs: list[ModuleSpec] | None = None, *, n: int | None = None,
                       loss_scale: float | str = 1.0, sample_dim: int = 0, micro_batches: str = "first",
                       options: GramOptions | None = None, **gram_settings) -> LambdaCapture:
    """Capture the modules' Grams from a backward you run yourself (e.g. the training step's own backward).

    ::

        with mk.capture_lambda_max(model, loss_scale=1 / n) as cap:   # loss = mean over the batch
            loss = criterion(model(x), y)                              # per-sample terms s_i, reduction 'mean'
            loss.backward()
        lam = cap.lambda_max()                          # LambdaMaxResult: lam[name], lam.as_dict()

    The NTK output is then the per-sample training loss: ``loss = loss_scale · Σ_i s_i`` must hold (``1/n`` for a
    mean over samples, ``1`` for a sum, ``1/N`` for a mean over N tokens), and Θ is rescaled by ``1/loss_scale²``.
    ``loss_scale="mean"``: the loss is the mean over all the samples the capture saw, ``1/(n·k)`` with k
    micro-batches of n (each micro-batch's mean loss divided by k, as accumulating loops and Lightning do).
    Samples must not interact in the model (train-mode BatchNorm couples them).

    Under autocast (bf16/fp16, CPU or CUDA) each layer's Gram is built from what its GEMM multiplied: the input as
    autocast cast it and the 16-bit output gradient, accumulated in fp32.

    Several forward/backward passes inside one capture are the micro-batches of one optimizer step (gradient
    accumulation; all of the same size): ``micro_batches="first"`` (default) measures the first micro-batch's
    samples and records nothing after it (no memory beyond one layer's output gradient at a time);
    ``"all"`` measures the Gram over the samples of every micro-batch, which holds every captured layer's input and
    output gradient of every micro-batch until the Grams are built at the end (``peak_held_bytes`` says how much).

    Args:
        model: the model; ``specs`` default to :func:`mat_kernels.discover_modules`'s.
        specs: modules to measure.
        n: number of samples (default: the leading dimension of the first captured layer input).
        loss_scale: see above.
        micro_batches: ``"first"`` or ``"all"``, see above.
        sample_dim: where the samples are in the inputs of plain linears: 0 (``[n, T, d]``, default) or 1
            (sequence-first ``[T, n, d]``). Layers inside ``nn.TransformerEncoderLayer``/``DecoderLayer`` follow
            that layer's ``batch_first``; ``nn.MultiheadAttention`` projections are handled internally.
        options, **gram_settings: the Gram settings, a :class:`mat_kernels.GramOptions` and/or its fields as
            keywords (``method``, ``allow_tf32``, ``backend``, ...), validated here.
    """
    from mat_kernels.measure.discovery import discover_modules

    check_samples_independent(model)
    if specs is None:
        specs = discover_modules(model).specs
    return _TrainingCapture(model, specs, n=n, loss_scale=loss_scale, tap=False, sample_dim=sample_dim,
                            micro_batches=micro_batches, options=GramOptions.of(options, **gram_settings))


class _TrainingCapture(LambdaCapture):
    def lambda_max(self) -> LambdaMaxResult:
        """λmax of what the backward inside the ``with`` block captured: a :class:`mat_kernels.LambdaMaxResult`
        (``level="capture"``, with the Grams; ``res[name]``, ``res.as_dict()``)."""
        from mat_kernels.measure.solvers import lambda_max as solve

        self.check_complete()
        grams = self.module_grams()
        return LambdaMaxResult(tuple(s.name for s in self.specs), solve(grams, check_finite=self.options.check_finite),
                               grams, self.n, "capture", self.backend, specs=self.specs, output="loss",
                               peak_held_bytes=self.peak_held_bytes)
