"""Frozen modules truly skip their weight gradient on every family MAT gates: with every module frozen, a training
step's executed FLOPs (``torch.utils.flop_counter``) drop by at least 90% of the module weights' dW FLOPs, and no
weight is merely masked."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mat_kernels as mk
from mat_kernels.layers import linear_shape
from mat_kernels.train.flops import count_flops

transformers = pytest.importorskip("transformers")

from models import (  # noqa: E402
    DecoderModel,  # noqa: E402
    MHAModel,
    hf_bert,
)
from models import hf_family as _hf  # noqa: E402

SKIPPED_SHARE = 0.9  # the issue's target: >= 90% of the modules' dW FLOPs disappear when every module is frozen


def _ids(n=4, T=8, vocab=40, seed=0):
    return torch.randint(0, vocab, (n, T), generator=torch.Generator().manual_seed(seed))


def _gpt2_cross():
    cfg = transformers.GPT2Config(vocab_size=40, n_embd=48, n_layer=1, n_head=4, n_positions=16, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, add_cross_attention=True,
                                  attn_implementation="eager", bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def _vit():
    cfg = transformers.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
                                 image_size=8, patch_size=4, num_channels=1, num_labels=3, hidden_dropout_prob=0.0,
                                 attention_probs_dropout_prob=0.0, attn_implementation="eager")
    return transformers.ViTForImageClassification(cfg)


def _vgg():
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding="same"), nn.ReLU(), nn.Conv2d(8, 8, 3, padding="same"), nn.ReLU(),
        nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding="valid"), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 2 * 2, 10))


def _lm_loss(model, batch):
    return model(**batch, labels=batch["input_ids"]).loss


CASES = {
    # name: (model builder, batch, loss(model, batch))
    "llama": (lambda: _hf("llama"), {"input_ids": _ids()}, _lm_loss),
    "mistral": (lambda: _hf("mistral"), {"input_ids": _ids()}, _lm_loss),
    "qwen2": (lambda: _hf("qwen2"), {"input_ids": _ids()}, _lm_loss),
    "gpt_neox": (lambda: _hf("gpt_neox"), {"input_ids": _ids()}, _lm_loss),
    "falcon_new_decoder": (lambda: transformers.FalconForCausalLM(transformers.FalconConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=4, multi_query=False,
        new_decoder_architecture=True, num_kv_heads=2, attn_implementation="eager")), {"input_ids": _ids()}, _lm_loss),
    "gpt2_cross": (_gpt2_cross, {"input_ids": _ids(), "encoder_hidden_states": torch.randn(4, 5, 48)}, _lm_loss),
    "bert": (lambda: hf_bert(), {"input_ids": _ids()}, _lm_loss),
    "roberta": (lambda: transformers.RobertaForMaskedLM(transformers.RobertaConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
        max_position_embeddings=20, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        attn_implementation="eager", pad_token_id=1, bos_token_id=0, eos_token_id=2)),
        {"input_ids": _ids(vocab=40) % 37 + 3}, _lm_loss),
    "distilbert": (lambda: transformers.DistilBertForMaskedLM(transformers.DistilBertConfig(
        vocab_size=40, dim=16, n_layers=1, n_heads=2, hidden_dim=24, max_position_embeddings=20, dropout=0.0,
        attention_dropout=0.0, attn_implementation="eager", pad_token_id=0)), {"input_ids": _ids()}, _lm_loss),
    "transformer_decoder": (lambda: DecoderModel(), {"x": torch.randn(4, 5, 8), "mem": torch.randn(4, 3, 8)},
                            lambda m, b: F.cross_entropy(m(**b), torch.tensor([0, 1, 2, 3]))),
    "vit": (_vit, torch.randn(4, 1, 8, 8), lambda m, x: m(pixel_values=x, labels=torch.tensor([0, 1, 2, 0])).loss),
    "transformer_encoder": (lambda: MHAModel(batch_first=True), torch.randn(4, 5, 8),
                            lambda m, x: F.cross_entropy(m(x).mean(1), torch.tensor([0, 1, 2, 3]))),
    "vgg_string_padding": (_vgg, torch.randn(4, 1, 8, 8),
                           lambda m, x: F.cross_entropy(m(x), torch.tensor([0, 1, 2, 3]))),
}


def _module_dw_flops(model, specs, run) -> int:
    """Weight-gradient FLOPs of the module slices in one forward + backward of ``run``: 2 · (rows the layer
    multiplies) · (weight entries the modules own), rows counted by forward hooks on the layers."""
    params = dict(model.named_parameters())
    owners = dict(model.named_modules())
    rows: dict[str, int] = {}
    hooks = []

    def hook_for(wname, owner, attr):
        def hook(mod, args, out):
            if isinstance(mod, nn.MultiheadAttention):
                x = args[0]
                count = x.numel() // x.shape[-1]
            elif isinstance(mod, nn.Conv2d):
                count = out.shape[0] * out.shape[2] * out.shape[3]
            else:
                count = args[0].numel() // args[0].shape[-1]
            rows[wname] = rows.get(wname, 0) + count
        return hook

    weights = {sl.weight for s in specs for sl in s.slices}
    for wname in weights:
        owner_name, attr = wname.rsplit(".", 1)
        owner = owners[owner_name]
        parent = owners.get(owner_name.rsplit(".", 1)[0]) if "." in owner_name else model
        if isinstance(parent, nn.MultiheadAttention) and owner is parent.out_proj:
            owner = parent  # F.multi_head_attention_forward uses out_proj.weight without calling out_proj
        hooks.append(owner.register_forward_hook(hook_for(wname, owner, attr)))
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    total = 0
    for s in specs:
        for sl in s.slices:
            owner_name, attr = sl.weight.rsplit(".", 1)
            d_out, d_in = linear_shape(owners[owner_name], attr, params[sl.weight])
            entries = {"all": d_out * d_in, "rows": sum(n for _, n in sl.ranges) * d_in,
                       "cols": sum(n for _, n in sl.ranges) * d_out}[sl.axis]
            total += 2 * rows[sl.weight] * entries
    return total


@pytest.mark.parametrize("case", list(CASES))
def test_every_module_frozen_skips_its_weight_gradient(case):
    build, batch, loss_fn = CASES[case]
    torch.manual_seed(0)
    dense = build().train()
    model = copy.deepcopy(dense)
    specs = mk.discover_modules(dense).specs
    dw = _module_dw_flops(dense, specs, lambda: loss_fn(dense, batch).backward())
    dense.zero_grad()
    dense_flops, _ = count_flops(lambda: loss_fn(dense, batch).backward())

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mat = mk.MAT(model, opt, probe=(batch, None), output="projection", lambda_kwargs={"backend": "torch"})
    assert mat.report()["masked_weights"] == []
    mat.active = torch.zeros(len(mat.specs), dtype=torch.bool)
    mat._apply_masks()
    frozen_flops, _ = count_flops(lambda: mat.backward(loss_fn(model, batch)))
    saved = dense_flops - frozen_flops
    assert saved >= SKIPPED_SHARE * dw, (case, saved, dw, dense_flops)



@pytest.mark.parametrize("op_name", ["sparse_weight_grad", "sparse_input_grad", "sparse_weight_grad_accumulate"])
def test_sparse_flop_formulas_on_fake_tensors(op_name):
    """Inductor estimates a graph node's FLOPs by calling its formula on fake tensors
    (``torch._inductor.fx_utils.count_flops_fx``, e.g. to order kernels around communication): a fake mask has no
    values to read, so the formula counts every block (an upper bound; a compiled graph serves every mask) instead
    of failing; on real tensors it counts the active blocks only."""
    from torch._inductor.fx_utils import count_flops_fx
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.utils.flop_counter import FlopCounterMode

    op = getattr(torch.ops.mat_kernels, op_name)
    layout = ([0, 4, 8], [4, 4, 4], [0, 1, 2], 0)  # 3 row blocks of a [12, 8] weight
    def call(dw, dy, x, w, active):  # dw: the accumulate op's output argument
        first = (dw,) if op_name == "sparse_weight_grad_accumulate" else ()
        return op(*first, dy, w if op_name == "sparse_input_grad" else x, active, *layout)

    args = (torch.zeros(12, 8), torch.randn(5, 12), torch.randn(5, 8), torch.randn(12, 8),
            torch.tensor([True, False, True]))
    gm = make_fx(call, tracing_mode="fake")(*args)
    node = next(n for n in gm.graph.nodes if n.op == "call_function" and op_name in str(n.target))
    assert count_flops_fx(node) == 2 * 5 * 12 * 8  # every block
    with FlopCounterMode(display=False) as fc:
        call(*args)
    assert fc.get_total_flops() == 2 * 5 * 8 * 8  # the two active blocks' 8 rows
