"""Physical head pruning (the MAT paper's pruning extension, Table 5: drop the lowest-λmax heads, train the rest).

Heads are removed, not masked: the Q/K/V projection(s) are rebuilt with only the kept heads' rows (and bias
entries), the output projection with only their columns, and the attention module's head-count attribute is
lowered. The forward, dX and dW of the pruned heads disappear, which is the point of the experiment (a masked head
would still cost its full forward). Supported: the ``fused_qkv`` and ``separate_qkv`` layouts of
:mod:`mat_kernels.measure.discovery` built from ``nn.Linear`` layers (own models; Hugging Face BERT, RoBERTa, ViT, whose
attention reshapes with ``-1`` heads of a fixed head size; Llama, Mistral, Qwen2, Gemma, whose grouped-query
attention is pruned by whole key/value groups: the group's K/V rows and its query heads). Anything else is refused
with the reason.

Pruning changes the parameter tensors: build the optimizer (and a :class:`mat_kernels.MAT`) after pruning.
"""
from __future__ import annotations

import re
from collections import defaultdict

import torch
import torch.nn as nn

from mat_kernels.measure.discovery import discover_modules
from mat_kernels.measure.layouts.attention import HEAD_ATTRS, KV_HEAD_ATTRS, head_count

__all__ = ["prune_heads", "lowest_heads"]

_HEAD_NAME = r"\.?(head|group)\d+$"  # a head module, or a key/value group (grouped-query attention)


