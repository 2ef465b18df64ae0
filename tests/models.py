"""The one model zoo of the tests: small own models (fused-QKV BERT-style LM, nn.Transformer encoder/decoder, a
CNN) and Hugging Face models built from configs (no download), each in eval mode where it matters. Import from
here (``from models import TinyLM``), never from another test file."""
import math

import torch
import torch.nn as nn

try:
    import transformers

    transformers.logging.set_verbosity_error()
except ImportError:  # the tests that need it skip with pytest.importorskip("transformers")
    transformers = None


class FusedBlock(nn.Module):
    """Own BERT-style layer: fused QKV linear (rows [Q; K; V]), output projection, FFN."""

    qkv_layout = "qkv"

    def __init__(self, d, heads, ffn):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.attn_out = nn.Linear(d, d)
        self.ffn_in = nn.Linear(d, ffn)
        self.ffn_out = nn.Linear(ffn, d)
        self.ln = nn.LayerNorm(d)

    def forward(self, h):
        n, T, d = h.shape
        q, k, v = self.qkv(h).view(n, T, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1) @ v
        h = self.ln(h + self.attn_out(a.transpose(1, 2).reshape(n, T, d)))
        return h + self.ffn_out(torch.tanh(self.ffn_in(h)))


class TinyLM(nn.Module):
    def __init__(self, vocab=23, d=12, heads=3, ffn=10, layers=2):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(FusedBlock(d, heads, ffn) for _ in range(layers))
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):
        h = self.emb(ids)
        for b in self.blocks:
            h = b(h)
        return self.head(h)


class MHAModel(nn.Module):
    def __init__(self, batch_first, d=8, heads=2, classes=5):
        super().__init__()
        self.first = batch_first
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(d, heads, 12, dropout=0.0,
                                                                    batch_first=batch_first), 1)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        if not self.first:
            x = x.transpose(0, 1)
        h = self.enc(x)
        return self.head(h if self.first else h.transpose(0, 1))


def small_cnn():
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2, groups=2, bias=False), nn.ReLU(),
        nn.Flatten(), nn.Linear(6 * 3 * 3, 4),
    ).eval()


def hf_bert(layers=2):
    cfg = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
                                  intermediate_size=24, max_position_embeddings=16, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, attn_implementation="eager")
    return transformers.BertForMaskedLM(cfg).eval()


class DecoderModel(nn.Module):
    """nn.TransformerDecoder: self-attention (one packed in_proj call) and cross-attention (Q and K/V row views)."""

    def __init__(self, d=8, heads=2, classes=5):
        super().__init__()
        self.dec = nn.TransformerDecoder(nn.TransformerDecoderLayer(d, heads, 12, dropout=0.0, batch_first=True), 1)
        self.head = nn.Linear(d, classes)

    def forward(self, x, mem):
        return self.head(self.dec(x, mem)).mean(1)


HF_COMMON = dict(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=4,
               max_position_embeddings=32, attn_implementation="eager")


def hf_family(family: str) -> nn.Module:
    """A one-layer causal LM of a Hugging Face family (GQA ones with 2 key/value heads for 4 query heads)."""
    t = transformers
    gqa = dict(HF_COMMON, num_key_value_heads=2)
    builders = {
        "llama": lambda: t.LlamaForCausalLM(t.LlamaConfig(**gqa)),
        "mistral": lambda: t.MistralForCausalLM(t.MistralConfig(**gqa)),
        "qwen2": lambda: t.Qwen2ForCausalLM(t.Qwen2Config(**gqa)),  # q/k/v biases
        "gemma": lambda: t.GemmaForCausalLM(t.GemmaConfig(**gqa, head_dim=6)),  # head_dim != hidden / heads
        "phi3": lambda: t.Phi3ForCausalLM(t.Phi3Config(**gqa, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
        "gpt_neox": lambda: t.GPTNeoXForCausalLM(t.GPTNeoXConfig(**HF_COMMON)),
        "bloom": lambda: t.BloomForCausalLM(t.BloomConfig(vocab_size=40, hidden_size=16, n_layer=1, n_head=4,
                                                          attn_implementation="eager")),
        "falcon": lambda: t.FalconForCausalLM(t.FalconConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1,
                                                             num_attention_heads=4, multi_query=False,
                                                             new_decoder_architecture=False,
                                                             attn_implementation="eager")),
    }
    return builders[family]().eval()
