"""Layouts ``separate_qkv`` and ``fused_qkv``: attention with Q/K/V projections, separate or fused into one weight,
with grouped-query attention, and each query head's columns of the output projection.

Head counts, key/value-head counts and fused layouts come from the module's attributes (``num_heads``-like,
``num_key_value_heads``-like, ``head_dim``, ``qkv_layout``), its ``config`` or its class, never from shape
divisibility alone; otherwise the weights are left unclaimed with the reason (see :mod:`mat_kernels.measure.discovery`).
"""
from __future__ import annotations

import torch.nn as nn

from mat_kernels.layers import linear_shape
from mat_kernels.measure.layout_registry import register_layout
from mat_kernels.measure.specs import ModuleSpec, ParamSlice, get_path, is_linear_like, param_name

HEAD_ATTRS = ("num_attention_heads", "num_heads", "n_heads", "n_head", "heads")
KV_HEAD_ATTRS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "n_kv_head", "kv_heads")
_HEAD_DIM_ATTRS = ("head_dim", "attention_head_size", "head_size")
_OUT_PROJ = ("o_proj", "out_proj", "out_lin", "proj", "c_proj", "attn_out", "out", "dense")


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
            slices.append(ParamSlice(param_name(prefix, mod, child), "rows", ((off + h * head_dim, head_dim),),
                                     param_name(prefix, mod, child, "bias")))
        out_slice = None
        if out_child is not None and mode != "none":
            out_slice = ParamSlice(param_name(out_owner_prefix, out_owner, out_child), "cols", ((h * out_hd, out_hd),))
            out_bias = param_name(out_owner_prefix, out_owner, out_child, "bias")
            if out_bias is not None:
                opts.setdefault("shared", {})[out_bias] = "always trained (output-projection bias, shared by all heads)"
        elif out_child is not None:
            for attr in ("weight", "bias"):
                pn = param_name(out_owner_prefix, out_owner, out_child, attr)
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
        if is_linear_like(sub) and linear_shape(sub, "weight", sub.weight)[1] == width:
            return prefix, mod, c
    if prefix:
        parent_prefix = prefix.rsplit(".", 1)[0] if "." in prefix else ""
        parent = model.get_submodule(parent_prefix) if parent_prefix else model
        sub = get_path(parent, "output.dense")
        if is_linear_like(sub) and linear_shape(sub, "weight", sub.weight)[1] == width:
            return parent_prefix, parent, "output.dense"
    return None, None, None


def _refuse(opts: dict, prefix: str, mod: nn.Module, children, reason: str) -> None:
    """Record why a layout left these children's parameters unclaimed (shown in :attr:`Discovery.unclaimed`)."""
    for child in children:
        for attr in ("weight", "bias"):
            pn = param_name(prefix, mod, child, attr)
            if pn is not None:
                opts.setdefault("refused", {}).setdefault(pn, reason)


def _pos_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def head_count(mod: nn.Module, attrs: tuple[str, ...], config_attrs: tuple[str, ...]) -> tuple[int | None, str | None]:
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
    heads, _ = head_count(mod, HEAD_ATTRS, HEAD_ATTRS)
    if heads is None:
        return (f"no head count: {type(mod).__name__} has none of the attributes {', '.join(HEAD_ATTRS)} "
                "(nor a config with one)")
    kv, _ = head_count(mod, KV_HEAD_ATTRS, KV_HEAD_ATTRS)
    kv = kv or heads
    hd, _ = head_count(mod, _HEAD_DIM_ATTRS, ("head_dim",))
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
               q: tuple[str, int], k: tuple[str, int], v: tuple[str, int], opts: dict,
               group_rows=None) -> list[ModuleSpec]:
    """One module per key/value head (``<attn>.head<h>`` when every query head has its own, ``<attn>.group<g>``
    under grouped-query attention: its K and V rows and the Q rows of the ``heads / kv`` query heads that use it,
    query head h using key/value head ``h // (heads / kv)`` as in ``repeat_kv``), plus each query head's columns
    of the output projection (``out_proj`` option). ``q``/``k``/``v``: ``(child, row offset)`` of [Q; K; V]-style
    blocks; ``group_rows(g)``, when given, returns group g's row slices instead (interleaved layouts)."""
    r = heads // kv
    if r == 1 and group_rows is None:
        owner_prefix, owner, child = _find_out_proj(prefix, mod, model, heads * hd)
        return _head_specs(prefix, mod, heads, hd, [q, k, v], child, owner_prefix, owner, opts)
    mode = opts.get("out_proj", "separate")
    owner_prefix, owner, out_child = _find_out_proj(prefix, mod, model, heads * hd)
    specs = []
    for g in range(kv):
        if group_rows is not None:
            slices = list(group_rows(g))
        else:
            slices = [ParamSlice(param_name(prefix, mod, q[0]), "rows", ((q[1] + g * r * hd, r * hd),),
                                 param_name(prefix, mod, q[0], "bias"))]
            for child, off in (k, v):
                slices.append(ParamSlice(param_name(prefix, mod, child), "rows", ((off + g * hd, hd),),
                                         param_name(prefix, mod, child, "bias")))
        base = f"{prefix}.group{g}" if prefix else f"group{g}"
        outs = []
        if out_child is not None and mode != "none":
            out_w = param_name(owner_prefix, owner, out_child)
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
            pn = param_name(owner_prefix, owner, out_child, attr)
            if pn is not None:
                opts.setdefault("shared", {})[pn] = (
                    "always trained (attention output projection, out_proj='none')" if mode == "none"
                    else "always trained (output-projection bias, shared by all heads)")
    return specs


