"""The shared oracle runner: λmax of every module :func:`mat_kernels.model_lambda_max` finds, against float64
whole-model per-sample gradients (``torch.func``, or one backward per sample) sliced per module spec, explicit
Grams and ``eigvalsh``. Every layout family's test calls :func:`run_and_check` (the pattern of opacus'
``tests/grad_samples/common.py``), which runs each case through the PyTorch backend and the Triton kernels (in
Triton's CPU interpreter on a machine without a GPU) against one oracle.

Tolerance: the model runs in fp32 (forward, backward and Grams), the oracle in float64. Relative λmax error per
module ≤ MODEL_RTOL = 1e-5 (measured on these models: ≤ 7e-7).
"""
import torch

import mat_kernels as mk
from mat_kernels import backend as _backend
from mat_kernels.measure.model import per_sample_output, projection_vectors
from mat_kernels.testing.reference import model_per_sample_grads, reference_model_grams
from mat_kernels.testing.tolerances import MODEL_RTOL  # noqa: F401  (the tests import it from here)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


def oracle(model, inputs, labels, specs, *, output="logprob", causal=False, v=None, loss_fn=None, method="vmap"):
    """float64 λmax per spec from whole-model torch.func per-sample gradients of the same s_i."""
    names = sorted({p for s in specs for p in s.param_names()})
    if labels is None:
        batch = inputs
    else:
        batch = {**inputs, "labels": labels} if isinstance(inputs, dict) else (inputs, labels)

    def s_fn(f, b):
        if labels is None:
            out, lab = f(b), None
        elif isinstance(b, dict):
            lab = b["labels"]
            out = f({k: t for k, t in b.items() if k != "labels"})
        else:
            out, lab = f(b[0]), b[1]
        vv = None if v is None else v.double()
        return per_sample_output(output, _logits(out), lab, causal=causal, v=vv, loss_fn=loss_fn, batch=None)[0]

    grads = model_per_sample_grads(model, batch, s_fn, names, method=method)
    return torch.linalg.eigvalsh(reference_model_grams(model, grads, specs))[..., -1]


def assert_matches(res, lam_ref, rtol=MODEL_RTOL):
    got = res.values.double().cpu()
    assert got.shape == lam_ref.shape
    err = ((got - lam_ref).abs() / lam_ref.abs()).max().item()
    assert err <= rtol, (err, dict(zip(res.names, ((got - lam_ref).abs() / lam_ref).tolist())))


def backends() -> tuple[str, ...]:
    """The Gram backends a model-level case runs through: PyTorch always, and the Triton kernels where they run on
    the tests' CPU tensors (Triton's interpreter, as in CI)."""
    return ("torch", "triton") if _backend.triton_mode()[0] == "interpreter" else ("torch",)


def run_and_check(model, inputs, labels, *, output="logprob", **kw):
    """Every backend of :func:`backends` against one float64 oracle; the PyTorch backend's result is returned."""
    results = [mk.model_lambda_max(model, inputs, labels=labels, output=output, backend=b, **kw) for b in backends()]
    v = None
    if output == "projection":
        with torch.no_grad():
            shape = _logits(model(inputs))[0].shape
        v = projection_vectors(tuple(shape), 1, kw.get("seed", 0), "cpu")[0]
    lam_ref = oracle(model, inputs, labels, results[0].specs, output=output, causal=kw.get("causal", False), v=v,
                     loss_fn=kw.get("loss_fn"))
    for b, res in zip(backends(), results):
        assert res.backend.startswith(b), (b, res.backend)  # "triton-interpreter" in CI
        assert_matches(res, lam_ref)
    return results[0]
