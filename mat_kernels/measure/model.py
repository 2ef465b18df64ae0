"""``model_lambda_max``: ``{module name: λmax}`` for every MAT module of a model on one batch.

The NTK is taken of a per-sample scalar output s_i, chosen explicitly (docs/maths.md §3):

* ``"logprob"`` (default; the paper's choice, on a probe batch): s_i = Σ_t log p(y_it | x_i), the log-probability
  of the true labels summed over the sample's labelled positions (label ``ignore_index`` = -100 is skipped). With
  ``causal=True`` position t predicts label t+1 (causal language models whose labels are the inputs).
* ``"loss"``: s_i = the per-sample loss ``loss_fn(logits, batch) -> [n]`` (default: cross-entropy summed over the
  sample's labelled positions, i.e. -logprob). To reuse a training step's own backward instead of running one,
  see :func:`mat_kernels.capture_lambda_max`.
* ``"projection"``: s_i = ⟨v, f(x_i)⟩ with v ~ N(0, I) over the per-sample output and shared by all samples:
  E_v[Θ] is the output-summed NTK Σ_o J_o J_oᵀ. ``num_projections=k`` averages k independent projections.

One forward and one backward pass; the backward computes only what the modules need (each layer's output
gradient), never weight gradients, and each layer's Grams are built and its tensors dropped as its gradient
arrives (:mod:`mat_kernels.measure.capture`).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from mat_kernels.measure.capture import LambdaCapture
from mat_kernels.measure.discovery import ModuleSpec, discover_modules
from mat_kernels.measure.forward import batch_size, check_samples_independent, default_forward
from mat_kernels.measure.layer import GramOptions
from mat_kernels.measure.result import LambdaMaxResult
from mat_kernels.measure.solvers import lambda_max as _solve

__all__ = ["model_lambda_max", "projection_vectors", "per_sample_output"]

_OUTPUTS = ("logprob", "loss", "projection")




def _logits(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot find the model output in a {type(out).__name__}; pass forward= returning a tensor")


def projection_vectors(shape: tuple[int, ...], k: int, seed: int, device, dtype=torch.float32) -> torch.Tensor:
    """``[k, *shape]`` standard normal vectors of the ``"projection"`` output (seeded on the CPU, so identical on
    every device)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn((k, *shape), generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _check_label_shapes(logits: torch.Tensor, labels, causal: bool) -> None:
    if not isinstance(labels, torch.Tensor) or labels.dtype not in _INT_DTYPES:
        raise TypeError(f"labels must be an integer tensor of class indices (-100: ignored), got "
                        f"{labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__}")
    if causal and (labels.dim() < 2 or labels.shape[1] < 2):
        raise ValueError(f"causal=True needs at least 2 positions (position t predicts label t+1), got labels of "
                         f"shape {tuple(labels.shape)}")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels of shape {tuple(labels.shape)} do not match logits {tuple(logits.shape)} "
                         "(expected logits [n, ..., classes] and labels [n, ...])")


def check_label_values(logits: torch.Tensor, labels: torch.Tensor, *, causal: bool = False) -> None:
    """Refuse labels outside ``[0, classes)`` other than -100 (a -1 would be read as class 0, a label >= classes
    would fail inside ``gather``) and batches whose labels select no position (every λ would be 0). One reduction
    and one host sync; run on the whole batch before :func:`per_sample_output`."""
    _check_label_shapes(logits, labels, causal)
    if labels.device != logits.device:
        raise ValueError(f"labels are on {labels.device}, the model output on {logits.device}")
    if causal:
        labels = labels[:, 1:]
    classes = logits.shape[-1]
    valid = labels != -100
    bad_mask = ((labels < 0) & valid) | (labels >= classes)
    bad, any_valid = torch.stack([bad_mask.any(), valid.any()]).tolist()
    if bad:
        raise ValueError(f"labels must be in [0, {classes}) or -100 (ignored); found {labels[bad_mask][:5].tolist()}")
    if not any_valid:
        raise ValueError("labels select no position (every label is -100"
                         + (" after the causal shift" if causal else "") + "): every λ would be 0")


def per_sample_output(kind: str, logits: torch.Tensor, labels: torch.Tensor | None, *, causal: bool = False,
                      loss_fn: Callable | None = None, batch: Any = None, v: torch.Tensor | None = None):
    """``[n]`` per-sample NTK outputs s_i (see the module docstring). Used by :func:`model_lambda_max`; public so
    that an oracle can compute exactly the same s_i."""
    if kind == "projection":
        return (logits.float() * v).flatten(1).sum(1)
    if kind == "loss" and loss_fn is not None:
        s = loss_fn(logits, batch)
        if not isinstance(s, torch.Tensor) or s.dim() != 1 or s.shape[0] != logits.shape[0]:
            raise ValueError(f"loss_fn must return per-sample losses of shape [n={logits.shape[0]}], got "
                             f"{tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__}")
        return s
    if labels is None:
        raise ValueError(f"output={kind!r} needs labels: pass labels=, or a dict batch with a 'labels' entry")
    _check_label_shapes(logits, labels, causal)
    if causal:
        logits, labels = logits[:, :-1], labels[:, 1:]
    valid = labels != -100
    logp = F.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, labels.clamp_min(0).long().unsqueeze(-1)).squeeze(-1) * valid  # any int dtype
    s = picked.reshape(picked.shape[0], -1).sum(1)
    return s if kind == "logprob" else -s


