"""Layout ``mha`` (mat_kernels/layouts/mha.py): ``nn.MultiheadAttention`` (packed or kdim/vdim projections,
self- and cross-attention, sequence- or batch-first), measured with the shared oracle runner (tests/oracle.py)."""
import pytest
import torch
import torch.nn as nn
from oracle import _gen, run_and_check
from test_model_lambda_max import MHAModel


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_model(batch_first):
    torch.manual_seed(4)
    model = MHAModel(batch_first).eval()
    x = torch.randn(3, 6, 8, generator=_gen(7))
    res = run_and_check(model, x, torch.randint(0, 5, (3, 6), generator=_gen(8)))
    assert list(res.lambda_max)[:2] == ["enc.layers.0.ffn", "enc.layers.0.self_attn.head0"]
    assert res.unclaimed["enc.layers.0.self_attn.out_proj.bias"].startswith("always trained")


class DecoderModel(nn.Module):
    """nn.TransformerDecoder: self-attention (one packed in_proj call) and cross-attention (Q and K/V row views)."""

    def __init__(self, d=8, heads=2, classes=5):
        super().__init__()
        self.dec = nn.TransformerDecoder(nn.TransformerDecoderLayer(d, heads, 12, dropout=0.0, batch_first=True), 1)
        self.head = nn.Linear(d, classes)

    def forward(self, x, mem):
        return self.head(self.dec(x, mem)).mean(1)


def test_transformer_decoder_matches_the_oracle():
    torch.manual_seed(13)
    model = DecoderModel().eval()
    g = _gen(14)
    x, mem = torch.randn(4, 5, 8, generator=g), torch.randn(4, 3, 8, generator=g)
    res = run_and_check(model, {"x": x, "mem": mem}, torch.tensor([0, 4, 1, 2]))
    assert "dec.layers.0.multihead_attn.head1" in res.lambda_max and "dec.layers.0.self_attn.head0" in res.lambda_max
