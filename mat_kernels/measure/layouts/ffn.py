"""Layout ``ffn``: a feed-forward block's pair (or gated triple) of linears, one MAT module owning their whole
weights and biases: BERT/RoBERTa ``intermediate.dense`` + ``output.dense``, ViT ``fc1``/``fc2``, GPT-2
``c_fc``/``c_proj``, ``nn.TransformerEncoderLayer`` ``linear1``/``linear2``, Llama ``up/gate/down_proj``, Phi-3
``gate_up_proj``/``down_proj``, GPT-NeoX ``dense_h_to_4h``/``dense_4h_to_h``, T5 ``wi``/``wo``, ..."""
from __future__ import annotations

from mat_kernels.measure.layout_registry import register_layout
from mat_kernels.measure.specs import ModuleSpec, get_path, is_linear_like, whole_slice

_FFN_PAIRS = (
    ("intermediate.dense", "output.dense"), ("fc1", "fc2"), ("c_fc", "c_proj"), ("linear1", "linear2"),
    ("ffn_in", "ffn_out"), ("w1", "w2", "w3"), ("up_proj", "down_proj", "gate_proj"), ("wi", "wo"), ("lin1", "lin2"),
    ("dense_h_to_4h", "dense_4h_to_h"), ("gate_up_proj", "down_proj"),
)


@register_layout("ffn")
def _ffn(prefix, mod, model, opts):
    for names in _FFN_PAIRS:
        first = [get_path(mod, n) for n in names[:2]]
        if all(is_linear_like(s) for s in first):
            children = [n for n in names if is_linear_like(get_path(mod, n))]
            slices = tuple(whole_slice(prefix, mod, c) for c in children)
            return [ModuleSpec(f"{prefix}.ffn" if prefix else "ffn", slices, "ffn")]
    return None
