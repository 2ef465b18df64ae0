"""Layer types: one file per kind of layer (``linear``, ``conv1d``, ``conv2d``, ``mha``), each declaring how to
recognise the layer, its weight's linear-map shape, how the capture sees its calls and puts samples first, and its
sparse-update twin (or that ``requires_grad`` gating applies). A new layer type is one file: subclass
:class:`LayerType` and :func:`register_layer_type` an instance (see ``docs/layer_types.md``)."""
from mat_kernels.layers import conv1d, conv2d, linear, mha  # noqa: F401  (the built-in types, most specific first)
from mat_kernels.layers.base import (
    LayerType,
    layer_type_of,
    layer_types,
    linear_shape,
    register_layer_type,
    unregister_layer_type,
)

__all__ = ["LayerType", "register_layer_type", "unregister_layer_type", "layer_type_of", "layer_types", "linear_shape"]