def lowest_heads(lambda_max: dict[str, float], fraction: float, *, keep_per_layer: int = 1) -> list[str]:
    """Names of the ``fraction`` of heads (modules ``...head<h>``, or ``...group<g>`` under grouped-query
    attention) with the lowest λmax, keeping at least ``keep_per_layer`` of them in every attention module."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    heads = {k: v for k, v in lambda_max.items() if re.search(_HEAD_NAME, k)}
    if not heads:
        raise ValueError("no head modules (names ending in 'head<h>' or 'group<g>') in lambda_max")
    by_attn = defaultdict(list)
    for k in heads:
        by_attn[re.sub(_HEAD_NAME, "", k)].append(k)
    budget = int(round(fraction * len(heads)))
    chosen, left = [], {a: len(v) for a, v in by_attn.items()}
    for k in sorted(heads, key=lambda k: (heads[k], k)):
        if len(chosen) == budget:
            break
        attn = re.sub(_HEAD_NAME, "", k)
        if left[attn] > keep_per_layer:
            chosen.append(k)
            left[attn] -= 1
    return chosen


def _rebuild(lin: nn.Linear, rows=None, cols=None) -> nn.Linear:
    w = lin.weight.detach()
    b = lin.bias.detach() if lin.bias is not None else None
    if rows is not None:
        w, b = w[rows], (b[rows] if b is not None else None)
    if cols is not None:
        w = w[:, cols]
    new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if b is not None:
            new.bias.copy_(b)
    new.train(lin.training)
    return new


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, child = name.rsplit(".", 1) if "." in name else ("", name)
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _set_count(mod: nn.Module, attrs: tuple[str, ...], value: int) -> None:
    """Lower every head-count attribute the module has; if it has none (the count lives in its config), state it
    on the module as ``attrs[1]`` (``num_heads`` / ``num_kv_heads``), which discovery reads before the config."""
    found = False
    for a in attrs:
        if isinstance(getattr(mod, a, None), int):
            setattr(mod, a, value)
            found = True
    if not found:
        setattr(mod, attrs[1], value)


# Attention classes whose forward reads the head count from the shared config or sizes per-head state from it
# (Phi-3's reshape, Bloom's ALiBi slopes): a physically smaller projection would break them.
_CONFIG_SHAPED = ("Phi3Attention", "BloomAttention")


def _cannot_prune(attn_mod: nn.Module, all_heads) -> str | None:
    """Why this attention module cannot lose heads physically, or None."""
    if type(attn_mod).__name__ in _CONFIG_SHAPED:
        return "its forward takes the head count from the model config"
    q_rows = sum(n for sl in all_heads[0].slices[:1] for _, n in sl.ranges) * len(all_heads)
    for child in ("q_norm", "k_norm"):
        norm = getattr(attn_mod, child, None)
        w = getattr(norm, "weight", None)
        if isinstance(w, torch.Tensor) and w.numel() > 1 and w.numel() == q_rows:
            return f"{child} normalises all heads together (width {w.numel()})"
    return None


def prune_heads(model: nn.Module, heads: list[str]) -> dict[str, int]:
    """Remove the named heads (module names from :func:`mat_kernels.discover_modules`, e.g. ``"layers.2.head5"``).

    Returns ``{attention module name: heads left}``. Raises ``ValueError`` for unknown names, pruning every head of
    an attention module, or a layout that cannot be rebuilt (not ``nn.Linear`` projections; attention classes that
    take the head count from the config, such as Phi-3 and Bloom; Q/K norms over all heads together, as OLMo-2).
    Everything is checked before anything changes: on an error the model is left as it was.
    """
    if isinstance(heads, str) or not all(isinstance(h, str) for h in heads):
        raise TypeError("heads must be a list of head module names")
    disc = discover_modules(model, out_proj="merge")
    specs = {s.name: s for s in disc.specs if s.kind in ("head", "head_group")}
    unknown = [h for h in heads if h not in specs]
    if unknown:
        raise ValueError(f"not head modules of this model: {unknown[:5]} (known e.g. {list(specs)[:3]})")
    groups = defaultdict(list)
    for name, spec in specs.items():
        groups[re.sub(_HEAD_NAME, "", name)].append(spec)
    plan = []  # (attention name, module, kept specs, [(layer name, new layer)]): nothing changes until all is checked
    for attn, all_heads in groups.items():
        drop = {s.name for s in all_heads if s.name in heads}
        if not drop:
            continue
        if len(drop) == len(all_heads):
            raise ValueError(f"{attn}: pruning all {len(all_heads)} heads would remove the attention module")
        keep = [s for s in all_heads if s.name not in drop]
        attn_mod = model.get_submodule(attn) if attn else model
        why = _cannot_prune(attn_mod, all_heads)
        if why:
            raise ValueError(f"{attn}: {type(attn_mod).__name__} cannot be pruned: {why}")
        rows_by_weight: dict[str, list[int]] = defaultdict(list)
        cols_by_weight: dict[str, list[int]] = defaultdict(list)
        for s in keep:
            for sl in s.slices:
                target = rows_by_weight if sl.axis == "rows" else cols_by_weight
                for a, n in sl.ranges:
                    target[sl.weight].extend(range(a, a + n))
        rebuilt = []
        for wname, idx in list(rows_by_weight.items()) + list(cols_by_weight.items()):
            lin_name = wname.rsplit(".", 1)[0]
            lin = model.get_submodule(lin_name)
            if not isinstance(lin, nn.Linear) or isinstance(attn_mod, nn.MultiheadAttention):
                raise ValueError(f"{attn}: {lin_name} is a {type(lin).__name__}; only nn.Linear projections can be "
                                 "rebuilt")
            order = torch.tensor(sorted(idx), device=lin.weight.device)
            rebuilt.append((lin_name, _rebuild(lin, rows=order) if wname in rows_by_weight else
                            _rebuild(lin, cols=order)))
        plan.append((attn, attn_mod, all_heads, keep, rebuilt))
    result = {}
    for attn, attn_mod, all_heads, keep, rebuilt in plan:
        for lin_name, new in rebuilt:
            _set(model, lin_name, new)
        if all_heads[0].kind == "head_group":  # a group = its key/value head and the r query heads reading it
            kv_before, _ = head_count(attn_mod, KV_HEAD_ATTRS, KV_HEAD_ATTRS)
            q_before, _ = head_count(attn_mod, HEAD_ATTRS, HEAD_ATTRS)
            r = q_before // kv_before
            # stated on the module itself, so that discovery after pruning reads these and not a stale config
            _set_count(attn_mod, HEAD_ATTRS, len(keep) * r)
            _set_count(attn_mod, KV_HEAD_ATTRS, len(keep))
        else:
            _set_count(attn_mod, HEAD_ATTRS, len(keep))
            if head_count(attn_mod, KV_HEAD_ATTRS, KV_HEAD_ATTRS)[0] is not None:
                _set_count(attn_mod, KV_HEAD_ATTRS, len(keep))
        if isinstance(getattr(attn_mod, "all_head_size", None), int) and isinstance(
                getattr(attn_mod, "attention_head_size", None), int):
            attn_mod.all_head_size = len(keep) * attn_mod.attention_head_size
        result[attn] = len(keep)
    return result
