"""Model-level λmax (discovery, capture, NTK outputs) against an independent oracle: whole-model per-sample
gradients by torch.func in float64 (mat_kernels.testing.reference.model_per_sample_grads), sliced per module spec,
explicit Grams, eigvalsh.

Tolerance: the model runs in fp32 (forward, backward and Grams), the oracle in float64. Relative λmax error per
module ≤ MODEL_RTOL = 1e-5 (measured on these models: ≤ 7e-7).
"""
import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import HAS_CUDA
from models import FusedBlock, MHAModel, TinyLM, hf_bert, small_cnn  # noqa: F401
from oracle import MODEL_RTOL, _gen, assert_matches, oracle, run_and_check  # noqa: F401

import mat_kernels as mk
from mat_kernels import backend as _backend
from mat_kernels.measure.model import projection_vectors
from mat_kernels.testing.reference import model_per_sample_grads, reference_model_grams

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


# --------------------------------------------------------------------------------------------------------------
# oracle
# --------------------------------------------------------------------------------------------------------------
# --------------------------------------------------------------------------------------------------------------
# Hugging Face models built from configs (no download)
# --------------------------------------------------------------------------------------------------------------
def test_hf_bert_mlm_logprob():
    torch.manual_seed(0)
    model = hf_bert()
    ids = torch.randint(0, 40, (4, 7), generator=_gen(1))
    labels = torch.where(torch.rand(4, 7, generator=_gen(2)) < 0.5, ids, torch.full_like(ids, -100))
    labels[:, 0] = ids[:, 0]
    res = run_and_check(model, ids, labels)
    names = list(res.names)
    # 2 layers x (2 heads + 2 output heads + 1 FFN)
    assert len(names) == 10 and "bert.encoder.layer.1.attention.self.head1.out" in names
    assert "bert.encoder.layer.0.ffn" in names
    assert res.unclaimed["bert.embeddings.word_embeddings.weight"].startswith("always trained")
    assert "unrecognised layout" in res.unclaimed["cls.predictions.transform.dense.weight"]
    assert res.peak_held_bytes > 0


def test_hf_bert_dict_batch_with_padding_mask():
    torch.manual_seed(1)
    model = hf_bert(layers=1)
    ids = torch.randint(0, 40, (3, 6), generator=_gen(3))
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    labels = ids.clone()
    labels[mask == 0] = -100
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    res = mk.model_lambda_max(model, batch, backend="torch")  # labels taken from the batch
    # Hugging Face's mask code branches on the mask's values, which vmap cannot trace: one backward per sample
    lam_ref = oracle(model, {"input_ids": ids, "attention_mask": mask}, labels, res.specs, method="loop")
    assert_matches(res, lam_ref)


@pytest.mark.parametrize("out_proj,count", [("merge", 2), ("none", 2), ("separate", 4)])
def test_out_proj_modes(out_proj, count):
    model = hf_bert(layers=1)
    disc = mk.discover_modules(model, out_proj=out_proj, include=[r"attention"])
    assert len(disc.specs) == count
    w = "bert.encoder.layer.0.attention.output.dense.weight"
    if out_proj == "merge":
        assert any(sl.weight == w and sl.axis == "cols" for sl in disc.specs[0].slices)
    if out_proj == "none":
        assert "out_proj='none'" in disc.unclaimed[w]
    ids = torch.randint(0, 40, (3, 5), generator=_gen(4))
    run_and_check(model, ids, ids, specs=disc.specs)


def test_hf_gpt2_causal_lm():
    torch.manual_seed(2)
    cfg = transformers.GPT2Config(vocab_size=40, n_embd=16, n_layer=2, n_head=2, n_positions=16, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager")
    model = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 40, (3, 7), generator=_gen(5))
    res = run_and_check(model, ids, ids, causal=True)
    assert "transformer.h.1.attn.head1" in res and "transformer.h.0.mlp.ffn" in res
    # Conv1D stores [d_in, d_out]: the head's rows are columns of the stored c_attn weight
    spec = next(s for s in res.specs if s.name == "transformer.h.0.attn.head1")
    assert [sl.ranges for sl in spec.slices] == [((8, 8),), ((24, 8),), ((40, 8),)]