@register_layout("separate_qkv")
def _separate_qkv(prefix, mod, model, opts):
    for names in (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"), ("q_lin", "k_lin", "v_lin")):
        subs = [getattr(mod, n, None) for n in names]
        if all(is_linear_like(s) for s in subs):
            break
    else:
        return None
    if type(mod).__name__.startswith("DiffLlama"):
        # differential attention tiles the value heads (.repeat), so every query head reads every value head:
        # neither a head nor a key/value group is a unit whose rows can be frozen on their own
        _refuse(opts, prefix, mod, names, "attention not recognised: differential attention mixes every value head "
                "into every query head; add explicit ModuleSpecs")
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


_GPT2_CLASSES = ("GPT2Attention", "DecisionTransformerGPT2Attention", "ImageGPTAttention")
_FUSED_NAMES = ("qkv", "qkv_proj", "Wqkv", "in_proj", "c_attn", "query_key_value")
QKV_LAYOUTS = ("qkv", "per_head")


def _fused_layout(mod: nn.Module, child: str) -> str:
    """How a fused QKV weight is laid out, from the module's class or its explicit ``qkv_layout`` attribute:
    ``"qkv"`` ([Q; K; V] blocks, then heads inside each; with key/value heads ``kv``: Q is heads·hd rows, K and V
    kv·hd each), ``"per_head"`` ([q_h; k_h; v_h] per head; with ``kv`` key/value heads [q_g1 .. q_gr; k_g; v_g] per
    group), or a reason (str starting with "unknown") when
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
        if getattr(mod, "new_decoder_architecture", False):
            return "per_head"  # view(..., kv, heads/kv + 2, head_dim): per group, its queries, then k and v
        if getattr(mod, "multi_query", False):
            return "qkv"  # view(..., heads + 2, head_dim): all queries, then the one k and v (num_kv_heads = 1)
        return "per_head"  # view(..., heads, 3, head_dim)
    if cls in _GPT2_CLASSES and child == "c_attn":
        return "qkv"  # split(embed_dim) into Q, K, V
    if cls == "Phi3Attention" and child == "qkv_proj":
        return "qkv"  # Q (heads·hd), K and V (kv·hd each)
    if type(mod).__module__ == "timm.models.vision_transformer" and cls == "Attention" and child == "qkv":
        return "qkv"  # reshape(B, N, 3, heads, hd). Other timm attentions (TinyViT, EfficientFormer, MaxViT
        # head-first) store Q/K/V per head: they must state qkv_layout
    return (f"unknown: the layout of the fused weight {child} of {cls} is not known from its class; set "
            f"{cls}.qkv_layout = 'qkv' ([Q; K; V], as GPT-2) or 'per_head' ([q_h; k_h; v_h], as GPT-NeoX), or "
            "add explicit ModuleSpecs")


@register_layout("fused_qkv")
def _fused_qkv(prefix, mod, model, opts):
    for name in _FUSED_NAMES:
        sub = getattr(mod, name, None)
        if is_linear_like(sub):
            break
    else:
        return None
    d_out = linear_shape(sub, "weight", sub.weight)[0]
    if type(mod).__name__ in _GPT2_CLASSES and getattr(mod, "is_cross_attention", False) and name == "c_attn":
        # GPT-2 cross-attention: Q from q_attn (encoder side: the decoder's states), K and V from c_attn = [K; V]
        q_sub = getattr(mod, "q_attn", None)
        if not is_linear_like(q_sub):
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
    heads, _ = head_count(mod, HEAD_ATTRS, HEAD_ATTRS)
    kv, _ = head_count(mod, KV_HEAD_ATTRS, KV_HEAD_ATTRS)
    hd, _ = head_count(mod, _HEAD_DIM_ATTRS, ("head_dim",))
    kv = kv or heads
    problem = None
    if heads is None:
        problem = f"no head count: {type(mod).__name__} has none of {', '.join(HEAD_ATTRS)} (nor a config with one)"
    elif heads % kv:
        problem = f"{heads} query heads do not split into {kv} key/value heads"
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
    if layout == "per_head" and kv == heads:  # head h: rows [3·hd·h, 3·hd·(h+1)) hold its q, k and v
        owner_prefix, owner, child = _find_out_proj(prefix, mod, model, heads * hd)
        return _head_specs(prefix, mod, heads, 3 * hd, [(name, 0)], child, owner_prefix, owner, opts,
                           out_head_dim=hd)
    if layout == "per_head":  # group g: rows [(r+2)·hd·g, (r+2)·hd·(g+1)) hold its r queries, its k and its v
        width, w, b = (heads // kv + 2) * hd, param_name(prefix, mod, name), param_name(prefix, mod, name, "bias")
        return _gqa_specs(prefix, mod, model, heads, kv, hd, None, None, None, opts,
                          group_rows=lambda g: (ParamSlice(w, "rows", ((g * width, width),), b),))
    return _gqa_specs(prefix, mod, model, heads, kv, hd, (name, 0), (name, heads * hd), (name, (heads + kv) * hd),
                      opts)
