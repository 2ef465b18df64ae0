"""MAT modules of a model: named sets of parameter slices, found by a registry of layouts.

A :class:`ModuleSpec` is a MAT module: a name and the parameter slices it owns. A :class:`ParamSlice` is rows,
columns or all of one weight, optionally with the matching bias entries. Slices are always stated in the
*linear-map orientation* ``[d_out, d_in]`` of the weight, whatever its storage: rows are output features, columns
input features. (GPT-2's ``Conv1D`` stores ``[d_in, d_out]``; a ``Conv2d`` weight ``[O, C, kh, kw]`` is the linear
map ``[O, C·kh·kw]`` on unfolded patches.)

:func:`discover_modules` walks ``model.named_modules()`` and asks each registered layout, in registration order,
whether it recognises the module. Layouts are registered with :func:`register_layout`; the built-in ones:

==================  =========================================================================================
layout              recognises
==================  =========================================================================================
``moe_experts``     a child list/dict ``experts`` of sub-networks: one module per expert (all its linears)
``mha``             ``torch.nn.MultiheadAttention`` (fused ``in_proj_weight`` or separate q/k/v weights)
``separate_qkv``    three linears ``query/key/value``, ``q_proj/k_proj/v_proj``, ``q_lin/k_lin/v_lin`` (Hugging
                    Face BERT, RoBERTa, ViT, DistilBERT, Llama, Mistral, Qwen2, Gemma, ...), with grouped-query
                    attention when the module or its config states ``num_key_value_heads``
``fused_qkv``       one linear (or ``Conv1D``) ``qkv``/``qkv_proj``/``Wqkv``/``in_proj``/``c_attn``/
                    ``query_key_value`` whose layout is known from the class (GPT-2 and its cross-attention,
                    GPT-NeoX, Bloom, Falcon without multi-query, Phi-3, timm) or stated by the module's
                    ``qkv_layout`` attribute: ``"qkv"`` ([Q; K; V]) or ``"per_head"`` ([q_h; k_h; v_h] per head)
``ffn``             a pair of linears: ``intermediate.dense``+``output.dense`` (BERT, RoBERTa), ``fc1``/``fc2``
                    (ViT), ``c_fc``/``c_proj`` (GPT-2), ``linear1``/``linear2`` (``nn.TransformerEncoderLayer``),
                    ``ffn_in``/``ffn_out``, ``w1``/``w2`` (+``w3``), ``up_proj``/``down_proj`` (+``gate_proj``),
                    ``wi``/``wo``, ``lin1``/``lin2``
``conv2d``          every ``nn.Conv2d``: one module (weight + bias)
==================  =========================================================================================

Attention layouts give one module per head: its Q, K and V rows and their bias entries. Under grouped-query
attention (``heads`` query heads sharing ``kv`` key/value heads, query head h reading key/value head
``h // (heads / kv)`` as Hugging Face's ``repeat_kv`` does) the module is the *group* ``<attn>.group<g>`` (kind
``head_group``): its K and V rows and the Q rows of the query heads that read them, since a K/V row cannot be
frozen for one of its query heads and trained for another. The head's columns of the output projection are, by
``out_proj=``: ``"separate"`` (default) their own module ``<attn>.head<h>.out`` (one per *query* head),
``"merge"`` part of the head's (group's) module, ``"none"`` not a module (always trained).

Head counts, key/value-head counts and fused layouts come from the module's attributes (``num_heads``-like,
``num_key_value_heads``-like, ``head_dim``, ``qkv_layout``), its ``config`` or its class, never from shape
divisibility alone: when they do not say, or the widths disagree with them, the weights are left unclaimed and
:attr:`Discovery.unclaimed` says why.

Parameters claimed by no layout are *reported*, never silently dropped: :attr:`Discovery.unclaimed` maps each to
the reason (embeddings and norms are "always trained"; a linear no layout recognised is "unrecognised layout").
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn as nn

__all__ = [
    "ParamSlice",
    "ModuleSpec",
    "Discovery",
    "discover_modules",
    "register_layout",
    "layouts",
    "validate_specs",
]

Range = tuple[int, int]


@dataclass(frozen=True)
class ParamSlice:
    """Rows, columns or all of one weight (linear-map orientation ``[d_out, d_in]``), with optional bias entries.

    Attributes:
        weight: the weight parameter's name in ``model.named_parameters()``.
        axis: ``"rows"`` (output features), ``"cols"`` (input features) or ``"all"``.
        ranges: ``(start, size)`` ranges along ``axis`` (empty for ``"all"``).
        bias: name of the bias parameter whose entries for these rows belong to the module (``"rows"``/``"all"``).
    """

    weight: str
    axis: str = "all"
    ranges: tuple[Range, ...] = ()
    bias: str | None = None


@dataclass(frozen=True)
class ModuleSpec:
    """One MAT module: a name, what it is, and the parameter slices it owns (their Grams add)."""

    name: str
    slices: tuple[ParamSlice, ...]
    kind: str = "custom"

    @staticmethod
    def whole(name: str, weight: str, bias: str | None = None, kind: str = "custom") -> "ModuleSpec":
        """A module that owns a whole weight (and its bias)."""
        return ModuleSpec(name, (ParamSlice(weight, "all", (), bias),), kind)

    def param_names(self) -> list[str]:
        out = []
        for s in self.slices:
            out.append(s.weight)
            if s.bias is not None:
                out.append(s.bias)
        return out


@dataclass
class Discovery:
    """Result of :func:`discover_modules`: the module specs, and every parameter no module claimed, with why."""

    specs: list[ModuleSpec]
    unclaimed: dict[str, str] = field(default_factory=dict)

    def names(self) -> list[str]:
        return [s.name for s in self.specs]


# ----------------------------------------------------------------------------------------------------------------
# linear-map view of a weight
# ----------------------------------------------------------------------------------------------------------------
def _is_conv1d(mod: nn.Module) -> bool:
    # Hugging Face's transposed linear (GPT-2): weight [nx, nf], y = x @ W + b. Recognised by name and shape so
    # that transformers stays an optional dependency.
    # mat_kernels' own SparseUpdateConv1D (the sparse-update twin MAT swaps in) is one too.
    return (type(mod).__name__ in ("Conv1D", "SparseUpdateConv1D") and hasattr(mod, "nf")
            and getattr(mod, "weight", None) is not None)


def linear_shape(owner: nn.Module, attr: str, param: torch.Tensor) -> tuple[int, int]:
    """``(d_out, d_in)`` of a weight in linear-map orientation."""
    if _is_conv1d(owner) and attr == "weight":
        return param.shape[1], param.shape[0]
    if param.dim() == 2:
        return param.shape[0], param.shape[1]
    if param.dim() > 2:  # conv: [O, C/groups, k...] -> O x (C/groups·k...)
        return param.shape[0], param[0].numel()
    raise ValueError(f"a weight must have at least 2 dimensions, got shape {tuple(param.shape)}")


def _pname(prefix: str, mod: nn.Module, child: str, attr: str = "weight") -> str | None:
    sub = mod
    for part in child.split("."):
        sub = getattr(sub, part, None)
        if sub is None:
            return None
    if getattr(sub, attr, None) is None:
        return None
    return f"{prefix}.{child}.{attr}" if prefix else f"{child}.{attr}"


def _get(mod: nn.Module, path: str):
    for part in path.split("."):
        mod = getattr(mod, part, None)
        if mod is None:
            return None
    return mod


def _is_linear_like(mod) -> bool:
    return isinstance(mod, nn.Linear) or _is_conv1d(mod)


def _whole(prefix: str, mod: nn.Module, child: str) -> ParamSlice:
    return ParamSlice(_pname(prefix, mod, child), "all", (), _pname(prefix, mod, child, "bias"))


# ----------------------------------------------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------------------------------------------
LayoutFn = Callable[[str, nn.Module, nn.Module, dict], "list[ModuleSpec] | None"]
_LAYOUTS: list[tuple[str, LayoutFn]] = []


def register_layout(name: str) -> Callable[[LayoutFn], LayoutFn]:
    """Decorator registering a layout ``fn(prefix, module, model, options) -> list[ModuleSpec] | None``.

    ``prefix`` is the module's name in ``model.named_modules()``; return None when the module is not of this layout.
    Layouts are tried in registration order; a parameter already claimed by an earlier match is never claimed
    again, so put more specific layouts first.
    """

    def deco(fn: LayoutFn) -> LayoutFn:
        if any(n == name for n, _ in _LAYOUTS):
            raise ValueError(f"a layout named {name!r} is already registered")
        _LAYOUTS.append((name, fn))
        return fn

    return deco


def layouts() -> list[str]:
    """Names of the registered layouts, in the order they are tried."""
    return [n for n, _ in _LAYOUTS]


_HEAD_ATTRS = ("num_attention_heads", "num_heads", "n_heads", "n_head", "heads")
_KV_HEAD_ATTRS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "n_kv_head", "kv_heads")
_HEAD_DIM_ATTRS = ("head_dim", "attention_head_size", "head_size")
_OUT_PROJ = ("o_proj", "out_proj", "out_lin", "proj", "c_proj", "attn_out", "out", "dense")


def _num_heads(mod: nn.Module) -> int | None:
    for a in _HEAD_ATTRS:
        v = getattr(mod, a, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def _head_specs(prefix: str, mod: nn.Module, heads: int, head_dim: int, qkv: list[tuple[str, int]],
                out_child: str | None, out_owner_prefix: str, out_owner: nn.Module | None,
                opts: dict, out_head_dim: int | None = None) -> list[ModuleSpec]:
    """One spec per head. ``qkv``: ``(child, row_offset)`` of each projection's rows (one child with offsets 0, E,
    2E for a fused weight; three children with offset 0 for separate ones); a head owns ``head_dim`` rows of each
    and ``out_head_dim`` (default ``head_dim``) columns of the output projection."""
    mode = opts.get("out_proj", "separate")
    out_hd = out_head_dim or head_dim
    specs = []
    for h in range(heads):
        slices = []
        for child, off in qkv:
            slices.append(ParamSlice(_pname(prefix, mod, child), "rows", ((off + h * head_dim, head_dim),),
                                     _pname(prefix, mod, child, "bias")))
        out_slice = None
        if out_child is not None and mode != "none":
            out_slice = ParamSlice(_pname(out_owner_prefix, out_owner, out_child), "cols", ((h * out_hd, out_hd),))
            out_bias = _pname(out_owner_prefix, out_owner, out_child, "bias")
            if out_bias is not None:
                opts.setdefault("shared", {})[out_bias] = "always trained (output-projection bias, shared by all heads)"
        elif out_child is not None:
            for attr in ("weight", "bias"):
                pn = _pname(out_owner_prefix, out_owner, out_child, attr)
                if pn is not None:
                    opts.setdefault("shared", {})[pn] = "always trained (attention output projection, out_proj='none')"
        if mode == "merge" and out_slice is not None:
            slices.append(out_slice)
        base = f"{prefix}.head{h}" if prefix else f"head{h}"
        specs.append(ModuleSpec(base, tuple(slices), "head"))
        if mode == "separate" and out_slice is not None:
            specs.append(ModuleSpec(base + ".out", (out_slice,), "head_out"))
    return specs


def _find_out_proj(prefix: str, mod: nn.Module, model: nn.Module, width: int):
    """The attention output projection: a child of the attention module, or ``output.dense`` of its parent
    (BERT/RoBERTa keep it in ``BertAttention.output``). Returns ``(owner_prefix, owner, child)`` or Nones."""
    for c in _OUT_PROJ:
        sub = getattr(mod, c, None)
        if _is_linear_like(sub) and linear_shape(sub, "weight", sub.weight)[1] == width:
            return prefix, mod, c
    if prefix:
        parent_prefix = prefix.rsplit(".", 1)[0] if "." in prefix else ""
        parent = model.get_submodule(parent_prefix) if parent_prefix else model
        sub = _get(parent, "output.dense")
        if _is_linear_like(sub) and linear_shape(sub, "weight", sub.weight)[1] == width:
            return parent_prefix, parent, "output.dense"
    return None, None, None


@register_layout("moe_experts")
def _moe_experts(prefix, mod, model, opts):
    experts = getattr(mod, "experts", None)
    if not isinstance(experts, (nn.ModuleList, nn.ModuleDict)) or len(experts) == 0:
        return None
    items = experts.items() if isinstance(experts, nn.ModuleDict) else enumerate(experts)
    specs = []
    for key, expert in items:
        slices = []
        for sub_name, sub in expert.named_modules():
            if _is_linear_like(sub):
                child = f"experts.{key}" + (f".{sub_name}" if sub_name else "")
                slices.append(_whole(prefix, mod, child))
        if not slices:
            return None
        specs.append(ModuleSpec(f"{prefix}.experts.{key}" if prefix else f"experts.{key}", tuple(slices), "expert"))
    return specs


@register_layout("mha")
def _mha(prefix, mod, model, opts):
    if not isinstance(mod, nn.MultiheadAttention):
        return None
    E, H = mod.embed_dim, mod.num_heads
    hd = E // H
    if mod.in_proj_weight is not None:
        qkv = [("", 0), ("", E), ("", 2 * E)]
        specs = []
        for h in range(H):
            slices = [ParamSlice(f"{prefix}.in_proj_weight" if prefix else "in_proj_weight", "rows",
                                 tuple((off + h * hd, hd) for _, off in qkv),
                                 (f"{prefix}.in_proj_bias" if prefix else "in_proj_bias")
                                 if mod.in_proj_bias is not None else None)]
            specs.append(ModuleSpec(f"{prefix}.head{h}" if prefix else f"head{h}", tuple(slices), "head"))
    else:  # separate q/k/v weights (kdim/vdim differ from embed_dim). The packed in_proj_bias is left unclaimed
        # (reported): its entries sit at other offsets than the rows of q/k/v_proj_weight.
        specs = []
        for h in range(H):
            slices = []
            for p, attr in enumerate(("q_proj_weight", "k_proj_weight", "v_proj_weight")):
                slices.append(ParamSlice(f"{prefix}.{attr}" if prefix else attr, "rows", ((h * hd, hd),), None))
            specs.append(ModuleSpec(f"{prefix}.head{h}" if prefix else f"head{h}", tuple(slices), "head"))
    mode = opts.get("out_proj", "separate")
    if mode == "none":
        for attr in ("weight", "bias"):
            if getattr(mod.out_proj, attr) is not None:
                opts.setdefault("shared", {})[f"{prefix}.out_proj.{attr}" if prefix else f"out_proj.{attr}"] = (
                    "always trained (attention output projection, out_proj='none')")
    if mode != "none":
        out_w = f"{prefix}.out_proj.weight" if prefix else "out_proj.weight"
        if mod.out_proj.bias is not None:
            opts.setdefault("shared", {})[out_w[:-len("weight")] + "bias"] = (
                "always trained (output-projection bias, shared by all heads)")
        merged = []
        for h, spec in enumerate(specs):
            out_slice = ParamSlice(out_w, "cols", ((h * hd, hd),))
            if mode == "merge":
                merged.append(dataclasses.replace(spec, slices=spec.slices + (out_slice,)))
            else:
                merged += [spec, ModuleSpec(spec.name + ".out", (out_slice,), "head_out")]
        specs = merged
    return specs


def _refuse(opts: dict, prefix: str, mod: nn.Module, children, reason: str) -> None:
    """Record why a layout left these children's parameters unclaimed (shown in :attr:`Discovery.unclaimed`)."""
    for child in children:
        for attr in ("weight", "bias"):
            pn = _pname(prefix, mod, child, attr)
            if pn is not None:
                opts.setdefault("refused", {}).setdefault(pn, reason)


