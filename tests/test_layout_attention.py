"""Layouts ``separate_qkv`` and ``fused_qkv`` (mat_kernels/layouts/attention.py): attention of the common model
families, discovered from class, config or explicit attributes (never from shape divisibility), measured with the
shared oracle runner (tests/oracle.py), gated by MAT."""
import math

import pytest
import torch
import torch.nn as nn
from helpers import assert_moved_iff_active
from models import HF_COMMON as _COMMON
from models import hf_family
from oracle import _gen, assert_matches, oracle, run_and_check

import mat_kernels as mk

transformers = pytest.importorskip("transformers")

# (family, attention module, modules per attention with out_proj="separate", kind of its Q/K/V modules)
FAMILIES = [
    ("llama", "model.layers.0.self_attn", 2 + 4, "head_group"),
    ("mistral", "model.layers.0.self_attn", 2 + 4, "head_group"),
    ("qwen2", "model.layers.0.self_attn", 2 + 4, "head_group"),
    ("gemma", "model.layers.0.self_attn", 2 + 4, "head_group"),
    ("phi3", "model.layers.0.self_attn", 2 + 4, "head_group"),
    ("gpt_neox", "gpt_neox.layers.0.attention", 4 + 4, "head"),
    ("bloom", "transformer.h.0.self_attention", 4 + 4, "head"),
    ("falcon", "transformer.h.0.self_attention", 4 + 4, "head"),
]


@pytest.mark.parametrize("family,attn,count,kind", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_hf_family_attention_matches_the_oracle(family, attn, count, kind):
    torch.manual_seed(11)
    model = hf_family(family)
    disc = mk.discover_modules(model)
    mine = [s for s in disc.specs if s.name.startswith(attn + ".")]
    assert len(mine) == count and {s.kind for s in mine} == {kind, "head_out"}
    # every linear weight is a module or said to be something else than an unknown layout, except the LM head
    bad = {k: v for k, v in disc.unclaimed.items() if "unrecognised" in v and "lm_head" not in k}
    assert not bad, bad
    assert any(s.kind == "ffn" for s in disc.specs)
    ids = torch.randint(0, 40, (3, 7), generator=_gen(1))
    if family == "bloom":  # its GELU is an autograd.Function without setup_context: the oracle cannot vmap it
        res = mk.model_lambda_max(model, ids, labels=ids, causal=True, backend="torch")
        assert_matches(res, oracle(model, ids, ids, res.specs, causal=True, method="loop"))
    else:
        run_and_check(model, ids, ids, causal=True)


def test_gqa_group_owns_its_kv_rows_and_the_q_rows_of_its_heads():
    model = hf_family("qwen2")
    specs = {s.name: s for s in mk.discover_modules(model, out_proj="merge").specs}
    g1 = specs["model.layers.0.self_attn.group1"]
    hd = 4  # 16 / 4 heads; 2 key/value heads of 4 rows each
    got = {sl.weight.split(".")[-2]: (sl.axis, sl.ranges, sl.bias is not None) for sl in g1.slices}
    assert got == {"q_proj": ("rows", ((2 * hd, 2 * hd),), True), "k_proj": ("rows", ((hd, hd),), True),
                   "v_proj": ("rows", ((hd, hd),), True), "o_proj": ("cols", ((2 * hd, 2 * hd),), False)}


def test_gpt2_cross_attention_is_q_attn_plus_kv():
    """n_embd 48 with 4 heads: 2·48 is divisible by 3·4, the shape alone would have made fake [Q; K; V] heads."""
    torch.manual_seed(5)
    cfg = transformers.GPT2Config(vocab_size=40, n_embd=48, n_layer=1, n_head=4, n_positions=16, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, add_cross_attention=True,
                                  attn_implementation="eager", bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    disc = mk.discover_modules(model)
    assert not disc.unclaimed.get("transformer.h.0.crossattention.q_attn.weight")
    head = next(s for s in disc.specs if s.name == "transformer.h.0.crossattention.head1")
    got = [(sl.weight.split(".")[-2], sl.ranges) for sl in head.slices]
    assert got == [("q_attn", ((12, 12),)), ("c_attn", ((12, 12),)), ("c_attn", ((60, 12),))]
    assert "transformer.h.0.crossattention.head1.out" in disc.names()
    ids = torch.randint(0, 40, (3, 5), generator=_gen(2))
    enc = torch.randn(3, 4, 48, generator=_gen(3))
    run_and_check(model, {"input_ids": ids, "encoder_hidden_states": enc}, ids, causal=True)


# ---------------------------------------------------------------------------------------------------------------
# own modules: stated attributes, or left unclaimed with the reason
# ---------------------------------------------------------------------------------------------------------------
class OwnGQA(nn.Module):
    """Grouped-query attention with separate projections; query head h reads key/value head h // (heads / kv)."""

    def __init__(self, d=12, heads=4, kv_heads=2, state_kv=True):
        super().__init__()
        self.num_heads, self.hd, self.kv = heads, d // heads, kv_heads
        if state_kv:
            self.num_key_value_heads = kv_heads
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, kv_heads * self.hd)
        self.v_proj = nn.Linear(d, kv_heads * self.hd)
        self.o_proj = nn.Linear(d, d)

    def forward(self, x):
        n, T, _ = x.shape
        q = self.q_proj(x).view(n, T, self.num_heads, self.hd).transpose(1, 2)
        k, v = (p(x).view(n, T, self.kv, self.hd).transpose(1, 2) for p in (self.k_proj, self.v_proj))
        r = self.num_heads // self.kv
        k, v = k.repeat_interleave(r, dim=1), v.repeat_interleave(r, dim=1)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.hd), -1) @ v
        return self.o_proj(a.transpose(1, 2).reshape(n, T, -1))


