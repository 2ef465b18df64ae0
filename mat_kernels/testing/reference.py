"""Plain-PyTorch oracles for the mNTK of one linear layer.

These share no algebra with the kernels: they never use the ghost identity or the per-token factorisation.
They build each sample's parameter gradient with autograd (a real backward pass per sample, or
``torch.func.vmap(grad)``), slice it per module, and form the Gram ``J Jᵀ`` explicitly, by default in float64.

The scalar output of sample ``i`` is ``s_i = Σ_t ⟨dy_it, y_it⟩`` with ``y_it = W x_it + b``, so that
``∂s_i/∂y_it = dy_it``: the stored output gradient plays the role of δ in docs/maths.md §1.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mat_kernels.blocks import BlockSpec, WeightBlocks, layer_blocks
from mat_kernels.layers import layer_type_of

__all__ = [
    "per_sample_grads_loop",
    "per_sample_grads_func",
    "module_grams",
    "lambda_max_eigvalsh",
    "reference_lambda_max",
]


def _as_3d(t: torch.Tensor) -> torch.Tensor:
    return t.unsqueeze(1) if t.dim() == 2 else t


def _random_layer(d_out: int, d_in: int, bias: bool, dtype, device, seed: int = 0):
    # The gradient of a linear layer does not depend on W; a random W keeps the oracle an honest forward pass.
    g = torch.Generator(device="cpu").manual_seed(seed)
    w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
    b = torch.randn(d_out, generator=g, dtype=torch.float64).to(dtype=dtype, device=device) if bias else None
    return w, b


def per_sample_grads_loop(x: torch.Tensor, dy: torch.Tensor, *, bias: bool = False, dtype=torch.float64):
    """Per-sample ``(dW_i, db_i)`` by one real ``autograd`` backward pass per sample.

    Args:
        x: ``[n, T, d_in]`` or ``[n, d_in]`` layer inputs.
        dy: ``[n, T, d_out]`` or ``[n, d_out]`` output gradients.
        bias: also return the bias gradients.
        dtype: compute dtype (float64 by default).

    Returns:
        ``(gw [n, d_out, d_in], gb [n, d_out] or None)``.
    """
    x3, dy3 = _as_3d(x).to(dtype), _as_3d(dy).to(dtype)
    n, _, d_in = x3.shape
    d_out = dy3.shape[-1]
    w, b = _random_layer(d_out, d_in, bias, dtype, x3.device)
    w.requires_grad_(True)
    params = [w]
    if b is not None:
        b.requires_grad_(True)
        params.append(b)
    gws, gbs = [], []
    for i in range(n):
        s = (F.linear(x3[i], w, b) * dy3[i]).sum()
        grads = torch.autograd.grad(s, params)
        gws.append(grads[0])
        if bias:
            gbs.append(grads[1])
    gw = torch.stack(gws) if gws else x3.new_zeros(0, d_out, d_in)
    gb = (torch.stack(gbs) if gbs else x3.new_zeros(0, d_out)) if bias else None
    return gw, gb


def per_sample_grads_func(x: torch.Tensor, dy: torch.Tensor, *, bias: bool = False, dtype=torch.float64):
    """Per-sample ``(dW_i, db_i)`` with ``torch.func.vmap(torch.func.grad(...))``; same contract as the loop."""
    x3, dy3 = _as_3d(x).to(dtype), _as_3d(dy).to(dtype)
    d_in, d_out = x3.shape[-1], dy3.shape[-1]
    w, b = _random_layer(d_out, d_in, bias, dtype, x3.device)

    def s(params, xi, dyi):
        return (F.linear(xi, params[0], params[1] if bias else None) * dyi).sum()

    params = (w, b if bias else torch.zeros(0, dtype=dtype, device=x3.device))
    gw, gb = torch.func.vmap(torch.func.grad(s), in_dims=(None, 0, 0))(params, x3, dy3)
    return gw, (gb if bias else None)


def module_grams(gw: torch.Tensor, gb: torch.Tensor | None, blocks: WeightBlocks) -> torch.Tensor:
    """Explicit Grams ``Θ_m = J_m J_mᵀ`` from per-sample gradients, one per module: ``[M, n, n]``."""
    n = gw.shape[0]
    grams = []
    for ranges in blocks.modules:
        parts = []
        for start, size in ranges:
            if blocks.axis == "rows":
                parts.append(gw[:, start : start + size, :].reshape(n, -1))
                if blocks.bias:
                    parts.append(gb[:, start : start + size])
            else:
                parts.append(gw[:, :, start : start + size].reshape(n, -1))
        j = torch.cat(parts, dim=1)
        grams.append(j @ j.T)
    return torch.stack(grams)


def lambda_max_eigvalsh(grams: torch.Tensor) -> torch.Tensor:
    """Largest eigenvalue of each symmetric matrix in ``[M, n, n]`` by a full ``eigvalsh``."""
    return torch.linalg.eigvalsh(grams)[..., -1]


def reference_lambda_max(
    x: torch.Tensor,
    dy: torch.Tensor,
    *,
    row_blocks: BlockSpec = None,
    col_blocks: BlockSpec = None,
    bias: bool = False,
    oracle: str = "loop",
    dtype=torch.float64,
):
    """λmax and Grams of every module of one layer, the slow and obviously-right way.

    Module order matches :func:`mat_kernels.estimate_lambda_max`: row modules, then column modules; with neither
    given, the whole weight (and bias) is one module.

    Returns:
        ``(lambda_max [M], grams [M, n, n])`` in ``dtype``.
    """
    grads = {"loop": per_sample_grads_loop, "func": per_sample_grads_func}[oracle]
    d_in, d_out = x.shape[-1], dy.shape[-1]
    layouts = layer_blocks(row_blocks, col_blocks, bias, d_in, d_out)  # spec parsing only; the maths is its own
    gw, gb = grads(x, dy, bias=bias, dtype=dtype)
    grams = torch.cat([module_grams(gw, gb, lb) for lb in layouts])
    return lambda_max_eigvalsh(grams), grams


# ----------------------------------------------------------------------------------------------------------------
# whole-model oracle (model-level λmax)
# ----------------------------------------------------------------------------------------------------------------
def model_per_sample_grads(model: torch.nn.Module, batch, s_fn, param_names: list[str], *,
                           dtype=torch.float64, method: str = "vmap") -> dict[str, torch.Tensor]:
    """Per-sample gradients ``{name: [n, *shape]}`` of ``s_fn(model_output_for_one_sample) -> scalar`` w.r.t. the
    named parameters, by ``torch.func.vmap(grad)`` over the whole model, in ``dtype`` (a float64 copy of the model).

    Args:
        model: the model (copied and cast to ``dtype``; the original is not touched).
        batch: a tensor, tuple of tensors, or dict of tensors whose leading dimension is the n samples; floating
            tensors are cast to ``dtype``.
        s_fn: ``s_fn(f, sample_batch) -> scalar``: ``f(inputs)`` runs the model (a dict of inputs is passed as
            keyword arguments) and ``sample_batch`` is ``batch`` restricted to one sample, leading dimension 1 kept.
        param_names: parameters to differentiate.
        method: ``"vmap"`` (``torch.func``) or ``"loop"`` (one real forward and backward per sample, for models
            with data-dependent control flow that ``vmap`` cannot trace).
    """
    import copy

    m = copy.deepcopy(model).to(dtype)
    params = dict(m.named_parameters())
    missing = [p for p in param_names if p not in params]
    if missing:
        raise ValueError(f"no such parameters: {missing}")
    target = {k: params[k].detach() for k in param_names}
    others = {k: v.detach() for k, v in params.items() if k not in target}
    buffers = dict(m.named_buffers())

    def cast(t):
        return t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t

    if isinstance(batch, dict):
        keys = list(batch)
        vals = tuple(cast(batch[k]) for k in keys)
    elif isinstance(batch, (tuple, list)):
        keys, vals = None, tuple(cast(b) for b in batch)
    else:
        keys, vals = None, (cast(batch),)

    def one(p, *sample):
        sample = tuple(t.unsqueeze(0) for t in sample)
        b = dict(zip(keys, sample)) if keys is not None else (sample if isinstance(batch, (tuple, list)) else
                                                              sample[0])

        def call(mod, inp):
            state = {**p, **others, **buffers}
            if isinstance(inp, dict):  # keyword inputs (Hugging Face style)
                return torch.func.functional_call(mod, state, (), inp)
            return torch.func.functional_call(mod, state, (inp,))

        return s_fn(lambda inp: call(m, inp), b)

    if method == "loop":
        n = vals[0].shape[0]
        rows = []
        for i in range(n):
            p = {k: v.clone().requires_grad_(True) for k, v in target.items()}
            s = one(p, *(v[i] for v in vals))
            rows.append(torch.autograd.grad(s, list(p.values()), allow_unused=True))
        return {k: torch.stack([r[j] if r[j] is not None else torch.zeros_like(target[k]) for r in rows])
                for j, k in enumerate(target)}
    if method != "vmap":
        raise ValueError(f"method must be 'vmap' or 'loop', got {method!r}")
    return torch.func.vmap(torch.func.grad(one), in_dims=(None,) + (0,) * len(vals))(target, *vals)


def reference_model_grams(model: torch.nn.Module, grads: dict[str, torch.Tensor], specs) -> torch.Tensor:
    """Explicit Grams ``[M, n, n]`` of the modules ``specs`` from whole-model per-sample gradients ``grads``.

    Each weight's per-sample gradient is put in linear-map orientation ``[n, d_out, d_in]`` by its layer type
    (Hugging Face ``Conv1D`` stores the transpose; a convolution weight is flattened to ``[O, C·kh·kw]``), then
    each slice's rows, columns or all entries (+ bias entries) are concatenated per module and ``J Jᵀ`` is formed.
    """
    owners = dict(model.named_modules())
    grams = []
    for spec in specs:
        parts = []
        for sl in spec.slices:
            g = grads[sl.weight]
            n = g.shape[0]
            owner_name, attr = sl.weight.rsplit(".", 1) if "." in sl.weight else ("", sl.weight)
            owner = owners[owner_name]
            parent = owners.get(owner_name.rsplit(".", 1)[0] if "." in owner_name else "") if owner_name else None
            layer_type = layer_type_of(owner, attr, parent)
            if layer_type is not None:
                g = layer_type.grad_as_linear_map(owner, attr, g)
            else:
                g = g.reshape(n, g.shape[1], -1)
            if sl.axis == "all":
                parts.append(g.reshape(n, -1))
                if sl.bias is not None:
                    parts.append(grads[sl.bias].reshape(n, -1))
            for start, size in sl.ranges:
                if sl.axis == "rows":
                    parts.append(g[:, start:start + size].reshape(n, -1))
                    if sl.bias is not None:
                        parts.append(grads[sl.bias][:, start:start + size])
                else:
                    parts.append(g[:, :, start:start + size].reshape(n, -1))
        j = torch.cat(parts, 1)
        grams.append(j @ j.T)
    return torch.stack(grams)