def model_lambda_max(
    model: nn.Module,
    batch,
    *,
    output: str = "logprob",
    specs: list[ModuleSpec] | None = None,
    labels: torch.Tensor | None = None,
    forward: Callable | None = None,
    loss_fn: Callable | None = None,
    causal: bool = False,
    num_projections: int = 1,
    seed: int = 0,
    out_proj: str = "separate",
    sample_dim: int = 0,
    return_grams: bool = False,
    options: GramOptions | None = None,
    **gram_settings,
) -> LambdaMaxResult:
    """λmax of every MAT module of ``model`` on one batch.

    Args:
        model: any ``nn.Module`` (own, ``nn.MultiheadAttention``-based, Hugging Face BERT/RoBERTa/GPT-2/ViT, CNNs).
            Its mode is left as it is; train-mode BatchNorm is refused (samples would interact).
        batch: a tensor, a tuple/list (``model(*batch)``) or a dict (``model(**batch)`` without ``labels``); its
            leading dimension is the n samples.
        output: ``"logprob"``, ``"loss"`` or ``"projection"`` (module docstring).
        specs: modules to measure (default: :func:`mat_kernels.discover_modules` with ``out_proj``).
        labels: labels for ``logprob``/``loss`` (default: ``batch["labels"]``).
        forward: ``forward(model, batch) -> output`` (default above); the logits are the output tensor, its
            ``.logits`` or its first element.
        loss_fn: for ``output="loss"``: ``loss_fn(logits, batch) -> [n]`` per-sample losses.
        causal: for ``logprob``/default ``loss``: position t predicts label t+1.
        num_projections, seed: for ``projection``.
        out_proj: passed to discovery.
        sample_dim: 0 if plain linear layers see ``[n, T, d]`` (default), 1 if sequence-first ``[T, n, d]`` (layers
            inside ``nn.TransformerEncoderLayer``/``DecoderLayer`` follow its ``batch_first`` by themselves).
        return_grams: also return the Grams ``[M, n, n]`` (``res.gram(name)``: one module's ``[n, n]``).
        options, **gram_settings: the Gram settings, a :class:`mat_kernels.GramOptions` and/or its fields as
            keywords (``method``, ``allow_tf32``, ``backend``, ``sketch_size``, ``check_finite``, ...), validated
            once here and passed down as one object.

    Returns:
        :class:`mat_kernels.LambdaMaxResult` (``level="model"``): ``names`` (the specs' names), ``values`` fp32
        ``[M]``, ``as_dict()``, and ``specs``, ``unclaimed``, ``grams``, ``output``, ``n``, ``backend``,
        ``peak_held_bytes``. The Grams' FLOPs are counted by ``torch.utils.flop_counter`` like the forward and
        backward's (the formula of ``mat_kernels::segment_grams``).

    Raises:
        ValueError: unknown output, empty batch, train-mode BatchNorm, missing labels, bad specs.
        RuntimeError: a module's layer never ran in the forward pass.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if output not in _OUTPUTS:
        raise ValueError(f"output must be one of {_OUTPUTS}, got {output!r}")
    if not isinstance(num_projections, int) or num_projections < 1:
        raise ValueError(f"num_projections must be a positive int, got {num_projections!r}")
    opts = GramOptions.of(options, **gram_settings)
    check_samples_independent(model)
    n = batch_size(batch)
    if n == 0:
        raise ValueError("empty batch: n = 0 samples")
    unclaimed: dict[str, str] = {}
    if specs is None:
        disc = discover_modules(model, out_proj=out_proj)
        specs, unclaimed = disc.specs, disc.unclaimed
        if not specs:
            raise ValueError(f"no MAT module found in {type(model).__name__}; unclaimed parameters: "
                             f"{dict(list(unclaimed.items())[:5])}. Pass explicit specs=[ModuleSpec(...)]")
    if labels is None and isinstance(batch, dict):
        labels = batch.get("labels")
    fwd = forward or default_forward
    passes = num_projections if output == "projection" else 1
    total, backend, peak = None, None, 0
    for p in range(passes):
        cap = LambdaCapture(model, specs, n=n, tap=True, sample_dim=sample_dim, options=opts)
        with cap:
            logits = _logits(fwd(model, batch))
            if logits.shape[0] != n:
                raise ValueError(f"the model output has leading dimension {logits.shape[0]}, the batch n={n}")
            v = None
            if output == "projection":
                v = projection_vectors(tuple(logits.shape[1:]), passes, seed, logits.device)[p]
            if p == 0 and output != "projection" and loss_fn is None and labels is not None:
                check_label_values(logits, labels, causal=causal)
            s = per_sample_output(output, logits, labels, causal=causal, loss_fn=loss_fn, batch=batch, v=v)
            cap.backward(s.sum())
        cap.check_complete()
        g = cap.module_grams()
        total = g if total is None else total + g
        backend, peak = cap.backend, max(peak, cap.peak_held_bytes)
    grams = total / passes
    lam = _solve(grams, check_finite=opts.check_finite)
    return LambdaMaxResult(
        tuple(s.name for s in specs), lam, grams if return_grams else None, n, "model", backend, specs=specs,
        unclaimed=unclaimed, output=output, peak_held_bytes=peak,
    )