def test_hf_vit_classification_with_conv_patch_embedding():
    torch.manual_seed(3)
    cfg = transformers.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
                                 image_size=8, patch_size=4, num_channels=1, num_labels=3,
                                 attn_implementation="eager")
    model = transformers.ViTForImageClassification(cfg).eval()
    x = torch.randn(3, 1, 8, 8, generator=_gen(6))
    res = run_and_check(model, x, torch.tensor([0, 2, 1]))
    assert "vit.embeddings.patch_embeddings.projection" in res  # the conv layer is a module
    assert "vit.layers.0.mlp.ffn" in res


# --------------------------------------------------------------------------------------------------------------
# torch.nn.MultiheadAttention, CNNs, own layouts, custom specs, experts
# --------------------------------------------------------------------------------------------------------------
def test_own_fused_qkv_model_and_shared_weights():
    torch.manual_seed(6)
    model = TinyLM().eval()
    ids = torch.randint(0, 23, (4, 6), generator=_gen(10))
    res = run_and_check(model, ids, ids)
    assert len(res) == 2 * (3 + 3 + 1)
    # a layer applied twice (shared weights): one per-sample gradient over both uses, not two Grams
    twice = TinyLM(layers=1).eval()
    twice.blocks.append(twice.blocks[0])
    run_and_check(twice, ids, ids)


def test_custom_module_spec_rows_and_columns():
    torch.manual_seed(7)
    model = small_cnn()
    specs = [
        mk.ModuleSpec("head_rows_0_2", (mk.ParamSlice("6.weight", "rows", ((0, 2),), "6.bias"),)),
        mk.ModuleSpec("head_cols", (mk.ParamSlice("6.weight", "cols", ((5, 20), (40, 3))),)),
        mk.ModuleSpec.whole("conv0", "0.weight", "0.bias"),
    ]
    run_and_check(model, torch.randn(4, 2, 7, 7, generator=_gen(11)), torch.randint(0, 4, (4,)), specs=specs)


# --------------------------------------------------------------------------------------------------------------
# NTK outputs
# --------------------------------------------------------------------------------------------------------------
def test_output_loss_default_and_custom():
    torch.manual_seed(9)
    model = TinyLM(layers=1).eval()
    ids = torch.randint(0, 23, (4, 5), generator=_gen(13))
    run_and_check(model, ids, ids, output="loss")

    def loss_fn(logits, batch):  # per-sample squared error of the logits against a one-hot target
        return ((logits.float() - F.one_hot(ids, 23)) ** 2).flatten(1).sum(1)

    res = mk.model_lambda_max(model, ids, output="loss", loss_fn=loss_fn, backend="torch")
    names = sorted({p for s in res.specs for p in s.param_names()})
    grads = model_per_sample_grads(
        model, (ids, F.one_hot(ids, 23).double()), lambda f, b: ((f(b[0]) - b[1]) ** 2).sum(), names)
    lam_ref = torch.linalg.eigvalsh(reference_model_grams(model, grads, res.specs))[..., -1]
    assert_matches(res, lam_ref)


def test_output_projection_single_and_averaged():
    torch.manual_seed(10)
    model = TinyLM(layers=1).eval()
    ids = torch.randint(0, 23, (3, 5), generator=_gen(14))
    run_and_check(model, ids, None, output="projection", seed=3)
    # k = 2 projections: the average of the two Grams
    res = mk.model_lambda_max(model, ids, output="projection", num_projections=2, seed=3, backend="torch",
                              return_grams=True)
    vs = projection_vectors((5, 23), 2, 3, "cpu")
    names = sorted({p for s in res.specs for p in s.param_names()})
    grams = 0
    for j in range(2):
        g = model_per_sample_grads(model, ids, lambda f, b, j=j: (f(b) * vs[j].double()).sum(), names)
        grams = grams + reference_model_grams(model, g, res.specs)
    assert_matches(res, torch.linalg.eigvalsh(grams / 2)[..., -1])


