"""Layout ``ffn``: a feed-forward block's pair (or gated triple) of linears, one MAT module owning their whole
weights and biases: BERT/RoBERTa ``intermediate.dense`` + ``output.dense``, ViT ``fc1``/``fc2``, GPT-2
``c_fc``/``c_proj``, ``nn.TransformerEncoderLayer`` ``linear1``/``linear2``, Llama ``up/gate/down_proj``, Phi-3
``gate_up_proj``/``down_proj``, GPT-NeoX ``dense_h_to_4h``/``dense_4h_to_h``, T5 ``wi``/``wo``, ..."""
from __future__ import annotations

from ..modules import ModuleSpec, _get, _is_linear_like, _whole, register_layout

_FFN_PAIRS = (
    ("intermediate.dense", "output.dense"), ("fc1", "fc2"), ("c_fc", "c_proj"), ("linear1", "linear2"),
    ("ffn_in", "ffn_out"), ("w1", "w2", "w3"), ("up_proj", "down_proj", "gate_proj"), ("wi", "wo"), ("lin1", "lin2"),
    ("dense_h_to_4h", "dense_4h_to_h"), ("gate_up_proj", "down_proj"),
)


@register_layout("ffn")
def _ffn(prefix, mod, model, opts):
    for names in _FFN_PAIRS:
        first = [_get(mod, n) for n in names[:2]]
        if all(_is_linear_like(s) for s in first):
            children = [n for n in names if _is_linear_like(_get(mod, n))]
            slices = tuple(_whole(prefix, mod, c) for c in children)
            return [ModuleSpec(f"{prefix}.ffn" if prefix else "ffn", slices, "ffn")]
    return None
