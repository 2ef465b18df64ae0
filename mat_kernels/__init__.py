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
* :class:`WeightBlocks` (also named ``LayerBlocks`` and ``SparseLayout``): the one representation of which ranges of
  a weight belong to which module, used by the layer entry points, the capture, the sparse layers and the optimizer.
* :func:`discover_modules`, :class:`ModuleSpec`, :class:`ParamSlice`, :func:`register_layout`,
  :func:`group_by_weight` (module slices grouped by weight into :class:`WeightBlocks`): MAT modules of a
  model (attention heads in separate or fused projections, FFN blocks, conv layers, experts) and custom ones.
* :func:`sparse_update_linear`, :class:`SparseUpdateLinear` (and :class:`SparseUpdateConv1D` for
  GPT-2's ``Conv1D``): a linear layer whose backward
  computes dX in full and dW/db only for active blocks (C++/CUDA extension ``mat_kernels._C``).
* :mod:`mat_kernels.reference`: float64 oracles (per-sample gradients by autograd, explicit Grams).

``python -m mat_kernels`` prints what is usable on this machine.
"""
import sys as _sys

from mat_kernels.measure.blocks import LayerBlocks, WeightBlocks, fused_qkv_heads, resolve_blocks
from mat_kernels.measure.layer import (
    DEFAULT_SKETCH_SIZE,
    GramOptions,
    GramResult,
    estimate_lambda_max,
    layer_grams,
    route_costs,
)
from mat_kernels.measure.result import LambdaMaxResult
from mat_kernels.measure.solvers import lambda_max
from mat_kernels.measure.discovery import (
    Discovery,
    ModuleSpec,
    ParamSlice,
    discover_modules,
    group_by_weight,
    register_layout,
)
from mat_kernels.measure.capture import capture_lambda_max
from mat_kernels.measure.model import ModelLambdaMax, model_lambda_max
from mat_kernels.train.controller import MAT
from mat_kernels.train.prune import lowest_heads, prune_heads
from mat_kernels.integrations import hf  # noqa: F401  (Hugging Face Trainer integration; transformers imported on use)
from mat_kernels.testing import reference  # noqa: F401
from mat_kernels.train import flops, optim  # noqa: F401
from mat_kernels.nn.sparse_linear import SparseLayout, SparseUpdateConv1D, SparseUpdateLinear, sparse_update_linear
from mat_kernels.nn.sparse_mha import SparseUpdateMHAWeight

__version__ = "0.2.0"

# The documented short paths of four modules (mat_kernels.hf.with_mat, mat_kernels.optim.FrozenSliceOptimizer, ...)
# stay first-class names of their tier modules; other old paths warn (mat_kernels/_compat.py).
for _short, _module in (("hf", hf), ("reference", reference), ("flops", flops), ("optim", optim)):
    _sys.modules[f"{__name__}.{_short}"] = _module
del _short, _module

# Old module attributes (mk.policy, mk.estimate, ...): imported through their deprecated paths, which warn.
_MOVED = ("estimate", "solvers", "blocks", "modules", "capture", "model", "layouts", "sparse_linear", "mat", "policy",
          "prune", "torch_impl")


def __getattr__(name: str):
    if name in _MOVED:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "estimate_lambda_max",
    "layer_grams",
    "lambda_max",
    "fused_qkv_heads",
    "model_lambda_max",
    "MAT",
    "prune_heads",
    "lowest_heads",
    "ModelLambdaMax",
    "capture_lambda_max",
    "discover_modules",
    "group_by_weight",
    "WeightBlocks",
    "register_layout",
    "ModuleSpec",
    "ParamSlice",
    "Discovery",
    "resolve_blocks",
    "route_costs",
    "LayerBlocks",
    "GramOptions",
    "GramResult",
    "LambdaMaxResult",
    "DEFAULT_SKETCH_SIZE",
    "sparse_update_linear",
    "SparseUpdateLinear",
    "SparseUpdateConv1D",
    "SparseUpdateMHAWeight",
    "SparseLayout",
    "__version__",
]
