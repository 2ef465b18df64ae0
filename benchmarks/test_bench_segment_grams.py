"""pytest-benchmark microbenchmarks of per-module λmax on one BERT-base-width encoder layer, plus smoke runs of
the GPU benchmark scripts so they cannot rot.

The CI test command runs these once each with ``--benchmark-disable`` (as tests: every provider's λmax is checked
against the float64 oracle). To measure::

    python -m pytest benchmarks -k microbench --benchmark-enable --benchmark-columns=median,iqr,rounds

On CPU the mat_kernels providers time the PyTorch backend (``backend="torch"``), on CUDA the Triton kernels.
Shape: d = 768, 12 heads, FFN 3072 (25 modules), n = 8 samples, T = 32 tokens: the real layer widths at a batch
small enough for a 2-core CI machine.
"""
import functools

import bench_segment_grams as blm
import pytest
import sketch_curve
import torch

from mat_kernels.testing.tolerances import GRAM_RTOL

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SHAPE = blm.Shape("bert_base_layer_n8_t32", n=8, T=32)
PROVIDERS = ["torch_func", "einsum", "ghost_einsum", "mat_kernels_psg", "mat_kernels_ghost", "mat_kernels_auto",
             "mat_kernels_sketch"]


@functools.lru_cache(maxsize=1)
def _workload_and_oracle():
    inputs = blm.make_inputs(SHAPE, torch.float32, DEVICE, seed=0)
    ref = blm.oracle_lambda_max(SHAPE, inputs, torch.device("cpu"))
    wl = blm.Workload(SHAPE, torch.float32, DEVICE, inputs, blm.layer_linears(SHAPE),
                      backend="auto" if DEVICE.type == "cuda" else "torch")
    return wl, ref


@pytest.mark.parametrize("provider", PROVIDERS)
def test_microbench_segment_grams(benchmark, provider):
    wl, ref = _workload_and_oracle()
    prov = next(p for p in blm.PROVIDERS if p.name == provider)
    fn = prov.make(wl)
    benchmark.group = f"lambda_max {SHAPE.name} fp32 {DEVICE.type}"
    lam = benchmark(fn).double().cpu()
    assert lam.shape == ref.shape == (blm.num_modules(SHAPE),)
    err = ((lam - ref).abs() / ref).max().item()
    assert err <= TOLERANCE[provider], err


# Relative λmax error vs the float64 oracle, max over the 25 modules, fp32 inputs:
# - mat_kernels exact routes: the 1e-5 (measured here: ≤ 6e-7);
# - torch_func / einsum: a user's fp32 Gram J Jᵀ over K ≈ 2.4M products (FFN) accumulates ~√K·ε (measured 2.3e-4):
#   these are the baselines as written, their error is a column of the benchmark, 1e-3 only catches breakage;
# - ghost_einsum sums T² = 1024 products of short dots (measured 1.7e-6);
# - the sketch is approximate: ~4% median at the default k on this width (docs/sketch_accuracy.md, measured max 4.3%
#   here); 15% bounds its worst module.
_EXACT = GRAM_RTOL[torch.float32]  # mat_kernels/testing/tolerances.py
TOLERANCE = {"torch_func": 1e-3, "einsum": 1e-3, "ghost_einsum": _EXACT, "mat_kernels_psg": _EXACT,
             "mat_kernels_ghost": _EXACT, "mat_kernels_auto": _EXACT, "mat_kernels_sketch": 0.15}


def test_bench_segment_grams_script_smoke(capsys, tmp_path):
    """The GPU benchmark's CPU smoke mode runs every provider and writes its CSV."""
    csv = tmp_path / "out.csv"
    rc = blm.main(["--quick", "--device", "cpu", "--dtypes", "fp32", "--backend", "torch", "--csv", str(csv)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "| bert_base_layer_n4_t16 | fp32 | mat_kernels_auto |" in out
    rows = csv.read_text().splitlines()
    assert rows[0].startswith("date,op,device") and len(rows) == 1 + len(blm.PROVIDERS)
    # a rerun replaces its rows (CSV upsert keyed by op, provider, shape, dtype, device), a new shape adds rows
    assert blm.main(["--quick", "--device", "cpu", "--dtypes", "fp32", "--backend", "torch", "--providers",
                     "mat_kernels_auto", "--csv", str(csv)]) == 0
    assert len(csv.read_text().splitlines()) == 1 + len(blm.PROVIDERS)


def test_bench_costs_table(capsys):
    assert blm.main(["--costs", "--shapes", "bert_base_layer_n32_t128"]) == 0
    assert "floor ms" in capsys.readouterr().out


def test_sketch_curve_script_smoke(capsys):
    sketch_curve.main(["--device", "cpu", "--backend", "torch", "--n", "4", "--seq-len", "8", "--seeds", "1",
                       "--sizes", "64"])
    out = capsys.readouterr().out
    assert "| gaussian | 64 |" in out and "| lowrank | 64 |" in out


def test_bench_model_lambda_max_script_smoke(capsys, tmp_path):
    """The 12-layer BERT-base benchmark's CPU smoke mode (2 small layers) runs, and mat_kernels agrees with
    torch.func (the script exits non-zero otherwise)."""
    pytest.importorskip("transformers")
    import bench_model_lambda_max

    csv = tmp_path / "model.csv"
    rc = bench_model_lambda_max.main(["--quick", "--device", "cpu", "--backend", "torch", "--csv", str(csv)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "| mat_kernels | torch |" in out and "| torch_func | torch |" in out
    assert len(csv.read_text().splitlines()) == 1 + 5
