"""Prefix permutation of interchangeable heads (``MAT(..., permute_heads=True)``): at each decision the heads of
every attention are reordered so that the active ones sit next to each other, which turns any activity mask into
one run per section of a weight (a fused ``[Q; K; V]`` weight: three runs) and the sparse backward's GEMMs into one
per run, with no gather (benchmarks/NOTES.md §11 measured what that is worth on the CPU).

A *unit* is what moves together: a head module (``kind="head"``, or ``"head_group"``: a key/value group with its
query heads) with the output-projection modules of its query heads (``<head>.out``, or for a group the ``head<q>.out``
modules whose columns are its query rows). Permuting units leaves the model's function unchanged when heads are
interchangeable: each head reads its own Q/K/V rows and writes its own output-projection columns, and the output
projection sums over heads. Refused, with the reason, where they are not: ALiBi (per-head slopes), relative position
biases per head, per-head parameters beside the projections (a norm per head), output-projection columns in no
module (``out_proj="none"``: they could not move with their head), units of unequal shapes. Grouped-query attention
moves key/value groups with their query heads, and reorders the query heads within a group (a query head's Q rows
with its output-projection columns: the heads of a group share its keys and values, so they are interchangeable
among themselves).

The order within each attention: *output projection active only*, *both*, *head active only*, *neither*, so that
the heads' active set and the output projections' active set are each contiguous when the two are gated apart.
Within a key/value group whose query heads' output projections are partly active, the active ones sit at the edge
that touches the other active groups (the first such group of the output-active span ends with its active heads,
the others begin with theirs): the output projection's active columns are at most one run per partly active group,
and one run in all when at most one group is partly active (or two that can take the span's two ends).

Data move (once per decision, every ~100 steps): for every weight a unit touches, one ``index_select`` along the
blocked axis of the parameter, its gradient and its optimizer state (moments), and the frozen-slice optimizer's
per-module step counts. MAT keeps every decision, log entry and result in the original module order (*identity*
order) and translates at the layers and the optimizer (*slot* order: what sits where). ``state_dict()`` of the model
and of the optimizer is written in the original order (hooks), ``load_state_dict`` reads the original order, and
``close()`` moves everything back.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from mat_kernels.measure.specs import ModuleSpec
from mat_kernels.train.freezing import layer_type_at
from mat_kernels.train.optim import FrozenSliceOptimizer

__all__ = ["HeadPermuter", "not_interchangeable"]

HEAD_KINDS = ("head", "head_group")


def not_interchangeable(module: nn.Module) -> str | None:
    """Why the heads of ``module`` cannot be permuted, or None: per-head position terms (ALiBi slopes, relative
    position biases per head) tie a head's computation to its index."""
    for name, mod in module.named_modules():
        cfg = getattr(mod, "config", None)
        if cfg is not None:
            if getattr(cfg, "alibi", False) or getattr(cfg, "model_type", None) in ("bloom", "mpt"):
                return f"{name or 'the model'}: ALiBi attention biases depend on the head's index"
            pos = getattr(cfg, "position_embedding_type", "absolute")
            if isinstance(pos, str) and pos.startswith("relative"):
                return f"{name or 'the model'}: relative position embeddings ({pos}) per head"
        low = name.lower()
        if "relative_attention_bias" in low or "rel_pos" in low or "alibi" in low:
            return f"{name}: a per-head position bias"
    for name, _ in list(module.named_buffers()) + list(module.named_parameters()):
        if "alibi" in name.lower() or "slopes" in name.lower():
            return f"{name}: per-head ALiBi slopes"
    return None


def _shape(spec: ModuleSpec) -> tuple:
    """What must match for two units to be exchanged: per slice, its weight, axis, range sizes and bias."""
    return tuple((s.weight, s.axis, tuple(n for _, n in s.ranges), s.bias) for s in spec.slices)