def _pos_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _count(mod: nn.Module, attrs: tuple[str, ...], config_attrs: tuple[str, ...]) -> tuple[int | None, str | None]:
    """An explicit count: the first positive int among the module's ``attrs``, else its ``config``'s
    ``config_attrs`` (Hugging Face attention modules keep only ``config``). Returns ``(value, where)``."""
    for a in attrs:
        v = getattr(mod, a, None)
        if _pos_int(v):
            return v, a
    cfg = getattr(mod, "config", None)
    for a in config_attrs if cfg is not None else ():
        v = getattr(cfg, a, None)
        if _pos_int(v):
            return v, f"config.{a}"
    return None, None


def _attention_geometry(mod: nn.Module, q_width: int) -> tuple[int, int, int] | str:
    """``(heads, kv_heads, head_dim)`` of an attention module from its attributes or config, or the reason why not.

    Nothing is inferred from shapes alone: the head count must be stated (``num_heads``-like attribute or
    ``config.num_attention_heads``); the KV-head count is ``num_key_value_heads``-like (module or config) and
    defaults to the head count (no grouping); ``head_dim`` is an attribute or ``q_width / heads``.
    """
    heads, _ = _count(mod, _HEAD_ATTRS, _HEAD_ATTRS)
    if heads is None:
        return (f"no head count: {type(mod).__name__} has none of the attributes {', '.join(_HEAD_ATTRS)} "
                "(nor a config with one)")
    kv, _ = _count(mod, _KV_HEAD_ATTRS, _KV_HEAD_ATTRS)
    kv = kv or heads
    hd, _ = _count(mod, _HEAD_DIM_ATTRS, ("head_dim",))
    if hd is None:
        if q_width % heads:
            return f"the query width {q_width} is not a multiple of {heads} heads"
        hd = q_width // heads
    if heads * hd != q_width:
        return f"{heads} heads x head_dim {hd} = {heads * hd} != the query width {q_width}"
    if heads % kv:
        return f"{heads} query heads do not split into {kv} key/value heads"
    return heads, kv, hd


