"""Layout ``mha`` (mat_kernels/layouts/mha.py): ``nn.MultiheadAttention`` (packed or kdim/vdim projections,
self- and cross-attention, sequence- or batch-first), measured with the shared oracle runner (tests/oracle.py)."""
import pytest
import torch
from models import DecoderModel, MHAModel
from oracle import _gen, run_and_check


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_model(batch_first):
    torch.manual_seed(4)
    model = MHAModel(batch_first).eval()
    x = torch.randn(3, 6, 8, generator=_gen(7))
    res = run_and_check(model, x, torch.randint(0, 5, (3, 6), generator=_gen(8)))
    assert list(res.names)[:2] == ["enc.layers.0.ffn", "enc.layers.0.self_attn.head0"]
    assert res.unclaimed["enc.layers.0.self_attn.out_proj.bias"].startswith("always trained")


def test_transformer_decoder_matches_the_oracle():
    torch.manual_seed(13)
    model = DecoderModel().eval()
    g = _gen(14)
    x, mem = torch.randn(4, 5, 8, generator=g), torch.randn(4, 3, 8, generator=g)
    res = run_and_check(model, {"x": x, "mem": mem}, torch.tensor([0, 4, 1, 2]))
    assert "dec.layers.0.multihead_attn.head1" in res and "dec.layers.0.self_attn.head0" in res