class HeadPermuter:
    """Slot bookkeeping and the data moves for :class:`mat_kernels.MAT` (see the module docstring).

    Attributes:
        module_at: ``[M]`` long, the module (identity index) each slot holds; identity at construction.
        moves: how many decisions moved data.
    """

    def __init__(self, module: nn.Module, specs: list[ModuleSpec], optimizer: FrozenSliceOptimizer):
        reason = not_interchangeable(module)
        if reason is not None:
            raise ValueError(f"permute_heads=True: the heads are not interchangeable ({reason})")
        self.module, self.specs, self.optimizer = module, specs, optimizer
        self.params = dict(module.named_parameters())
        by_name = {s.name: i for i, s in enumerate(specs)}
        out_of: dict[int, list[int]] = {}
        for i, s in enumerate(specs):
            if s.kind != "head_out":
                continue
            head = s.name[:-len(".out")] if s.name.endswith(".out") else None
            if head in by_name:
                out_of.setdefault(by_name[head], []).append(i)
        # grouped-query attention: head<q>.out whose columns are the group's Q rows; such a module's Q rows move
        # with it when query heads are reordered within their group
        self.q_rows_of: dict[int, tuple[str, str | None]] = {}
        for i, s in enumerate(specs):
            if s.kind == "head_group":
                out_of[i] = self._group_outs(i, specs)
                for j in out_of[i]:
                    self.q_rows_of[j] = (s.slices[0].weight, s.slices[0].bias)
        self.units: dict[tuple, list[tuple[int, ...]]] = {}  # attention key -> units (head index, out indices...)
        for i, s in enumerate(specs):
            if s.kind not in HEAD_KINDS:
                continue
            outs = out_of.get(i, [])
            if not outs and not any(sl.axis == "cols" for sl in s.slices):
                raise ValueError(f"permute_heads=True: the output-projection columns of {s.name} are in no module "
                                 "(out_proj='none'?), so they could not move with the head; use out_proj='separate' "
                                 "or 'merge'")
            key = (s.kind, tuple(sorted({sl.weight for sl in s.slices})),
                   tuple(sorted({sl.weight for j in outs for sl in specs[j].slices})))
            self.units.setdefault(key, []).append((i, *outs))
        for key, units in self.units.items():
            shapes = {tuple(_shape(specs[j]) for j in u) for u in units}
            if len(shapes) != 1:
                raise ValueError(f"permute_heads=True: the heads of {specs[units[0][0]].name.rsplit('.', 1)[0]} "
                                 "differ in shape, so they are not interchangeable")
            self._check_per_head_parameters([specs[j] for u in units for j in u], len(units))
        # units whose query heads may be reordered among themselves (a group's output-projection modules, all of one
        # shape); elsewhere a unit's modules keep their places within it
        self.reorder_within = {key for key, units in self.units.items() if key[0] == "head_group"
                               and len(units[0]) > 2 and len({_shape(specs[j]) for j in units[0][1:]}) == 1}
        self.module_at = torch.arange(len(specs))
        self.moves = 0

    def _check_per_head_parameters(self, unit_specs: list[ModuleSpec], heads: int) -> None:
        """Refuse per-head parameters beside the units' layers in the attention that holds them (first dimension =
        the number of heads, or a query/key norm, ``q_norm``/``k_norm``, weighting every head's channels apart):
        they would stay where they are while their heads move. A query/key norm shared by the heads (over one head's
        width) and norms of the residual stream are fine."""
        names = {sl.weight for s in unit_specs for sl in s.slices}
        owners = {n.rsplit(".", 1)[0] for n in names}
        parts = [n.split(".") for n in owners]
        common = []
        for level in zip(*parts):
            if len(set(level)) != 1:
                break
            common.append(level[0])
        prefix = ".".join(common)
        width = sum(n for s in unit_specs if s.kind in HEAD_KINDS for sl in s.slices[:1] for _, n in sl.ranges)
        for pname, p in self.params.items():
            if not pname.startswith(prefix + "." if prefix else "") or pname.rsplit(".", 1)[0] in owners:
                continue
            leaf = pname.rsplit(".", 2)[-2].lower() if "." in pname else ""
            qk_norm = leaf.startswith(("q_norm", "k_norm", "q_layernorm", "k_layernorm", "query_norm", "key_norm"))
            if (p.dim() and p.shape[0] == heads) or (qk_norm and p.numel() == width):
                raise ValueError(f"permute_heads=True: the heads are not interchangeable ({pname}, shape "
                                 f"{list(p.shape)}, is per head and would not move with them)")

    def _group_outs(self, i: int, specs: list[ModuleSpec]) -> list[int]:
        """The ``head<q>.out`` modules of a key/value group: output-projection columns equal to its Q rows (a
        separate ``q_proj`` weight, whose rows are the output projection's input columns)."""
        g = specs[i]
        prefix = g.name.rsplit(".", 1)[0] + "."
        q = g.slices[0]
        rows = {r for start, n in q.ranges for r in range(start, start + n)}
        outs = []
        for j, s in enumerate(specs):
            if s.kind == "head_out" and s.name.startswith(prefix):
                cols = {c for sl in s.slices for start, n in sl.ranges for c in range(start, start + n)}
                if cols and cols <= rows:
                    outs.append(j)
        return outs

    # ------------------------------------------------------------------------------------------------
    def slot_active(self, active: torch.Tensor) -> torch.Tensor:
        """The activity of each slot from the modules' (identity order)."""
        return active[self.module_at]

    def to_identity(self, t: torch.Tensor) -> torch.Tensor:
        """A per-slot tensor (leading dimension ``M``) in identity order."""
        out = torch.empty_like(t)
        out[self.module_at.to(t.device)] = t
        return out

    def to_slots(self, t: torch.Tensor) -> torch.Tensor:
        """A per-module tensor (identity order) in slot order."""
        return t[self.module_at.to(t.device)]

    def arrange(self, active: torch.Tensor) -> bool:
        """Reorder every attention's units for ``active`` (identity order): out-projection-only, both, head-only,
        neither (stable), and a group's query heads within it (module docstring), moving the data. Returns whether
        anything moved."""
        new_at = self.module_at.clone()
        for key, units in self.units.items():
            held = [[int(self.module_at[j]) for j in u] for u in units]  # modules now in each unit's slots
            outs_on = [[bool(active[m]) for m in mods[1:]] for mods in held]

            def category(k):
                head, out = bool(active[held[k][0]]), any(outs_on[k])
                return (0 if out and not head else 1 if out else 2 if head else 3) if len(held[k]) > 1 else \
                    (0 if head else 1)
            cats = [category(k) for k in range(len(units))]
            if key in self.reorder_within:
                order, first_partial = self._order_groups(cats, outs_on)
            else:
                order, first_partial = sorted(range(len(units)), key=lambda k: cats[k]), None
            for slot_unit, src in zip(units, order):
                mods = held[src]
                if key in self.reorder_within:  # active query heads first, or last for the span's first group
                    last = src == first_partial
                    outs = sorted(range(len(mods) - 1), key=lambda q: outs_on[src][q] == last)
                    mods = [mods[0]] + [mods[1 + q] for q in outs]
                for j, m in zip(slot_unit, mods):
                    new_at[j] = m
        if torch.equal(new_at, self.module_at):
            return False
        self._move(new_at)
        return True

    @staticmethod
    def _order_groups(cats: list[int], outs_on: list[list[bool]]) -> tuple[list[int], int | None]:
        """Key/value groups in category order; within the output-active span (categories 0 and 1) a partly active
        group first, then the fully active, then the other partly active ones (for category 1 after a non-empty
        category 0: fully active first). Returns the order and the group that ends with its active heads."""
        order, first_partial = [], None
        for c in range(4):
            ks = [k for k in range(len(cats)) if cats[k] == c]
            if c > 1:
                order += ks
                continue
            partial = [k for k in ks if not all(outs_on[k])]
            full = [k for k in ks if all(outs_on[k])]
            if not order and partial:  # the span's first group
                first_partial = partial[0]
                order += [partial[0]] + full + partial[1:]
            else:
                order += full + partial
        return order, first_partial

    def restore(self) -> None:
        """Move everything back to the original order (``close()``)."""
        if not torch.equal(self.module_at, torch.arange(len(self.specs))):
            self._move(torch.arange(len(self.specs)))

    # ------------------------------------------------------------------------------------------------
    def index_maps(self, new_at: torch.Tensor | None = None, old_at: torch.Tensor | None = None) -> dict:
        """``{parameter name: (dim, index)}``: ``new = old.index_select(dim, index)`` moves a parameter-shaped
        tensor from the slot order ``old_at`` to ``new_at`` (defaults: the current order, and identity)."""
        new_at = self.module_at if new_at is None else new_at
        old_at = self.module_at if old_at is None else old_at
        slot_of_old = torch.empty_like(old_at)
        slot_of_old[old_at] = torch.arange(len(old_at))
        maps: dict[str, tuple[int, torch.Tensor]] = {}
        for units in self.units.values():
            for u in units:
                for slot in u:
                    src = int(slot_of_old[new_at[slot]])  # the slot that holds this module in the old order
                    if src == slot:
                        continue
                    for dst_sl, src_sl in zip(self.specs[slot].slices, self.specs[src].slices):
                        self._map(maps, dst_sl.weight, dst_sl.axis, dst_sl.ranges, src_sl.ranges)
                        if dst_sl.bias is not None and dst_sl.axis == "rows":
                            self._map(maps, dst_sl.bias, "bias", dst_sl.ranges, src_sl.ranges)
                        if slot in self.q_rows_of:  # a query head's Q rows: its output-projection columns' indices
                            q_weight, q_bias = self.q_rows_of[slot]
                            self._map(maps, q_weight, "rows", dst_sl.ranges, src_sl.ranges)
                            if q_bias is not None:
                                self._map(maps, q_bias, "bias", dst_sl.ranges, src_sl.ranges)
        return maps

    def _map(self, maps, pname, axis, dst_ranges, src_ranges) -> None:
        p = self.params[pname]
        if axis == "bias":
            dim = 0
        else:
            layer_type = layer_type_at(self.module, pname)[0]
            row_dim = 1 if layer_type is not None and layer_type.transposed else 0
            dim = row_dim if axis == "rows" else 1 - row_dim
        if pname not in maps:
            maps[pname] = (dim, torch.arange(p.shape[dim]))
        idx = maps[pname][1]
        for (ds, n), (ss, _) in zip(dst_ranges, src_ranges):
            idx[ds:ds + n] = torch.arange(ss, ss + n)

    @torch.no_grad()
    def _move(self, new_at: torch.Tensor) -> None:
        maps = self.index_maps(new_at, self.module_at)
        opt = self.optimizer.optimizer
        for pname, (dim, idx) in maps.items():
            p = self.params[pname]
            i = idx.to(p.device)
            tensors = [p] + ([p.grad] if p.grad is not None else [])
            tensors += [t for t in opt.state.get(p, {}).values() if torch.is_tensor(t) and t.shape == p.shape]
            for t in tensors:
                t.copy_(t.index_select(dim, i))
        steps = self.optimizer.block_steps  # per slot: the counts move with their modules
        slot_of_old = torch.empty_like(self.module_at)
        slot_of_old[self.module_at] = torch.arange(len(self.module_at))
        self.optimizer.block_steps = steps[slot_of_old[new_at]]
        self.module_at = new_at
        self.moves += 1

    # ------------------------------------------------------------------------------------------------
    def to_original(self, sd: dict, prefix: str = "") -> None:
        """Rewrite a model ``state_dict`` (entries ``prefix + parameter name``) from the slot order to the original
        order, in place (new tensors; the parameters are untouched)."""
        for pname, (dim, idx) in self._to_identity_maps().items():
            k = prefix + pname
            if k in sd:
                sd[k] = sd[k].index_select(dim, idx.to(sd[k].device))

    def from_original(self, sd: dict, prefix: str = "") -> None:
        """Rewrite an original-order model ``state_dict`` into the current slot order, in place."""
        for pname, (dim, idx) in self.index_maps(self.module_at, torch.arange(len(self.specs))).items():
            k = prefix + pname
            if k in sd and torch.is_tensor(sd[k]):
                sd[k] = sd[k].index_select(dim, idx.to(sd[k].device))

    def _to_identity_maps(self) -> dict:
        return self.index_maps(torch.arange(len(self.specs)), self.module_at)

    def install_hooks(self) -> list:
        """Hooks that write the model's and the optimizer's ``state_dict`` in the original order and read it back
        into the current one; their handles (``close()`` removes them)."""
        opt = self.optimizer.optimizer

        def model_out(module, sd, prefix, local_metadata):
            self.to_original(sd, prefix)

        def model_in(module, sd, prefix, *args):
            self.from_original(sd, prefix)

        def packed_maps(maps: dict) -> dict:  # packed optimizer-state index -> (dim, index)
            ids = {id(p): i for i, p in enumerate(q for g in opt.param_groups for q in g["params"])}
            return {ids[id(self.params[n])]: m for n, m in maps.items() if id(self.params[n]) in ids}

        def apply(state: dict, maps: dict) -> dict:
            state = dict(state)
            for i, (dim, idx) in packed_maps(maps).items():
                if i in state:
                    state[i] = {k: v.index_select(dim, idx.to(v.device)) if torch.is_tensor(v) and v.dim() > dim
                                and v.shape[dim] == len(idx) else v for k, v in state[i].items()}
            return state

        def opt_out(optimizer, sd):
            sd["state"] = apply(sd["state"], self._to_identity_maps())
            return sd

        def opt_in(optimizer, sd):
            sd = dict(sd)
            sd["state"] = apply(sd["state"], self.index_maps(self.module_at, torch.arange(len(self.specs))))
            return sd

        return [self.module._register_state_dict_hook(model_out),
                self.module._register_load_state_dict_pre_hook(model_in, with_module=True),
                opt.register_state_dict_post_hook(opt_out), opt.register_load_state_dict_pre_hook(opt_in)]