class OwnPerHead(nn.Module):
    """A fused QKV laid out per head, [q_h; k_h; v_h] (GPT-NeoX style)."""

    def __init__(self, d=12, heads=3, layout="per_head"):
        super().__init__()
        self.heads = heads
        if layout is not None:
            self.qkv_layout = layout
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        n, T, d = x.shape
        q, k, v = self.qkv(x).view(n, T, self.heads, 3 * d // self.heads).transpose(1, 2).chunk(3, dim=-1)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1) @ v
        return self.proj(a.transpose(1, 2).reshape(n, T, d))


class Classifier(nn.Module):
    def __init__(self, attn, d=12, classes=5):
        super().__init__()
        self.attn, self.head = attn, nn.Linear(d, classes)

    def forward(self, x):
        return self.head(torch.tanh(self.attn(x))).mean(1)


def test_own_gqa_with_stated_kv_heads_matches_the_oracle():
    torch.manual_seed(3)
    model = Classifier(OwnGQA())
    x, y = torch.randn(4, 5, 12, generator=_gen(4)), torch.tensor([0, 3, 1, 4])
    res = run_and_check(model, x, y)
    assert [n for n in res.names if "group" in n] == ["attn.group0", "attn.group1"]


def test_own_gqa_without_kv_heads_is_unclaimed_with_the_reason():
    disc = mk.discover_modules(Classifier(OwnGQA(state_kv=False)), exclude=None)
    assert not [s for s in disc.specs if s.name.startswith("attn.")]
    assert "num_key_value_heads" in disc.unclaimed["attn.k_proj.weight"]
    with pytest.raises(ValueError, match="matches none"):  # include= cannot pair heads with the wrong K/V rows
        mk.discover_modules(Classifier(OwnGQA(state_kv=False)), include=["attn.head1"])


def test_own_per_head_fused_qkv_matches_the_oracle():
    torch.manual_seed(4)
    model = Classifier(OwnPerHead())
    spec = next(s for s in mk.discover_modules(model).specs if s.name == "attn.head1")
    assert [(sl.weight, sl.ranges) for sl in spec.slices] == [("attn.qkv.weight", ((12, 12),))]
    x, y = torch.randn(4, 5, 12, generator=_gen(5)), torch.tensor([1, 0, 2, 2])
    run_and_check(model, x, y)


def test_own_fused_qkv_without_a_stated_layout_is_unclaimed():
    disc = mk.discover_modules(Classifier(OwnPerHead(layout=None)))
    assert not [s for s in disc.specs if s.name.startswith("attn.head")]
    assert "qkv_layout" in disc.unclaimed["attn.qkv.weight"]
    with pytest.raises(ValueError, match="qkv_layout must be one of"):
        mk.discover_modules(Classifier(OwnPerHead(layout="interleaved")))


@pytest.mark.parametrize("arch,groups", [("multi_query", 1), ("new_decoder", 2)])
def test_falcon_multi_query_and_new_decoder_layouts(arch, groups):
    """Falcon's other fused layouts: multi-query [Q (all heads); k; v] (one key/value head) and the new decoder's
    per-group [q_g1 .. q_gr; k_g; v_g]; both checked against the oracle."""
    torch.manual_seed(16)
    kw = dict(multi_query=True, new_decoder_architecture=False) if arch == "multi_query" else \
        dict(multi_query=False, new_decoder_architecture=True, num_kv_heads=2)
    model = transformers.FalconForCausalLM(transformers.FalconConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=4, attn_implementation="eager",
        **kw)).eval()
    disc = mk.discover_modules(model)
    names = [s.name for s in disc.specs if s.kind == "head_group"]
    assert names == [f"transformer.h.0.self_attention.group{g}" for g in range(groups)]
    ids = torch.randint(0, 40, (3, 6), generator=_gen(17))
    run_and_check(model, ids, ids, causal=True)


