#!/usr/bin/env python
"""How much of the FLOPs a frozen module saves shows in wall time: one layer, and whole training steps.

**Layer level** (``--level layer``): forward + backward + optimizer step (AdamW) of one linear layer at 4,096 tokens,
the input needing its gradient (the layer sits inside a network): ``dense`` (``F.linear`` and torch's AdamW on the
whole weight) against :class:`mat_kernels.SparseUpdateLinear` + :class:`mat_kernels.FrozenSliceOptimizer` with a
fraction ``f`` of the layer's modules active. Layers: BERT-base's fused QKV projection (768 -> 2304, 12 heads as
row blocks), its attention output projection (768 -> 768, 12 heads as column blocks), its FFN input and output
projections (768 -> 3072 and 3072 -> 768, 12 groups of 256 hidden units, rows resp. columns) and the ``mlm-small``
QKV projection (128 -> 384, 4 heads: fractions in quarters). Fractions 0, 1/12, 1/4, 1/2, 3/4, 11/12, 1; masks
``contiguous`` (the first k modules), ``interleaved`` (spread evenly) and ``random0`` .. ``random4`` (fixed seeds);
``dw`` (frozen modules skip their weight gradient) and ``detach`` (their input gradient too).

**Step level** (``--level step``): forward, backward, ``mat.step`` (no measurement due) and ``zero_grad`` of
``mlm-small`` (python/tasks.py, its real batch), a Hugging Face BERT and a Hugging Face GPT-2 (built from configs),
against the same dense step, with fixed masks (all active; every fourth module active, ``dw`` and ``detach``;
three of four active, ``dw``), and a second identical dense provider (``dense_twin``) whose ratio to dense is the
noise floor of the comparison. The work a mask skips is found by profiling the dense step: the time of the GEMMs that
compute frozen modules' weight gradients (``detach``: and their input gradients), matched by shape.

Every group of providers (one layer, mode and fraction with its dense baseline; one model's step) runs in interleaved
rounds in rotating order. Reported per provider: the median time and the median of per-round ratios to dense;
``R = (1 - t/t_dense) / (1 - F/F_dense)``, the share of the FLOPs saving that shows in wall time, with a 90 %
bootstrap interval over rounds (``F``: the GEMM FLOPs of the step, counted by ``torch.utils.flop_counter``, whose
formulas for the sparse ops count only the active work); at f = 1 (nothing saved) ``R`` is undefined and the ratio
is what matters; aten ops and ``_local_scalar_dense`` calls per step (a ``TorchDispatchMode``).

    python benchmarks/bench_frozen_step.py --level layer [--threads 1] [--rounds 5] [--csv ...]
    python benchmarks/bench_frozen_step.py --level step [--threads 1] [--rounds 30] [--csv ...]
    python benchmarks/bench_frozen_step.py --quick        # tiny shapes, 2 rounds (tests/test_frozen_step.py)
    python benchmarks/bench_frozen_step.py --level layer --device cuda --dtype bf16   # GPU (benchmarks/gpu_check.sh)

Nothing else should run on the machine meanwhile. CSV: ``benchmarks/results/cpu_frozen_step_<date>.csv`` by default.
"""
from __future__ import annotations

import argparse
import collections
import copy
import datetime as _dt
import os
import statistics
import sys
import warnings

import torch
from torch.utils.flop_counter import FlopCounterMode

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
for p in (REPO, HERE, os.path.join(REPO, "python")):
    if p not in sys.path:
        sys.path.insert(0, p)

import _harness  # noqa: E402

import mat_kernels as mk  # noqa: E402
from mat_kernels.testing.counting import OpCounter  # noqa: E402
from mat_kernels.train.optim import FrozenSliceOptimizer  # noqa: E402

FRACTIONS = (0.0, 1 / 12, 0.25, 0.5, 0.75, 11 / 12, 1.0)
PATTERNS = ("contiguous", "interleaved", "random0", "random1", "random2", "random3", "random4")
MODES = ("dw", "detach")