def test_capture_of_a_training_backward_with_mean_loss():
    """The training step's own backward (loss = mean over samples) gives the per-sample-loss NTK."""
    torch.manual_seed(11)
    model = TinyLM(layers=1).eval()
    ids = torch.randint(0, 23, (4, 5), generator=_gen(15))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with mk.capture_lambda_max(model, loss_scale=1 / 4, backend="torch") as cap:
        logits = model(ids)
        loss = F.cross_entropy(logits.flatten(0, 1), ids.flatten(), reduction="none").view(4, 5).sum(1).mean()
        loss.backward()
    lam = cap.lambda_max()
    assert all(p.grad is not None for p in model.parameters())  # the training backward is untouched
    opt.zero_grad()
    ref = mk.model_lambda_max(model, ids, labels=ids, output="loss", backend="torch")
    assert list(lam) == list(ref)
    for k in lam:
        assert abs(lam[k] - ref[k]) <= MODEL_RTOL * ref[k]


# --------------------------------------------------------------------------------------------------------------
# gradient checkpointing, memory, the Triton path
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_lambdas(use_reentrant):
    torch.manual_seed(12)
    model = hf_bert()
    ids = torch.randint(0, 40, (3, 6), generator=_gen(16))
    plain = mk.model_lambda_max(model, ids, labels=ids, backend="torch").as_dict()
    ck = copy.deepcopy(model)
    ck.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    ck.train()  # Hugging Face checkpoints only in training mode; dropout is 0 in this config
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # reentrant checkpointing warns when no input requires grad
        got = mk.model_lambda_max(ck, ids, labels=ids, backend="torch").as_dict()
    assert list(got) == list(plain)
    for k in plain:
        assert abs(got[k] - plain[k]) <= MODEL_RTOL * plain[k], k


def test_capture_holds_one_layer_of_gradients_at_a_time():
    """Each layer's Grams are built when its output gradient arrives, and the gradient is dropped: the most the
    capture ever holds is one layer's dy, not the model's."""
    torch.manual_seed(13)
    n, T, d = 4, 6, 16
    blocks = 8
    model = nn.Sequential(*[FusedBlock(d, 2, 24) for _ in range(blocks)]).eval()
    res = mk.model_lambda_max(model, torch.randn(n, T, d), output="projection", backend="torch")
    largest = n * T * 3 * d * 4  # the QKV output gradient, fp32
    total = blocks * n * T * (3 * d + d + 24 + d) * 4  # every captured layer's output gradient
    assert res.peak_held_bytes == largest < total / 10


@pytest.mark.skipif(_backend.triton_mode()[0] != "interpreter", reason="the Triton interpreter is off (CUDA machine)")
def test_every_case_runs_the_triton_kernels():
    """run_and_check runs each model-level case through the Triton kernels too (interpreter on CPU); this guards
    the runner itself, so that a change to it cannot silently drop the Triton half of every layout test."""
    from oracle import backends

    assert backends() == ("torch", "triton")
    torch.manual_seed(14)
    model = TinyLM(vocab=11, d=8, heads=2, ffn=6, layers=1).eval()
    ids = torch.randint(0, 11, (3, 4), generator=_gen(17))
    res = mk.model_lambda_max(model, ids, labels=ids, backend="auto")
    assert res.backend.startswith("triton")


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_hf_bert():
    model = hf_bert().cuda()
    ids = torch.randint(0, 40, (4, 7), generator=_gen(18))
    res = mk.model_lambda_max(model, ids.cuda(), labels=ids.cuda())
    assert res.backend == "triton"
    assert_matches(res, oracle(model.cpu(), ids, ids, res.specs))