def _gqa_specs(prefix: str, mod: nn.Module, model: nn.Module, heads: int, kv: int, hd: int,
               q: tuple[str, int], k: tuple[str, int], v: tuple[str, int], opts: dict) -> list[ModuleSpec]:
    """One module per key/value head (``<attn>.head<h>`` when every query head has its own, ``<attn>.group<g>``
    under grouped-query attention: its K and V rows and the Q rows of the ``heads / kv`` query heads that use it,
    query head h using key/value head ``h // (heads / kv)`` as in ``repeat_kv``), plus each query head's columns
    of the output projection (``out_proj`` option). ``q``/``k``/``v``: ``(child, row offset)``."""
    r = heads // kv
    if r == 1:
        owner_prefix, owner, child = _find_out_proj(prefix, mod, model, heads * hd)
        return _head_specs(prefix, mod, heads, hd, [q, k, v], child, owner_prefix, owner, opts)
    mode = opts.get("out_proj", "separate")
    owner_prefix, owner, out_child = _find_out_proj(prefix, mod, model, heads * hd)
    specs = []
    for g in range(kv):
        slices = [ParamSlice(_pname(prefix, mod, q[0]), "rows", ((q[1] + g * r * hd, r * hd),),
                             _pname(prefix, mod, q[0], "bias"))]
        for child, off in (k, v):
            slices.append(ParamSlice(_pname(prefix, mod, child), "rows", ((off + g * hd, hd),),
                                     _pname(prefix, mod, child, "bias")))
        base = f"{prefix}.group{g}" if prefix else f"group{g}"
        outs = []
        if out_child is not None and mode != "none":
            out_w = _pname(owner_prefix, owner, out_child)
            if mode == "merge":
                slices.append(ParamSlice(out_w, "cols", ((g * r * hd, r * hd),)))
            else:
                for h in range(g * r, (g + 1) * r):
                    head = f"{prefix}.head{h}" if prefix else f"head{h}"
                    outs.append(ModuleSpec(head + ".out", (ParamSlice(out_w, "cols", ((h * hd, hd),)),), "head_out"))
        specs.append(ModuleSpec(base, tuple(slices), "head_group"))
        specs += outs
    if out_child is not None:
        for attr in ("weight", "bias") if mode == "none" else ("bias",):
            pn = _pname(owner_prefix, owner, out_child, attr)
            if pn is not None:
                opts.setdefault("shared", {})[pn] = (
                    "always trained (attention output projection, out_proj='none')" if mode == "none"
                    else "always trained (output-projection bias, shared by all heads)")
    return specs


