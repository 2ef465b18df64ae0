"""Tolerances, stated once per op and dtype, used by the tests and the benchmarks. Norm-wise relative error
against the float64 oracle on the same inputs (fresh random data; no TF32 unless said).

* Grams and λmax (``segment_grams``, ``estimate_lambda_max``, ``model_lambda_max``): long fp32 reductions (K up to
  millions of products, split into float64-summed pieces): ``GRAM_RTOL[float32] = 1e-5`` (issue 2's bound, measured
  ≤ 1e-6); TF32 dots round operands to 10 mantissa bits: ``GRAM_RTOL["tf32"] = 2e-3``; whole models in fp32
  against float64 whole-model per-sample gradients: ``MODEL_RTOL = 1e-5`` (measured ≤ 7e-7).
* Sparse-update gradients (``sparse_weight_grad``, ``sparse_bias_grad``, ``sparse_input_grad``): short dot products
  (~1e-7 of fp32 rounding): ``SPARSE_GRAD_RTOL[float32] = 1e-6``, ``[float64] = 1e-12``; bfloat16 against the same
  op in float32 on the same bf16-valued inputs: ``[bfloat16] = 1e-2``.
* λmax of a model measured under autocast against the fp32 λmax of the same weights and batch
  (``capture_lambda_max``, ``model_lambda_max``, ``MAT``): the whole forward and backward round to 16 bits in every
  layer (unit roundoff 2⁻⁹ for bfloat16, 2⁻¹² for float16) and ReLU gates can flip on rounding. Norm-wise over the
  modules, measured on HF BERT, GPT-2, Llama (grouped-query attention) and a CNN, 3 seeds: ≤ 2.6e-2 (bf16, the
  CNN; ≤ 6e-3 on the transformers) and ≤ 1.0e-2 (fp16); stated as ``AUTOCAST_RTOL = {bfloat16: 5e-2,
  float16: 2e-2}``. The Gram of what the 16-bit GEMM multiplied is exact to fp32 accumulation (``GRAM_RTOL``).
* The frozen-slice optimizer step against torch's optimizer run on one block alone: bit for bit with the loop and
  foreach implementations. torch's fused CPU kernels (``_fused_adam_``, ``_fused_adamw_``, ``_fused_sgd_``) round
  differently in their vectorised body and their scalar tail, so the bits of a block's update depend on where the
  block falls in the tensor it is updated with (alone, merged with neighbours that took as many steps, or in its
  whole tensor): max |error| / max |value| per block and tensor, measured ≤ 1.14e-7 (one fp32 ulp; SGD, Adam,
  AdamW, amsgrad, maximize, 12 steps of freezing and thawing); stated as ``FUSED_RTOL = 2.4e-7`` (two ulp).
  The masked Adam kernel (``kernels/triton_masked_adam.py``, fp32 arithmetic, IEEE sqrt and division) against a
  float64 Adam step, norm-wise per run and state tensor: measured ≤ 8.1e-8 in Triton's CPU interpreter (odd shapes,
  Adam/AdamW, amsgrad, maximize); its bias corrections use ``exp2``, approximate on a GPU, which moves the update
  (lr-sized against the parameter) by ~1e-6 of itself; stated as ``MASKED_ADAM_RTOL = 2.4e-7``. Against torch's
  optimizer on each block alone it is held to ``FUSED_RTOL``, like torch's own fused kernels.
* Training with permuted heads (``MAT(permute_heads=True)``) against the same training unpermuted, float64, AdamW:
  reordering rows changes only the summation order inside the GEMMs' blocking, and Adam divides near-zero gradients
  (BERT's key bias: exactly zero in exact arithmetic) by ``√v + ε``; max |a − b| / max(max |b|, 1) per tensor over six
  steps and three decisions, measured ≤ 1.3e-11 (own fused QKV, HF BERT, Llama grouped-query, nn.MultiheadAttention);
  stated as ``PERMUTED_RTOL[float64] = 1e-9``. End to end in fp32 (λ captured from the training backward, decisions
  by threshold, SGD with momentum: in fp32 Adam turns rounding-level gradients of entries whose exact gradient is 0
  into steps of ~lr·noise/ε that differ between any two summation orders): λ and parameters ≤ 1.8e-7, stated as
  ``PERMUTED_RTOL[float32] = 1e-6``.
"""
import torch

GRAM_RTOL = {torch.float32: 1e-5, "tf32": 2e-3}
MODEL_RTOL = 1e-5
SPARSE_GRAD_RTOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2}
AUTOCAST_RTOL = {torch.bfloat16: 5e-2, torch.float16: 2e-2}
FUSED_RTOL = 2.4e-7
MASKED_ADAM_RTOL = 2.4e-7
PERMUTED_RTOL = {torch.float64: 1e-9, torch.float32: 1e-6}

__all__ = ["GRAM_RTOL", "MODEL_RTOL", "SPARSE_GRAD_RTOL", "AUTOCAST_RTOL", "FUSED_RTOL", "MASKED_ADAM_RTOL",
           "PERMUTED_RTOL"]