# --------------------------------------------------------------------------------------------------------------
# invalid inputs
# --------------------------------------------------------------------------------------------------------------
def test_empty_batch():
    with pytest.raises(ValueError, match="empty batch"):
        mk.model_lambda_max(TinyLM(), torch.zeros(0, 5, dtype=torch.long), labels=torch.zeros(0, 5, dtype=torch.long))


def test_train_mode_batchnorm_is_refused_with_the_fix():
    model = small_cnn().train()
    with pytest.raises(ValueError, match=r"training mode.*model\.eval\(\)"):
        mk.model_lambda_max(model, torch.randn(3, 2, 7, 7), labels=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="training mode"):
        mk.capture_lambda_max(model)


def test_names_that_match_nothing():
    with pytest.raises(ValueError, match="include pattern 'nope' matches none"):
        mk.discover_modules(TinyLM(), include=["nope"])
    with pytest.raises(ValueError, match="exclude pattern"):
        mk.discover_modules(TinyLM(), exclude=["nope"])


@pytest.mark.parametrize("spec,match", [
    (mk.ModuleSpec("a", (mk.ParamSlice("nope.weight"),)), "no parameter named 'nope.weight'"),
    (mk.ModuleSpec("a", (mk.ParamSlice("head.weight", "rows", ((20, 5),)),)), r"out of bounds"),
    (mk.ModuleSpec("a", (mk.ParamSlice("head.weight", "rows", ((0, 4),)),
                         mk.ParamSlice("head.weight", "rows", ((3, 2),)))), "overlap"),
    (mk.ModuleSpec("a", (mk.ParamSlice("head.weight", "cols", ((0, 4),), "head.bias"),)), "column slice"),
    (mk.ModuleSpec("a", (mk.ParamSlice("head.weight", "rows"),)), "needs at least one"),
    (mk.ModuleSpec("a", ()), "no parameter slice"),
    (mk.ModuleSpec("a", (mk.ParamSlice("emb.weight"),)), "no registered layer type"),
])
def test_bad_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        mk.model_lambda_max(TinyLM(), torch.zeros(2, 3, dtype=torch.long), labels=torch.zeros(2, 3, dtype=torch.long),
                            specs=[spec], backend="torch")


def test_bad_arguments():
    ids = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="output must be one of"):
        mk.model_lambda_max(TinyLM(), ids, output="logit")
    with pytest.raises(ValueError, match="needs labels"):
        mk.model_lambda_max(TinyLM(), ids, backend="torch")
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        mk.model_lambda_max(lambda x: x, ids)
    with pytest.raises(ValueError, match="out_proj must be"):
        mk.discover_modules(TinyLM(), out_proj="both")
    with pytest.raises(ValueError, match="no MAT module found"):
        mk.model_lambda_max(nn.Sequential(nn.Embedding(5, 3)), ids, labels=ids)


@pytest.mark.parametrize("labels,causal,exc,match", [
    (torch.full((2, 3), -100), False, ValueError, "labels select no position"),
    (torch.tensor([[-100, 4, 5], [-100, -100, -100]]), True, None, None),  # one labelled position is enough
    (torch.tensor([[1, 4, 5], [2, 0, 22]], dtype=torch.int8), False, None, None),  # any integer dtype
    (torch.tensor([[3, -100, -100], [1, -100, -100]]), True, ValueError, "after the causal shift"),
    (torch.tensor([[0, -1, 2], [1, 1, 1]]), False, ValueError,
     r"labels must be in \[0, 23\) or -100 \(ignored\); found \[-1\]"),
    (torch.tensor([[0, 23, 2], [1, 1, 1]]), False, ValueError, r"found \[23\]"),
    (torch.zeros(2, 3), False, TypeError, "labels must be an integer tensor"),
    (torch.zeros(2, 1, dtype=torch.long), True, ValueError, "causal=True needs at least 2 positions"),
    (torch.zeros(2, 4, dtype=torch.long), False, ValueError, "do not match logits"),
])
def test_bad_labels_are_named(labels, causal, exc, match):
    ids = torch.zeros(2, labels.shape[1] if labels.shape[1] != 4 else 3, dtype=torch.long)
    if exc is None:
        mk.model_lambda_max(TinyLM(), ids, labels=labels, causal=causal, backend="torch")
        return
    with pytest.raises(exc, match=match):
        mk.model_lambda_max(TinyLM(), ids, labels=labels, causal=causal, backend="torch")