@register_layout("separate_qkv")
def _separate_qkv(prefix, mod, model, opts):
    for names in (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"), ("q_lin", "k_lin", "v_lin")):
        subs = [getattr(mod, n, None) for n in names]
        if all(_is_linear_like(s) for s in subs):
            break
    else:
        return None
    widths = [linear_shape(sub, "weight", sub.weight)[0] for sub in subs]
    geo = _attention_geometry(mod, widths[0])
    if isinstance(geo, str):
        _refuse(opts, prefix, mod, names, f"attention not recognised: {geo}; add explicit ModuleSpecs")
        return None
    heads, kv, hd = geo
    for name, w in zip(names[1:], widths[1:]):
        if w != kv * hd:
            _refuse(opts, prefix, mod, names,
                    f"attention not recognised: {name} has {w} rows, not {kv} key/value heads x head_dim {hd}"
                    + (" (grouped-query attention? state num_key_value_heads on the module or its config)"
                       if kv == heads else "") + "; add explicit ModuleSpecs")
            return None
    return _gqa_specs(prefix, mod, model, heads, kv, hd, (names[0], 0), (names[1], 0), (names[2], 0), opts)


_FUSED_NAMES = ("qkv", "qkv_proj", "Wqkv", "in_proj", "c_attn", "query_key_value")
QKV_LAYOUTS = ("qkv", "per_head")


def _fused_layout(mod: nn.Module, child: str) -> str:
    """How a fused QKV weight is laid out, from the module's class or its explicit ``qkv_layout`` attribute:
    ``"qkv"`` ([Q; K; V] blocks, then heads inside each; with key/value heads ``kv``: Q is heads·hd rows, K and V
    kv·hd each), ``"per_head"`` ([q_h; k_h; v_h] per head), or a reason (str starting with "unknown") when
    neither says. Never from the shape."""
    explicit = getattr(mod, "qkv_layout", None)
    if explicit is not None:
        if explicit not in QKV_LAYOUTS:
            raise ValueError(f"{type(mod).__name__}.qkv_layout must be one of {QKV_LAYOUTS}, got {explicit!r}")
        return explicit
    cls = type(mod).__name__
    if cls in ("GPTNeoXAttention", "BloomAttention"):  # view(..., heads, 3 * head_dim)
        return "per_head"
    if cls == "FalconAttention":
        if getattr(mod, "multi_query", True) or getattr(mod, "new_decoder_architecture", True):
            return ("unknown: Falcon's multi-query / new-decoder fused layout is not supported; "
                    "add explicit ModuleSpecs")
        return "per_head"  # view(..., heads, 3, head_dim)
    if cls in ("GPT2Attention", "DecisionTransformerGPT2Attention", "ImageGPTAttention") and child == "c_attn":
        return "qkv"  # split(embed_dim) into Q, K, V
    if cls == "Phi3Attention" and child == "qkv_proj":
        return "qkv"  # Q (heads·hd), K and V (kv·hd each)
    if type(mod).__module__.startswith("timm.") and child == "qkv":
        return "qkv"  # reshape(B, N, 3, heads, hd)
    return (f"unknown: the layout of the fused weight {child} of {cls} is not known from its class; set "
            f"{cls}.qkv_layout = 'qkv' ([Q; K; V], as GPT-2) or 'per_head' ([q_h; k_h; v_h], as GPT-NeoX), or "
            "add explicit ModuleSpecs")


@register_layout("fused_qkv")
def _fused_qkv(prefix, mod, model, opts):
    for name in _FUSED_NAMES:
        sub = getattr(mod, name, None)
        if _is_linear_like(sub):
            break
    else:
        return None
    d_out = linear_shape(sub, "weight", sub.weight)[0]
    if getattr(mod, "is_cross_attention", False) and name == "c_attn":
        # GPT-2 cross-attention: Q from q_attn (encoder side: the decoder's states), K and V from c_attn = [K; V]
        q_sub = getattr(mod, "q_attn", None)
        if not _is_linear_like(q_sub):
            _refuse(opts, prefix, mod, [name], "cross-attention without a q_attn projection; add explicit ModuleSpecs")
            return None
        geo = _attention_geometry(mod, linear_shape(q_sub, "weight", q_sub.weight)[0])
        if isinstance(geo, str) or d_out != 2 * geo[1] * geo[2]:
            _refuse(opts, prefix, mod, ["q_attn", name], "cross-attention not recognised: "
                    + (geo if isinstance(geo, str) else f"c_attn has {d_out} rows, not [K; V]") + "; add ModuleSpecs")
            return None
        heads, kv, hd = geo
        return _gqa_specs(prefix, mod, model, heads, kv, hd, ("q_attn", 0), (name, 0), (name, kv * hd), opts)
    layout = _fused_layout(mod, name)
    if layout.startswith("unknown"):
        _refuse(opts, prefix, mod, [name], f"fused QKV layout {layout}")
        return None
    heads, _ = _count(mod, _HEAD_ATTRS, _HEAD_ATTRS)
    kv, _ = _count(mod, _KV_HEAD_ATTRS, _KV_HEAD_ATTRS)
    hd, _ = _count(mod, _HEAD_DIM_ATTRS, ("head_dim",))
    kv = kv or heads
    problem = None
    if heads is None:
        problem = f"no head count: {type(mod).__name__} has none of {', '.join(_HEAD_ATTRS)} (nor a config with one)"
    elif heads % kv:
        problem = f"{heads} query heads do not split into {kv} key/value heads"
    elif layout == "per_head" and kv != heads:
        problem = "key/value groups are not supported in a per-head layout"
    else:
        rows_per_hd = heads + 2 * kv
        if hd is None and d_out % rows_per_hd == 0:
            hd = d_out // rows_per_hd  # the layout and the counts are stated; only head_dim follows from them
        if hd is None or d_out != rows_per_hd * hd:
            problem = (f"{name} has {d_out} rows, not ({heads} + 2 x {kv}) heads x head_dim"
                       + (f" {hd}" if hd else ""))
    if problem is not None:
        _refuse(opts, prefix, mod, [name], f"fused QKV ({layout}) not recognised: {problem}; add explicit ModuleSpecs")
        return None
    if layout == "per_head":  # head h: rows [3·hd·h, 3·hd·(h+1)) hold its q, k and v
        owner_prefix, owner, child = _find_out_proj(prefix, mod, model, heads * hd)
        return _head_specs(prefix, mod, heads, 3 * hd, [(name, 0)], child, owner_prefix, owner, opts,
                           out_head_dim=hd)
    return _gqa_specs(prefix, mod, model, heads, kv, hd, (name, 0), (name, heads * hd), (name, (heads + kv) * hd),
                      opts)


_FFN_PAIRS = (
    ("intermediate.dense", "output.dense"), ("fc1", "fc2"), ("c_fc", "c_proj"), ("linear1", "linear2"),
    ("ffn_in", "ffn_out"), ("w1", "w2", "w3"), ("up_proj", "down_proj", "gate_proj"), ("wi", "wo"), ("lin1", "lin2"),
    ("dense_h_to_4h", "dense_4h_to_h"), ("gate_up_proj", "down_proj"),
)


@register_layout("ffn")
def _ffn(prefix, mod, model, opts):
    for names in _FFN_PAIRS:
        first = [_get(mod, n) for n in names[:2]]
        if all(_is_linear_like(s) for s in first):
            children = [n for n in names if _is_linear_like(_get(mod, n))]
            slices = tuple(_whole(prefix, mod, c) for c in children)
            return [ModuleSpec(f"{prefix}.ffn" if prefix else "ffn", slices, "ffn")]
    return None


@register_layout("conv2d")
def _conv2d(prefix, mod, model, opts):
    if not isinstance(mod, nn.Conv2d):
        return None
    return [ModuleSpec(prefix or "conv", (_whole("", model, prefix),) if prefix else
                       (ParamSlice("weight", "all", (), "bias" if mod.bias is not None else None),), "conv")]


# ----------------------------------------------------------------------------------------------------------------
# discovery
# ----------------------------------------------------------------------------------------------------------------
_ALWAYS_TRAINED = (nn.Embedding, nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm, nn.RMSNorm)


def discover_modules(
    model: nn.Module,
    *,
    out_proj: str = "separate",
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
) -> Discovery:
    """Find the MAT modules of ``model`` with the registered layouts.

    Args:
        model: any ``nn.Module``.
        out_proj: what becomes of each head's columns of the attention output projection: ``"separate"`` (a module
            ``<attn>.head<h>.out``), ``"merge"`` (part of the head's module) or ``"none"`` (not a module).
        include: regular expressions; keep only modules whose name matches one (``re.search``).
        exclude: regular expressions; drop modules whose name matches one.

    Returns:
        :class:`Discovery` with the specs (in ``named_modules`` order) and the unclaimed parameters.

    Raises:
        ValueError: unknown ``out_proj``; ``include``/``exclude`` patterns that match no module.
    """
    if out_proj not in ("separate", "merge", "none"):
        raise ValueError(f"out_proj must be 'separate', 'merge' or 'none', got {out_proj!r}")
    opts = {"out_proj": out_proj}
    claimed: set[str] = set()
    specs: list[ModuleSpec] = []
    for prefix, mod in model.named_modules():
        for _, fn in _LAYOUTS:
            found = fn(prefix, mod, model, opts)
            if not found:
                continue
            params = {p for s in found for p in s.param_names()}
            if params & claimed:
                continue  # a more specific layout owns (some of) these parameters already
            specs += found
            claimed |= params  # other layouts may still match other children of the same module
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"discovered module names are not unique: {dup}")
    for arg, pats in (("include", include), ("exclude", exclude)):
        for pat in pats or ():
            if not any(re.search(pat, n) for n in names):
                raise ValueError(f"{arg} pattern {pat!r} matches none of the {len(names)} discovered modules")
    if include is not None:
        specs = [s for s in specs if any(re.search(p, s.name) for p in include)]
    if exclude is not None:
        specs = [s for s in specs if not any(re.search(p, s.name) for p in exclude)]
    used = {p for s in specs for p in s.param_names()}
    unclaimed = {}
    owners = dict(model.named_modules())
    for pname, p in model.named_parameters():
        if pname in used:
            continue
        if pname in claimed:
            unclaimed[pname] = "excluded by include/exclude"
            continue
        if pname in opts.get("shared", {}):
            unclaimed[pname] = opts["shared"][pname]
            continue
        if pname in opts.get("refused", {}):
            unclaimed[pname] = opts["refused"][pname]
            continue
        owner = owners.get(pname.rsplit(".", 1)[0] if "." in pname else "", model)
        if isinstance(owner, _ALWAYS_TRAINED) or type(owner).__name__.endswith(("RMSNorm", "LayerNorm")):
            unclaimed[pname] = f"always trained ({type(owner).__name__})"
        elif isinstance(owner, (nn.Linear, nn.Conv2d)) or _is_conv1d(owner):
            unclaimed[pname] = f"unrecognised layout ({type(owner).__name__}); add an explicit ModuleSpec"
        else:
            unclaimed[pname] = f"unrecognised parameter of {type(owner).__name__}; add an explicit ModuleSpec"
    return Discovery(specs, unclaimed)


