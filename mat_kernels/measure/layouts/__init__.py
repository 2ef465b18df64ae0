"""The built-in layouts of :func:`mat_kernels.discover_modules`, one file per family, each registered with
:func:`mat_kernels.register_layout`. Imported (in this order, the order they are tried) by
:mod:`mat_kernels.measure.discovery`.

==================  ==========================  ============================================================
layout              file                        recognises
==================  ==========================  ============================================================
``moe_experts``     :mod:`.moe`                 dense-dispatch experts
``mha``             :mod:`.mha`                 ``nn.MultiheadAttention``
``separate_qkv``    :mod:`.attention`           separate Q/K/V projections (MHA or grouped-query)
``fused_qkv``       :mod:`.attention`           one fused QKV weight whose layout is known
``ffn``             :mod:`.ffn`                 feed-forward blocks
``layer_types``     :mod:`.layer_types`         every layer whose layer type is its own module (``nn.Conv2d``)
==================  ==========================  ============================================================

A new family: a file with a ``@register_layout("name")`` function and a test calling the shared oracle runner
(``tests/oracle.py``: λ of every discovered module against float64 whole-model per-sample gradients).
"""
# the registration order is the order layouts are tried
# isort: off
from mat_kernels.measure.layouts import moe  # noqa: F401
from mat_kernels.measure.layouts import mha  # noqa: F401
from mat_kernels.measure.layouts import attention  # noqa: F401
from mat_kernels.measure.layouts import ffn  # noqa: F401
from mat_kernels.measure.layouts import layer_types  # noqa: F401
# isort: on