def test_group_by_weight_is_the_one_grouping():
    """Discovery's specs grouped by weight: a head's Q, K, V rows of a fused weight are one module entry; the
    output projection's columns and a whole FFN weight form their own groups; bad specs are refused once here."""
    model = TinyLM(d=12, heads=3)
    specs = mk.discover_modules(model).specs
    groups = mk.group_by_weight(model, specs)
    (qkv,) = groups["blocks.0.qkv.weight"]
    assert qkv.axis == "rows" and qkv.bias_name == "blocks.0.qkv.bias" and qkv.bias and qkv.shape == (36, 12)
    assert qkv.modules[1] == ((4, 4), (16, 4), (28, 4))  # head 1: its Q, K and V rows
    assert [specs[i].name for i in qkv.index] == [f"blocks.0.head{h}" for h in range(3)]
    (out,) = groups["blocks.0.attn_out.weight"]
    assert out.axis == "cols" and out.bias_name is None and out.modules == (((0, 4),), ((4, 4),), ((8, 4),))
    (ffn,) = groups["blocks.0.ffn_in.weight"]
    assert ffn.axis == "all" and ffn.entries() == [(ffn.index[0], ((0, 10),))]
    assert ffn.for_bias().shape == (10, 1) and ffn.for_bias().weight == "blocks.0.ffn_in.bias"
    with pytest.raises(ValueError, match="out of bounds"):
        mk.group_by_weight(model, [mk.ModuleSpec("x", (mk.ParamSlice("blocks.0.qkv.weight", "rows", ((30, 8),)),))])


def test_layer_never_called_is_an_error():
    model = TinyLM(layers=2)
    specs = mk.discover_modules(model).specs

    def only_first_block(m, ids):
        return m.head(m.blocks[0](m.emb(ids)))

    with pytest.raises(RuntimeError, match="never called"):
        mk.model_lambda_max(model, torch.zeros(2, 3, dtype=torch.long), labels=torch.zeros(2, 3, dtype=torch.long),
                            specs=specs, forward=only_first_block, backend="torch")


def test_register_a_custom_layout():

    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(6, 4)

        def forward(self, x):
            return self.proj(x)

    @mk.register_layout("test_gate")
    def _gate(prefix, mod, model, opts):
        if not isinstance(mod, Gate):
            return None
        return [mk.ModuleSpec(f"{prefix}.gate_half{h}", (mk.ParamSlice(f"{prefix}.proj.weight", "rows",
                                                                       ((2 * h, 2),), f"{prefix}.proj.bias"),))
                for h in range(2)]

    try:
        with pytest.raises(ValueError, match="already registered"):
            mk.register_layout("test_gate")(_gate)
        model = nn.Sequential(Gate(), nn.Tanh(), nn.Linear(4, 3)).eval()
        disc = mk.discover_modules(model)
        assert disc.names() == ["0.gate_half0", "0.gate_half1"]
        run_and_check(model, torch.randn(4, 6, generator=_gen(19)), torch.randint(0, 3, (4,)), specs=disc.specs)
    finally:
        mk.unregister_layout("test_gate")
    with pytest.raises(ValueError, match="no layout named"):
        mk.unregister_layout("test_gate")


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_hooks_removed_and_linear_restored_even_when_forward_raises():
    model = MHAModel(True).eval()
    x = torch.randn(2, 4, 8)
    before = _hook_count(model)
    mk.model_lambda_max(model, x, labels=torch.zeros(2, 4, dtype=torch.long), backend="torch")
    assert _hook_count(model) == before and F.linear is torch._C._nn.linear

    def broken(m, b):
        m.enc(b[:, :, :5])  # wrong width: the attention forward raises inside the capture
        return m(b)

    with pytest.raises(Exception):
        mk.model_lambda_max(model, x, labels=torch.zeros(2, 4, dtype=torch.long), forward=broken, backend="torch")
    assert _hook_count(model) == before and F.linear is torch._C._nn.linear


