"""Tolerances, stated once per op and dtype, used by the tests and the benchmarks. Norm-wise relative error
against the float64 oracle on the same inputs (fresh random data; no TF32 unless said).

* Grams and λmax (``segment_grams``, ``estimate_lambda_max``, ``model_lambda_max``): long fp32 reductions (K up to
  millions of products, split into float64-summed pieces): ``GRAM_RTOL[float32] = 1e-5`` (issue 2's bound, measured
  ≤ 1e-6); TF32 dots round operands to 10 mantissa bits: ``GRAM_RTOL["tf32"] = 2e-3``; whole models in fp32
  against float64 whole-model per-sample gradients: ``MODEL_RTOL = 1e-5`` (measured ≤ 7e-7).
* Sparse-update gradients (``sparse_weight_grad``, ``sparse_bias_grad``, ``sparse_input_grad``): short dot products
  (~1e-7 of fp32 rounding): ``SPARSE_GRAD_RTOL[float32] = 1e-6``, ``[float64] = 1e-12``; bfloat16 against the same
  op in float32 on the same bf16-valued inputs: ``[bfloat16] = 1e-2``.
"""
import torch

GRAM_RTOL = {torch.float32: 1e-5, "tf32": 2e-3}
MODEL_RTOL = 1e-5
SPARSE_GRAD_RTOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2}

__all__ = ["GRAM_RTOL", "MODEL_RTOL", "SPARSE_GRAD_RTOL"]
