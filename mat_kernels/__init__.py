"""mat_kernels: kernels for Modular Adaptive Training (MAT, Shi et al., NeurIPS 2023).

Public API:

* :func:`estimate_lambda_max`: λmax of each module's mNTK of one linear layer from its stored input ``x`` and output
  gradient ``dy`` (fused Triton kernels; PyTorch fallback where Triton cannot run).
* :func:`layer_grams`: the per-module Grams themselves, to add Grams of modules spanning several layers.
* :func:`lambda_max`: batched λmax of symmetric matrices (``eigvalsh`` or subspace iteration).
* :func:`fused_qkv_heads`: row ranges of each head inside a fused QKV weight.
* :func:`model_lambda_max`: ``{module name: λmax}`` for every MAT module of a model on one batch (discovery,
  capture hooks, per-layer Grams), with the NTK output chosen explicitly (``logprob``, ``loss``, ``projection``).
* :func:`capture_lambda_max`: the same from a training step's own backward (NTK output = per-sample loss).
* :class:`MAT`: the training controller: scheduled λmax, dynamic threshold, temporal rule, masks pushed into
  sparse-update layers, an optimizer step that keeps frozen slices frozen.
* :class:`WeightBlocks`: the one representation of which ranges of a weight belong to which module, used by the layer
  entry points, the capture, the sparse layers and the optimizer.
* :func:`discover_modules`, :class:`ModuleSpec`, :class:`ParamSlice`, :func:`register_layout`,
  :func:`group_by_weight` (module slices grouped by weight into :class:`WeightBlocks`): MAT modules of a
  model (attention heads in separate or fused projections, FFN blocks, conv layers, experts) and custom ones.
* :func:`sparse_update_linear`, :class:`SparseUpdateLinear` (and :class:`SparseUpdateConv1D` for
  GPT-2's ``Conv1D``): a linear layer whose backward
  computes dX in full and dW/db only for active blocks (C++/CUDA extension ``mat_kernels._C``).
* :mod:`mat_kernels.testing.reference`: float64 oracles (per-sample gradients by autograd, explicit Grams);
  :mod:`mat_kernels.train.optim` (the frozen-slice optimizer step), :mod:`mat_kernels.train.flops` (FLOPs ledger),
  :mod:`mat_kernels.integrations.hf` (Hugging Face ``Trainer``), :mod:`mat_kernels.integrations.lightning`.

``python -m mat_kernels`` prints what is usable on this machine.
"""
from mat_kernels.blocks import WeightBlocks, fused_qkv_heads, resolve_blocks
from mat_kernels.measure.capture import capture_lambda_max
from mat_kernels.measure.discovery import (
    Discovery,
    ModuleSpec,
    ParamSlice,
    discover_modules,
    group_by_weight,
    register_layout,
    unregister_layout,
)
from mat_kernels.measure.layer import (
    DEFAULT_SKETCH_SIZE,
    GramOptions,
    GramResult,
    estimate_lambda_max,
    layer_grams,
)
from mat_kernels.measure.model import model_lambda_max
from mat_kernels.measure.result import LambdaMaxResult
from mat_kernels.measure.solvers import lambda_max
from mat_kernels.nn.sparse_function import sparse_update_linear
from mat_kernels.nn.sparse_linear import SparseUpdateConv1D, SparseUpdateLinear
from mat_kernels.nn.sparse_mha import SparseUpdateMHAWeight
from mat_kernels.ops.gram_dispatch import route_costs
from mat_kernels.train.controller import MAT
from mat_kernels.train.prune import lowest_heads, prune_heads

__version__ = "0.3.0"

__all__ = [
    "estimate_lambda_max",
    "layer_grams",
    "lambda_max",
    "fused_qkv_heads",
    "model_lambda_max",
    "MAT",
    "prune_heads",
    "lowest_heads",
    "capture_lambda_max",
    "discover_modules",
    "group_by_weight",
    "WeightBlocks",
    "register_layout",
    "unregister_layout",
    "ModuleSpec",
    "ParamSlice",
    "Discovery",
    "resolve_blocks",
    "route_costs",
    "GramOptions",
    "GramResult",
    "LambdaMaxResult",
    "DEFAULT_SKETCH_SIZE",
    "sparse_update_linear",
    "SparseUpdateLinear",
    "SparseUpdateConv1D",
    "SparseUpdateMHAWeight",
    "__version__",
]