def test_two_backwards_through_one_forward_are_refused():
    """A second backward through the same graph would add a Gram of the same samples twice. (Micro-batches, a
    forward after a backward, are accepted: tests/test_training_setups.py.)"""
    model = TinyLM(layers=1).eval()
    ids = torch.randint(0, 23, (3, 4), generator=_gen(20))
    with pytest.raises(RuntimeError, match="second backward through the same forward"):
        with mk.capture_lambda_max(model, backend="torch"):
            loss = F.cross_entropy(model(ids).flatten(0, 1), ids.flatten())
            loss.backward(retain_graph=True)
            loss.backward()


# --------------------------------------------------------------------------------------------------------------
# head pruning
# --------------------------------------------------------------------------------------------------------------
def test_prune_heads_fused_and_hf_separate_qkv():
    """Pruned heads are physically gone; the kept heads compute exactly what they computed before."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python"))
    from tasks import BertMLM

    torch.manual_seed(15)
    model = BertMLM(vocab=17, d=12, heads=3, ffn=8, layers=2, max_len=6).eval()
    ids = torch.randint(0, 17, (2, 6), generator=_gen(21))
    # zero head 1 of layer 0 and head 0 of layer 1 (their Q/K/V rows and output columns): removing them must not
    # change the output at all
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for layer, h in ((0, 1), (1, 0)):
            blk = ref.layers[layer]
            for p in range(3):
                blk.qkv.weight[p * 12 + 4 * h:p * 12 + 4 * h + 4] = 0
                blk.qkv.bias[p * 12 + 4 * h:p * 12 + 4 * h + 4] = 0
            blk.attn_out.weight[:, 4 * h:4 * h + 4] = 0
    pruned = copy.deepcopy(ref)
    left = mk.prune_heads(pruned, ["layers.0.head1", "layers.1.head0"])
    assert left == {"layers.0": 2, "layers.1": 2}
    assert pruned.layers[0].qkv.weight.shape == (24, 12) and pruned.layers[1].attn_out.weight.shape == (12, 8)
    torch.testing.assert_close(pruned(ids), ref(ids), rtol=1e-6, atol=1e-6)
    assert len(mk.discover_modules(pruned, out_proj="merge").specs) == 2 * 2 + 2

    bert = hf_bert(layers=1)
    mk.prune_heads(bert, ["bert.encoder.layer.0.attention.self.head0"])
    assert bert.bert.encoder.layer[0].attention.self.query.weight.shape == (8, 16)
    bert(torch.randint(0, 40, (2, 5)))  # still runs
    with pytest.raises(ValueError, match="all 1 heads"):
        mk.prune_heads(bert, ["bert.encoder.layer.0.attention.self.head0"])
    with pytest.raises(ValueError, match="not head modules"):
        mk.prune_heads(bert, ["nope.head0"])
    with pytest.raises(ValueError, match="only nn.Linear"):
        mk.prune_heads(MHAModel(True), ["enc.layers.0.self_attn.head0"])


def test_lowest_heads_keeps_one_per_layer():
    lam = {"a.head0": 1.0, "a.head1": 2.0, "b.head0": 0.5, "b.head1": 0.1, "b.ffn": 0.0}
    assert mk.lowest_heads(lam, 0.5) == ["b.head1", "a.head0"]
    assert mk.lowest_heads(lam, 0.75) == ["b.head1", "a.head0"]  # b.head0 would empty layer b
    with pytest.raises(ValueError, match="fraction"):
        mk.lowest_heads(lam, 1.0)