def validate_specs(model: nn.Module, specs: list[ModuleSpec]) -> None:
    """Check every spec against the model: parameters exist, ranges fit the linear-map shape, biases match,
    names are unique, no parameter entry is claimed twice inside one module. Raises ``ValueError``/``TypeError``.
    """
    if not isinstance(specs, (list, tuple)) or not all(isinstance(s, ModuleSpec) for s in specs):
        raise TypeError("specs must be a list of ModuleSpec")
    if not specs:
        raise ValueError("specs is empty: no module to measure")
    params = dict(model.named_parameters())
    owners = dict(model.named_modules())
    seen = set()
    for s in specs:
        if s.name in seen:
            raise ValueError(f"module name {s.name!r} is used twice")
        seen.add(s.name)
        if not s.slices:
            raise ValueError(f"module {s.name!r} has no parameter slice")
        claimed = []
        for sl in s.slices:
            if sl.weight not in params:
                raise ValueError(f"module {s.name!r}: no parameter named {sl.weight!r} in the model")
            owner_name, attr = sl.weight.rsplit(".", 1) if "." in sl.weight else ("", sl.weight)
            d_out, d_in = linear_shape(owners[owner_name], attr, params[sl.weight])
            if sl.axis not in ("rows", "cols", "all"):
                raise ValueError(f"module {s.name!r}: axis must be 'rows', 'cols' or 'all', got {sl.axis!r}")
            if sl.axis == "all" and sl.ranges:
                raise ValueError(f"module {s.name!r}: axis 'all' takes no ranges")
            if sl.axis != "all" and not sl.ranges:
                raise ValueError(f"module {s.name!r}: axis {sl.axis!r} needs at least one (start, size) range")
            dim = d_out if sl.axis == "rows" else d_in
            for start, size in sl.ranges:
                if size <= 0 or start < 0 or start + size > dim:
                    raise ValueError(f"module {s.name!r}: range [{start}, {start + size}) of {sl.weight} is out of "
                                     f"bounds for {sl.axis} of length {dim}")
            if sl.bias is not None:
                if sl.axis == "cols":
                    raise ValueError(f"module {s.name!r}: a column slice cannot own bias entries")
                if sl.bias not in params:
                    raise ValueError(f"module {s.name!r}: no parameter named {sl.bias!r} in the model")
                if params[sl.bias].shape != (d_out,):
                    raise ValueError(f"module {s.name!r}: bias {sl.bias} has shape {tuple(params[sl.bias].shape)}, "
                                     f"expected ({d_out},) for weight {sl.weight}")
            ranges = sl.ranges or ((0, d_out if sl.axis != "cols" else d_in),)
            claimed += [(sl.weight, sl.axis, a, b) for a, b in ranges]
        for i, (w, ax, a, b) in enumerate(claimed):
            for w2, ax2, a2, b2 in claimed[i + 1:]:
                if w != w2:
                    continue
                if ax != ax2 or ax == "all" or (a < a2 + b2 and a2 < a + b):
                    # rows and columns of one weight always intersect; 'all' intersects everything
                    raise ValueError(f"module {s.name!r}: slices of {w} overlap (entries would be counted twice)")
