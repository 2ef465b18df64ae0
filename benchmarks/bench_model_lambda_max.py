#!/usr/bin/env python
"""Benchmark: λmax of every MAT module of a 12-layer BERT-base (300 modules) on one batch, mat_kernels vs torch.func.

Model: Hugging Face ``BertForMaskedLM`` built from a config (no download): d = 768, 12 layers, 12 heads, FFN 3072,
eager attention, dropout 0, eval mode, random init (seeded). Modules (``mat_kernels.discover_modules``): per layer 12
heads' Q/K/V rows (+ bias), 12 heads' output-projection columns, 1 FFN block = 25, so 300. NTK output: the
true-token log-probability summed over the sample's masked positions (15% of the tokens, at least one per sample).

Providers (each returns the 300 λmax):

* ``mat_kernels``: ``mat_kernels.model_lambda_max`` (one forward, one backward that computes only the layer output
  gradients, per-layer Grams, batched ``eigvalsh``).
* ``mat_kernels_train_step_overhead``: what a training step pays on top of its own forward and backward when the
  Grams come from that backward (``capture_lambda_max`` around ``loss.backward()``), i.e. time(step with capture)
  minus time(plain step); the NTK output is then the per-sample loss.
* ``torch_func``: ``torch.func.vmap(grad)`` per-sample gradients of the same parameters over the whole model
  (``--func-chunk`` samples at a time), sliced per module, Grams, ``eigvalsh``.

Columns: median and 20/80% ms (``triton.testing.do_bench`` on CUDA, a ``perf_counter`` loop on CPU), peak extra
device memory (CUDA), max relative λmax difference to ``torch_func``. Targets (issue 4, H100, n=32 T=128):
``mat_kernels`` ≤ 8 ms, ≤ 1 GiB extra, ≥ 30× faster than ``torch_func``.

    python benchmarks/bench_model_lambda_max.py [--n 32] [--seq-len 128] [--dtype fp32|bf16] [--csv out.csv]
    python benchmarks/bench_model_lambda_max.py --quick --device cpu      # smoke run: 2 layers of d = 64
"""
from __future__ import annotations

import argparse
import sys
import warnings

import _harness  # benchmarks/_harness.py (this script's folder is on sys.path)
import torch

import mat_kernels as mk
from mat_kernels.measure.model import per_sample_output
from mat_kernels.testing.reference import reference_model_grams


def build_bert(layers: int, d: int, heads: int, ffn: int, vocab: int, max_len: int, device, dtype):
    import transformers

    transformers.logging.set_verbosity_error()
    cfg = transformers.BertConfig(vocab_size=vocab, hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads,
                                  intermediate_size=ffn, max_position_embeddings=max_len, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, attn_implementation="eager")
    torch.manual_seed(0)
    return transformers.BertForMaskedLM(cfg).to(device=device, dtype=dtype).eval()


def make_batch(n: int, T: int, vocab: int, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, T), generator=g)
    sel = torch.rand(n, T, generator=g) < 0.15
    sel[:, 0] = True
    labels = torch.where(sel, ids, torch.full_like(ids, -100))
    return ids.to(device), labels.to(device)


def torch_func_lambdas(model, ids, labels, specs, chunk: int):
    names = sorted({p for s in specs for p in s.param_names()})
    params = dict(model.named_parameters())
    target = {k: params[k].detach() for k in names}
    rest = {k: v.detach() for k, v in params.items() if k not in target}

    def s(p, ids_i, lab_i):
        out = torch.func.functional_call(model, {**p, **rest}, (ids_i[None],))
        return per_sample_output("logprob", out.logits, lab_i[None])[0]

    psg = torch.func.vmap(torch.func.grad(s), in_dims=(None, 0, 0), chunk_size=chunk)
    grads = psg(target, ids, labels)
    grams = reference_model_grams(model, grads, specs).float()
    del grads
    return torch.linalg.eigvalsh(grams)[..., -1]


def mat_kernels_lambdas(model, ids, labels, specs, **kw):
    res = mk.model_lambda_max(model, ids, labels=labels, specs=specs, check_finite=False, **kw)
    return res.values.cpu(), res