# name: (d_in, d_out, sparse-layer keyword arguments, number of modules)
LAYERS = {
    "bert-qkv": (768, 2304, dict(row_blocks=mk.fused_qkv_heads(12, 64)), 12),
    "bert-out": (768, 768, dict(col_blocks=12), 12),
    "bert-ffn-in": (768, 3072, dict(row_blocks=12), 12),
    "bert-ffn-out": (3072, 768, dict(col_blocks=12), 12),
    "mlm-small-qkv": (128, 384, dict(row_blocks=mk.fused_qkv_heads(4, 32)), 4),
}
QUICK_LAYERS = {"tiny-qkv": (16, 48, dict(row_blocks=mk.fused_qkv_heads(4, 4)), 4),
                "tiny-out": (16, 16, dict(col_blocks=4), 4)}


def mask_for(num_modules: int, fraction: float, pattern: str) -> torch.Tensor:
    """The fixed mask of ``round(fraction * num_modules)`` active modules in ``pattern``."""
    k = round(fraction * num_modules)
    m = torch.zeros(num_modules, dtype=torch.bool)
    if k == 0:
        return m
    if pattern == "contiguous":
        m[:k] = True
    elif pattern == "interleaved":
        m[[(i * num_modules) // k for i in range(k)]] = True
    else:
        g = torch.Generator().manual_seed(1000 * num_modules + 10 * k + int(pattern[-1]))
        m[torch.randperm(num_modules, generator=g)[:k]] = True
    return m


def masks_at(num_modules: int, fraction: float, patterns=PATTERNS) -> dict[str, torch.Tensor]:
    k = round(fraction * num_modules)
    if k in (0, num_modules):  # one mask only
        return {"none" if k == 0 else "all": mask_for(num_modules, fraction, "contiguous")}
    out = {}
    for p in patterns:
        m = mask_for(num_modules, fraction, p)
        if not any(torch.equal(m, v) for v in out.values()):
            out[p] = m
    return out


def _counts(fn) -> tuple[int, int]:
    with OpCounter() as c:
        fn()
    return c.total, c.scalar_reads


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def _timing(t: list[float], t_dense: list[float], flops: int, flops_dense: int) -> dict:
    """The timing columns of a provider against dense from paired rounds: medians, the median per-round ratio,
    the FLOP ratio and R with its bootstrap interval (nan when nothing is saved)."""
    share = 1 - flops / flops_dense
    recs = [(a, b, share) for a, b in zip(t, t_dense)]
    r = lo = hi = float("nan")
    if share > 1e-9:
        r, lo, hi = _harness.bootstrap_ci(recs, _r_stat)
    return {"ms": round(statistics.median(t), 3), "dense_ms": round(statistics.median(t_dense), 3),
            "ratio_vs_dense": round(statistics.median(a / b for a, b, _ in recs), 4),
            "flops_ratio": round(flops / flops_dense, 4), "R": round(r, 3), "R_lo": round(lo, 3),
            "R_hi": round(hi, 3)}


def _r_stat(rounds):
    """R from per-round (t, t_dense, flop share saved) records: (1 - median ratio) / share."""
    share = rounds[0][2]
    return (1 - statistics.median(t / td for t, td, _ in rounds)) / share


# ---------------------------------------------------------------------------------------------------------------
# layer level
# ---------------------------------------------------------------------------------------------------------------
class _LayerProvider:
    """One layer's step: forward, backward of a fixed output gradient, optimizer step, gradients dropped."""

    def __init__(self, d_in, d_out, tokens, *, sparse_kw=None, mask=None, mode="dw", seed=0,
                 device=torch.device("cpu"), dtype=torch.float32):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(tokens, d_in, generator=g).to(device, dtype).requires_grad_(True)
        self.dy = torch.randn(tokens, d_out, generator=g).to(device, dtype)
        self.cuda = device.type == "cuda"
        opt_kw = {"fused": True} if self.cuda else {}  # the GPU's fastest torch AdamW; CPU: torch's default
        if sparse_kw is None:
            self.lin = torch.nn.Linear(d_in, d_out).to(device, dtype)
            self.opt = torch.optim.AdamW(self.lin.parameters(), lr=1e-4, **opt_kw)
            self.mask = None
        else:
            self.lin = mk.SparseUpdateLinear(d_in, d_out, frozen_backward=mode, **sparse_kw).to(device, dtype)
            self.lin.set_active(mask)
            blocks = {self.lin.weight: self.lin.layout}
            if self.lin.layout.dim == 0:  # row blocks own their bias entries
                blocks[self.lin.bias] = mk.WeightBlocks.build(d_out, d_in, bias=True, **sparse_kw).for_bias()
            self.opt = FrozenSliceOptimizer(torch.optim.AdamW(self.lin.parameters(), lr=1e-4, **opt_kw), blocks,
                                            num_modules=self.lin.num_modules)
            self.mask = mask.clone()

    def __call__(self):
        y = self.lin(self.x)
        y.backward(self.dy)
        if self.mask is None:
            self.opt.step()
        else:
            self.opt.step(self.mask)
        self.opt.zero_grad(set_to_none=True)
        self.x.grad = None
        if self.cuda:  # the host timer needs the step finished
            torch.cuda.synchronize()

    def forward_backward(self):
        self.lin(self.x).backward(self.dy)
        self.lin.zero_grad(set_to_none=True)
        self.x.grad = None


def run_layers(layers, tokens, rounds, env, fractions=FRACTIONS, modes=MODES, device=torch.device("cpu"),
               dtype=torch.float32, patterns=PATTERNS) -> list[dict]:
    rows = []
    dk = dict(device=device, dtype=dtype)
    dtype_name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    for name, (d_in, d_out, kw, M) in layers.items():
        dense = _LayerProvider(d_in, d_out, tokens, **dk)
        f_dense = _flops(dense.forward_backward)
        ops_dense, reads_dense = _counts(dense)
        # fractions that round to the same number of active modules (4 heads: 1/12 -> 0) run once
        counts = {}
        for frac in fractions:  # each count once, labelled with the fraction nearest to it
            k = round(frac * M)
            if k not in counts or abs(frac - k / M) < abs(counts[k] - k / M):
                counts[k] = frac
        for mode in modes:
            for frac in counts.values():
                masks = masks_at(M, frac, patterns)
                provs = {"dense": dense}
                provs.update({p: _LayerProvider(d_in, d_out, tokens, sparse_kw=kw, mask=m, mode=mode, **dk)
                              for p, m in masks.items()})
                times = _harness.interleaved_times(provs, rounds, rotate=True)
                for p, m in masks.items():
                    prov = provs[p]
                    f = _flops(prov.forward_backward)
                    ops, reads = _counts(prov)
                    tm = _timing(times[p], times["dense"], f, f_dense)
                    row = {**env, "op": "frozen_step_layer", "shape": f"{name} T={tokens}", "provider":
                           f"{mode}/{p}", "dtype": dtype_name, "layer": name, "mode": mode, "pattern": p,
                           "active": int(m.sum()), "modules": M, "fraction": round(frac, 4), **tm,
                           "aten_ops": ops, "dense_aten_ops": ops_dense, "scalar_reads": reads,
                           "dense_scalar_reads": reads_dense, "rounds": rounds,
                           "threads": torch.get_num_threads()}
                    rows.append(row)
                    print(f"{name:14s} {mode:6s} f={frac:.3f} {p:11s} t/td={tm['ratio_vs_dense']:.3f} "
                          f"F/Fd={tm['flops_ratio']:.3f} R={tm['R']:.2f} [{tm['R_lo']:.2f}, {tm['R_hi']:.2f}] "
                          f"ops {ops}/{ops_dense} reads {reads}/{reads_dense}", flush=True)
    return rows


# ---------------------------------------------------------------------------------------------------------------
# step level
# ---------------------------------------------------------------------------------------------------------------
def _hf_bert(quick):
    import transformers

    cfg = transformers.BertConfig(vocab_size=2000, hidden_size=64 if quick else 256,
                                  num_hidden_layers=2 if quick else 4, num_attention_heads=4,
                                  intermediate_size=128 if quick else 1024, max_position_embeddings=128,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                  attn_implementation="eager")
    return transformers.BertForMaskedLM(cfg)


def _hf_gpt2(quick):
    import transformers

    cfg = transformers.GPT2Config(vocab_size=2000, n_embd=64 if quick else 256, n_layer=2 if quick else 4, n_head=4,
                                  n_positions=128, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  attn_implementation="eager")
    return transformers.GPT2LMHeadModel(cfg)


def _bert_base_width(quick):
    """Two layers of BERT-base's widths (768 wide, 12 heads of 64, FFN 3072): what the per-head permutation needs
    (many heads per projection), at a cost per round the CPU can repeat 20-30 times."""
    import transformers

    cfg = transformers.BertConfig(vocab_size=2000, hidden_size=96 if quick else 768,
                                  num_hidden_layers=2, num_attention_heads=12,
                                  intermediate_size=384 if quick else 3072, max_position_embeddings=128,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                  attn_implementation="eager")
    return transformers.BertForMaskedLM(cfg)


STEP_MODELS = ("mlm-small", "hf-bert", "hf-gpt2", "bert-base-2l")


def _step_models(quick, names=STEP_MODELS[:3]):
    """name -> (model, optimizer factory, batch, loss(model, batch))."""
    import tasks as task_registry

    out = {}
    if "mlm-small" in names:
        task = task_registry.build("mlm-small", 0, tiny=quick)
        out["mlm-small"] = (task.model, task.make_optimizer, task.batch(0), task.loss)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 2000, (4, 32) if quick else (16, 128), generator=g)

    def hf_loss(model, batch):
        return model(input_ids=batch, labels=batch).loss

    def adamw(model):
        return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)

    builders = {"hf-bert": _hf_bert, "hf-gpt2": _hf_gpt2, "bert-base-2l": _bert_base_width}
    for name, build in builders.items():
        if name in names:
            out[name] = (build(quick), adamw, ids, hf_loss)
    return out