# ---------------------------------------------------------------------------------------------------------------
# MAT on a GQA model: sparse updates, frozen groups stay frozen, nothing merely masked
# ---------------------------------------------------------------------------------------------------------------
def test_mat_gates_gqa_groups_with_sparse_updates():
    torch.manual_seed(0)
    model = hf_family("qwen2").train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = _gen(7)
    batches = [torch.randint(0, 40, (6, 8), generator=g) for _ in range(6)]
    probe = torch.randint(0, 40, (6, 8), generator=g)
    mat = mk.MAT(model, opt, warmup_steps=0, interval=1, patience=1, probe=({"input_ids": probe}, probe),
                 lambda_kwargs={"backend": "torch", "causal": True})
    assert mat.report()["masked_weights"] == []
    assert {s.kind for s in mat.specs} >= {"head_group", "head_out", "ffn"}
    params = dict(model.named_parameters())
    froze = False
    for ids in batches:
        before = {k: v.detach().clone() for k, v in params.items()}
        active = mat.active.clone()
        mat.backward(model(input_ids=ids, labels=ids).loss)
        mat.step()
        mat.zero_grad()
        froze |= assert_moved_iff_active(mat.specs, params, before, active)
    assert froze


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_prune_a_gqa_group_then_measure_again(family):
    torch.manual_seed(1)
    model = hf_family(family)
    ids = torch.randint(0, 40, (3, 7), generator=_gen(8))
    assert mk.lowest_heads({"model.layers.0.self_attn.group0": 1.0, "model.layers.0.self_attn.group1": 2.0},
                           0.5) == ["model.layers.0.self_attn.group0"]
    assert mk.prune_heads(model, ["model.layers.0.self_attn.group0"]) == {"model.layers.0.self_attn": 1}
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (8, 16) and attn.k_proj.weight.shape == (4, 16)
    assert attn.o_proj.weight.shape == (16, 8)
    model(input_ids=ids)  # the forward still runs (heads reshaped with -1, the same repeat_kv ratio)
    res = run_and_check(model, ids, ids, causal=True)  # discovery reads the counts prune_heads stated
    assert [n for n in res.names if "group" in n] == ["model.layers.0.self_attn.group0"]


@pytest.mark.parametrize("family", ["roberta", "distilbert"])
def test_hf_encoders_match_the_oracle(family):
    torch.manual_seed(12)
    t = transformers
    if family == "roberta":
        model = t.RobertaForMaskedLM(t.RobertaConfig(
            vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
            max_position_embeddings=20, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            attn_implementation="eager", pad_token_id=1, bos_token_id=0, eos_token_id=2))
    else:
        model = t.DistilBertForMaskedLM(t.DistilBertConfig(
            vocab_size=40, dim=16, n_layers=1, n_heads=2, hidden_dim=24, max_position_embeddings=20, dropout=0.0,
            attention_dropout=0.0, attn_implementation="eager", pad_token_id=0))
    model.eval()
    ids = torch.randint(3, 40, (3, 6), generator=_gen(13))
    res = run_and_check(model, ids, ids)
    assert sum(1 for s in res.specs if s.kind == "head") == 2 and any(s.kind == "ffn" for s in res.specs)


def test_timm_attention_recognised_by_exact_class_only():
    """timm's ViT Attention is [Q; K; V]; other timm attentions with a `qkv` child (TinyViT, EfficientFormer) store
    Q/K/V per head and would be mis-sliced by the same shape: they are left unclaimed unless they state it."""
    vit = type("Attention", (OwnPerHead,), {"__module__": "timm.models.vision_transformer"})
    tiny = type("Attention", (OwnPerHead,), {"__module__": "timm.models.tiny_vit"})
    assert [s.name for s in mk.discover_modules(Classifier(vit(layout=None))).specs][:1] == ["attn.head0"]
    disc = mk.discover_modules(Classifier(tiny(layout=None)))
    assert "qkv_layout" in disc.unclaimed["attn.qkv.weight"]


def test_differential_attention_is_unclaimed_with_the_reason():
    model = transformers.DiffLlamaForCausalLM(transformers.DiffLlamaConfig(**dict(_COMMON, num_key_value_heads=2)))
    disc = mk.discover_modules(model)
    assert "differential attention" in disc.unclaimed["model.layers.0.self_attn.v_proj.weight"]
    assert not [s for s in disc.specs if ".self_attn." in s.name]


@pytest.mark.parametrize("family", ["phi3", "bloom"])
def test_prune_refuses_attention_shaped_by_the_config_and_changes_nothing(family):
    model = hf_family(family)
    before = {k: v.shape for k, v in model.state_dict().items()}
    head = next(s.name for s in mk.discover_modules(model, out_proj="merge").specs if s.kind in ("head", "head_group"))
    with pytest.raises(ValueError, match="cannot be pruned"):
        mk.prune_heads(model, [head])
    assert {k: v.shape for k, v in model.state_dict().items()} == before


def test_prune_refuses_q_k_norms_over_all_heads():
    """OLMo-2 normalises the whole query/key projection (width heads·head_dim); Qwen3's per-head norms are fine."""
    olmo = transformers.Olmo2ForCausalLM(transformers.Olmo2Config(**dict(_COMMON, num_key_value_heads=2)))
    with pytest.raises(ValueError, match="q_norm normalises all heads together"):
        mk.prune_heads(olmo, ["model.layers.0.self_attn.group0"])
    qwen3 = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**dict(_COMMON, num_key_value_heads=2)))
    assert mk.prune_heads(qwen3, ["model.layers.0.self_attn.group1"]) == {"model.layers.0.self_attn": 1}
    qwen3(input_ids=torch.randint(0, 40, (2, 5)))