def train_step(model, ids, labels, specs, capture: bool, **kw):
    n = ids.shape[0]
    model.zero_grad(set_to_none=True)
    if capture:
        with mk.capture_lambda_max(model, specs, loss_scale=1 / n, check_finite=False, **kw) as cap:
            logits = model(ids).logits
            loss = -per_sample_output("logprob", logits, labels).mean()
            loss.backward()
        return cap.lambda_max()
    logits = model(ids).logits
    loss = -per_sample_output("logprob", logits, labels).mean()
    loss.backward()
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 layers, d=64, n=4, T=16")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--backend", default="auto", choices=("auto", "triton", "torch"))
    ap.add_argument("--func-chunk", type=int, default=8, help="torch_func: samples per vmap chunk (memory)")
    ap.add_argument("--skip-torch-func", action="store_true")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=768, help="d (heads of 64, FFN 4d)")
    ap.add_argument("--vocab", type=int, default=30522)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="CPU: providers timed in this many interleaved rounds (medians), not one after another")
    ap.add_argument("--csv", default=None)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    if a.quick:
        layers, d, heads, ffn, vocab, n, T = 2, 64, 4, 256, 500, 4, 16
    else:
        layers, d, heads, ffn, vocab, n, T = a.layers, a.hidden, a.hidden // 64, 4 * a.hidden, a.vocab, a.n, a.seq_len
    torch.backends.cuda.matmul.allow_tf32 = False
    warnings.filterwarnings("ignore", message="mat_kernels: Triton kernels unavailable")
    model = build_bert(layers, d, heads, ffn, vocab, max(T, 16), device, dtype)
    ids, labels = make_batch(n, T, vocab, device)
    specs = mk.discover_modules(model).specs
    kw = {"backend": a.backend}
    env = {**_harness.env_row(device), "op": "model_lambda_max"}
    date, commit, dev = env["date"], env["git_commit"], env["device"]
    print(f"# bench_model_lambda_max {date} commit {commit} device {dev} torch {torch.__version__}")
    print(f"# BERT: {layers} layers, d={d}, {heads} heads, FFN {ffn}, vocab {vocab}; n={n}, T={T}, {a.dtype}; "
          f"{len(specs)} modules")
    rows = []
    lam_mk, res = mat_kernels_lambdas(model, ids, labels, specs, **kw)
    lam_ref = None
    if not a.skip_torch_func:
        lam_ref = torch_func_lambdas(model, ids, labels, specs, a.func_chunk).double().cpu()

    def err(lam):
        if lam_ref is None:
            return None
        return ((lam.double().cpu() - lam_ref).abs() / lam_ref.abs()).max().item()

    fns = {"mat_kernels": lambda: mat_kernels_lambdas(model, ids, labels, specs, **kw),
           "plain": lambda: train_step(model, ids, labels, specs, False),
           "capture": lambda: train_step(model, ids, labels, specs, True, **kw)}
    if not a.skip_torch_func:
        fns["torch_func"] = lambda: torch_func_lambdas(model, ids, labels, specs, a.func_chunk)
    if a.rounds and device.type == "cpu":
        times = _harness.interleaved_ms(fns, a.rounds)
    else:
        times = {k: _harness.time_ms(f, device, quick=a.quick, min_reps=3 if a.quick else 10, budget_s=0)[0]
                 for k, f in fns.items()}
    t = times["mat_kernels"]
    peak = _harness.peak_extra_mib(lambda: mat_kernels_lambdas(model, ids, labels, specs, **kw), device)
    rows.append(("mat_kernels", res.backend, t, peak, err(lam_mk)))
    t_plain, t_cap = times["plain"], times["capture"]
    rows.append(("train_step_plain", "-", t_plain, None, None))
    rows.append(("train_step_with_capture", res.backend, t_cap, None, None))
    rows.append(("mat_kernels_train_step_overhead", res.backend, [c - p for c, p in zip(t_cap, t_plain)], None, None))
    if not a.skip_torch_func:
        t = times["torch_func"]
        peak = _harness.peak_extra_mib(lambda: torch_func_lambdas(model, ids, labels, specs, a.func_chunk), device)
        rows.append(("torch_func", "torch", t, peak, 0.0))
    model.zero_grad(set_to_none=True)
    print("| provider | backend | median ms | p20 ms | p80 ms | peak extra MiB | max rel λ diff vs torch_func |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, backend, (med, p20, p80), mem, e in rows:
        print(f"| {name} | {backend} | {med:.2f} | {p20:.2f} | {p80:.2f} | {'-' if mem is None else f'{mem:.0f}'} | "
              f"{'-' if e is None else f'{e:.1e}'} |")
    if not a.skip_torch_func:
        print(f"speed-up mat_kernels vs torch_func: {rows[-1][2][0] / rows[0][2][0]:.2f}x")
    print(f"mat_kernels / plain forward + backward: {times['mat_kernels'][0] / t_plain[0]:.2f}x; capture adds "
          f"{100 * (t_cap[0] / t_plain[0] - 1):.0f}% to the step")
    if a.csv:
        _harness.upsert_csv(a.csv, [{**env, "layers": layers, "d": d, "vocab": vocab, "n": n, "T": T, "dtype": a.dtype,
                                     "provider": name, "backend": backend, "median_ms": med, "p20_ms": p20,
                                     "p80_ms": p80, "peak_extra_mib": mem, "max_rel_diff": e,
                                     "shape": f"bert_l{layers}_d{d}_v{vocab}_n{n}_t{T}"}
                                    for name, backend, (med, p20, p80), mem, e in rows])
    bad = lam_ref is not None and err(lam_mk) > (1e-3 if a.dtype == "fp32" else 5e-2)
    if bad:
        print("ERROR: mat_kernels and torch_func disagree")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