STEP_PROVIDERS = {  # name: (mask rule on module index i of M, frozen_backward[, MAT keywords])
    "all_active": (lambda i, M: True, "dw"),
    "quarter_dw": (lambda i, M: i % 4 == 0, "dw"),
    "quarter_detach": (lambda i, M: i % 4 == 0, "detach"),
    "three_quarters_dw": (lambda i, M: i % 4 != 0, "dw"),
}


def _scattered_half(i: int, M: int) -> bool:
    """A fixed scattered mask, half of the modules on average (what λ decisions look like: no pattern)."""
    return bool(torch.rand(M, generator=torch.Generator().manual_seed(M))[i] < 0.5)


PERMUTE_PROVIDERS = {  # --permute: one scattered mask with and without the heads permuted to a prefix
    "half_dw": (_scattered_half, "dw"),
    "half_dw_permuted": (_scattered_half, "dw", {"permute_heads": True}),
    "half_detach": (_scattered_half, "detach"),
    "half_detach_permuted": (_scattered_half, "detach", {"permute_heads": True}),
}


def _skippable_ms(model0, make_opt, batch, loss_fn, mat_template, detach, profiles: int = 5) -> float:
    """Time of the dense step's GEMMs that the mask skips (frozen modules' dW, and their dX under ``detach``), from
    profiles of the dense step's backward and optimizer step (not its forward: a forward ``x @ Wᵀ`` has a dX's
    operand shapes, and counting it made ``detach``'s skippable time too large by about a third before 2026-12-07),
    matched by the GEMMs' operand shapes and weighted by each layer's frozen share and by the share of the model's
    linear maps of that shape that are sparse layers (a dense layer of the same shape, e.g. BERT's MLM-head
    transform, runs the same GEMMs and skips nothing); the median over ``profiles`` profiled steps (one profile
    moved this by up to a fifth between runs)."""
    shares = collections.defaultdict(list)  # (N, K) -> frozen shares of the layers of that weight shape
    for entry in mat_template.sparse_layers:
        layer = entry[0] if isinstance(entry, tuple) else entry
        w = layer._linear_weight()
        total = w.shape[layer.layout.dim]
        act = layer._active
        active = sum(n for i, ranges in layer.layout.entries() for _, n in ranges if act[i])
        shares[tuple(w.shape)].append(1 - active / total)
    linears = collections.Counter(_linear_shapes(model0))
    share = {wshape: sum(sh) / max(len(sh), linears[wshape]) for wshape, sh in shares.items()}
    model = copy.deepcopy(model0)
    opt = make_opt(model)
    for _ in range(2):
        loss_fn(model, batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return statistics.median(_skipped_in_profile(model, opt, batch, loss_fn, share, detach)
                             for _ in range(profiles))


def _linear_shapes(model) -> list[tuple[int, int]]:
    """``(out, in)`` of every linear map of ``model``: ``nn.Linear`` and Hugging Face's ``Conv1D`` (``[in, out]``)."""
    out = []
    for m in model.modules():
        w = getattr(m, "weight", None)
        if isinstance(m, torch.nn.Linear):
            out.append(tuple(w.shape))
        elif type(m).__name__ == "Conv1D" and isinstance(w, torch.Tensor) and w.dim() == 2:
            out.append(tuple(w.shape)[::-1])
    return out


def _skipped_in_profile(model, opt, batch, loss_fn, share, detach) -> float:
    """One profiled dense backward + optimizer step: the ms of its GEMMs that ``share`` (weight shape -> the frozen
    share of that shape's GEMMs) would skip."""
    loss = loss_fn(model, batch)  # the forward outside the profile: its GEMMs skip nothing
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    skipped_us = 0.0
    for ev in prof.events():
        if ev.name not in ("aten::mm", "aten::addmm") or not ev.input_shapes:
            continue
        shapes = [tuple(s) for s in ev.input_shapes if s]
        mats = [s for s in shapes if len(s) == 2]
        if len(mats) < 2:
            continue
        a, b = mats[-2], mats[-1]
        out = (a[0], b[1])
        for (N, K), s in share.items():
            is_dw = out in ((N, K), (K, N)) and a[1] == b[0] and a[1] not in (N, K)
            is_dx = detach and out[1] == K and a[1] == N and b == (N, K)
            if is_dw or is_dx:
                skipped_us += s * ev.self_cpu_time_total
                break
    return skipped_us / 1e3


def run_steps(rounds, env, quick=False, providers=STEP_PROVIDERS, models=STEP_MODELS[:3]) -> list[dict]:
    rows = []
    for name, (model0, make_opt, batch, loss_fn) in _step_models(quick, models).items():
        provs, mats = {}, {}

        def dense_step(model, opt):
            loss_fn(model, batch).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        dm = copy.deepcopy(model0)
        dopt = make_opt(dm)
        provs["dense"] = lambda m=dm, o=dopt: dense_step(m, o)
        # the noise floor: a second, identical dense provider (its ratio to dense is what "equal" looks like here)
        twin = copy.deepcopy(model0)
        twin_opt = make_opt(twin)
        provs["dense_twin"] = lambda m=twin, o=twin_opt: dense_step(m, o)
        for pname, (rule, fb, *kw) in providers.items():
            model = copy.deepcopy(model0)
            opt = make_opt(model)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                mat = mk.MAT(model, opt, warmup_steps=10 ** 9, frozen_backward=fb, **(kw[0] if kw else {}))
            M = len(mat.specs)
            mat.set_active(torch.tensor([rule(i, M) for i in range(M)]))
            mats[pname] = mat

            def mat_step(model=model, mat=mat):
                mat.backward(loss_fn(model, batch))
                mat.step()
                mat.zero_grad()

            provs[pname] = mat_step
        ops_dense, reads_dense = _counts(provs["dense"])
        f_dense = _flops(lambda: loss_fn(dm, batch).backward())
        dopt.zero_grad(set_to_none=True)
        times = _harness.interleaved_times(provs, rounds, rotate=True)
        tw = _timing(times["dense_twin"], times["dense"], 1, 1)
        rows.append({**env, "op": "frozen_step_model", "shape": name, "provider": "dense_twin", "dtype": "fp32", **tw,
                     "rounds": rounds, "threads": torch.get_num_threads()})
        print(f"{name:10s} {'dense_twin':18s} t/td={tw['ratio_vs_dense']:.3f} (noise floor)", flush=True)
        for pname in provs:
            if pname in ("dense", "dense_twin"):
                continue
            mat = mats[pname]
            ops, reads = _counts(provs[pname])
            f = _flops(lambda: mat.backward(loss_fn(mat.model, batch)))
            mat.zero_grad()
            tm = _timing(times[pname], times["dense"], f, f_dense)
            skippable = _skippable_ms(model0, make_opt, batch, loss_fn, mat, providers[pname][1] == "detach")
            # saved: the median of the paired per-round differences (the difference of two medians moved a cell
            # by up to 0.5 of the share between runs), with a bootstrap interval over rounds
            diffs = [a - b for a, b in zip(times["dense"], times[pname])]
            saved, s_lo, s_hi = _harness.bootstrap_ci(diffs, statistics.median)
            share = {}
            if skippable > 0:
                share = {"saved_share_of_skippable": round(saved / skippable, 3),
                         "saved_share_lo": round(s_lo / skippable, 3), "saved_share_hi": round(s_hi / skippable, 3)}
            rows.append({**env, "op": "frozen_step_model", "shape": name, "provider": pname, "dtype": "fp32", **tm,
                         "skippable_ms": round(skippable, 3), "saved_ms": round(saved, 3), **share,
                         "aten_ops": ops, "dense_aten_ops": ops_dense, "scalar_reads": reads,
                         "dense_scalar_reads": reads_dense, "rounds": rounds, "threads": torch.get_num_threads()})
            print(f"{name:10s} {pname:18s} t/td={tm['ratio_vs_dense']:.3f} F/Fd={tm['flops_ratio']:.3f} "
                  f"R={tm['R']:.2f} [{tm['R_lo']:.2f}, {tm['R_hi']:.2f}] saved {saved:.1f} [{s_lo:.1f}, {s_hi:.1f}] "
                  f"of skippable {skippable:.1f} ms; ops {ops}/{ops_dense} reads {reads}/{reads_dense}", flush=True)
        for mat in mats.values():
            mat.close()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--level", choices=("layer", "step", "both"), default="both")
    ap.add_argument("--layers", default=",".join(LAYERS), help="comma-separated subset of " + ",".join(LAYERS))
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--patterns", default=",".join(PATTERNS), help="comma-separated subset of " + ",".join(PATTERNS))
    ap.add_argument("--fractions", default=None, help="comma-separated, e.g. 0.25,0.5 (default: all seven)")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=None, help="default: 5 (layer), 30 (step)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu", help="layer level only on cuda (the step level runs on the CPU)")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="layer level")
    ap.add_argument("--quick", action="store_true", help="tiny shapes and 2 rounds (a smoke test)")
    ap.add_argument("--permute", action="store_true", help="step level: a half mask with and without "
                    "MAT(permute_heads=True) instead of the default providers")
    ap.add_argument("--models", default=",".join(STEP_MODELS[:3]),
                    help="step level: comma-separated subset of " + ",".join(STEP_MODELS))
    ap.add_argument("--csv", default=None)
    a = ap.parse_args(argv)
    for arg, given, known in (("--layers", a.layers, LAYERS), ("--modes", a.modes, MODES),
                              ("--patterns", a.patterns, PATTERNS), ("--models", a.models, STEP_MODELS)):
        unknown = [v for v in given.split(",") if v not in known]
        if unknown:
            ap.error(f"{arg}: unknown {unknown}; choose from {','.join(known)}")
    if a.rounds is not None and a.rounds < 3:
        ap.error("--rounds must be >= 3 (a bootstrap interval over fewer rounds means nothing)")
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    if device.type == "cuda" and a.level != "layer":
        ap.error("--device cuda runs the layer level only: pass --level layer")
    env = _harness.env_row(device)
    rows = []
    if a.level in ("layer", "both"):
        layers = QUICK_LAYERS if a.quick else {k: LAYERS[k] for k in a.layers.split(",")}
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype]
        rows += run_layers(layers, 64 if a.quick else a.tokens, 2 if a.quick else (a.rounds or 5), env,
                           fractions=(0.0, 0.25, 1.0) if a.quick else
                           (tuple(float(f) for f in a.fractions.split(",")) if a.fractions else FRACTIONS),
                           modes=tuple(a.modes.split(",")), device=device, dtype=dtype,
                           patterns=tuple(a.patterns.split(",")))
    if a.level in ("step", "both"):
        rows += run_steps(2 if a.quick else (a.rounds or 30), env, quick=a.quick,
                          providers=PERMUTE_PROVIDERS if a.permute else STEP_PROVIDERS,
                          models=tuple(a.models.split(",")))
    csv = a.csv or os.path.join(HERE, "results", f"{device.type}_frozen_step_{_dt.date.today().isoformat()}.csv")
    _harness.upsert_csv(csv, rows, key=("op", "shape", "provider", "dtype", "device", "threads"))
    print(f"{len(rows)} rows -> {csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
