"""A non-measuring MAT step costs the host no more than the dense step: aten ops and host reads of tensor values
(``aten._local_scalar_dense``, a device synchronisation on a GPU) counted with a ``TorchDispatchMode`` over one
whole step (forward, backward, ``mat.step()``, ``zero_grad``), against the same dense step with the same
optimizer settings, for every mask; and plans are built when the mask changes, not per step."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from models import TinyLM

import mat_kernels as mk
from mat_kernels.testing.counting import OpCounter

transformers = pytest.importorskip("transformers")

OPS_RATIO = 1.1  # MAT's aten ops per step <= OPS_RATIO x the dense step's (+ OPS_CONSTANT)
OPS_CONSTANT = 0  # per model: nothing needed (measured: MAT dispatches 0.45-1.06x the dense step's ops)


def _bert():
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=48, max_position_embeddings=16, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, attn_implementation="eager")
    return transformers.BertForMaskedLM(cfg)


def _gpt2():
    cfg = transformers.GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_positions=16, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager")
    return transformers.GPT2LMHeadModel(cfg)


def _loss(model, ids):
    if isinstance(model, TinyLM):
        return F.cross_entropy(model(ids).flatten(0, 1), ids.flatten())
    return model(input_ids=ids, labels=ids).loss


MODELS = {"tiny": lambda: TinyLM(vocab=50), "bert": _bert, "gpt2": _gpt2}
OPTIMIZERS = {"loop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}


def _counted_step(model, opt, mat, ids):
    with OpCounter() as c:
        loss = _loss(model, ids)
        if mat is None:
            loss.backward()
            opt.step()
            opt.zero_grad()
        else:
            mat.backward(loss)
            mat.step()
            mat.zero_grad()
    return c.ops


@pytest.mark.parametrize("impl", list(OPTIMIZERS))
@pytest.mark.parametrize("name", list(MODELS))
def test_a_non_measuring_step_dispatches_no_more_than_dense(name, impl):
    ids = torch.randint(0, 50, (3, 8), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    dense = MODELS[name]()
    opt = torch.optim.AdamW(dense.parameters(), lr=1e-3, weight_decay=0.1, **OPTIMIZERS[impl])
    for _ in range(2):
        _counted_step(dense, opt, None, ids)
    want = _counted_step(dense, opt, None, ids)
    for frozen_backward in ("dw", "detach"):
        torch.manual_seed(0)
        model = MODELS[name]()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, **OPTIMIZERS[impl])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # layers MAT cannot make sparse, said once
            mat = mk.MAT(model, opt, warmup_steps=10 ** 6, frozen_backward=frozen_backward)
        M = len(mat.specs)
        for mask in (torch.ones(M, dtype=torch.bool), torch.arange(M) % 4 == 0, torch.arange(M) % 4 != 0):
            mat.active = mask.clone()
            mat._apply_masks()
            for _ in range(2):  # the first step with a new mask builds its plan
                _counted_step(model, opt, mat, ids)
            built = mat.optimizer.plans_built
            got = _counted_step(model, opt, mat, ids)
            assert mat.optimizer.plans_built == built  # the same mask: no planning
            where = (name, impl, frozen_backward, mask.tolist())
            assert got["_local_scalar_dense"] <= want["_local_scalar_dense"], where
            assert got["_local_scalar_dense"] == 0, where  # MAT itself reads nothing back
            assert sum(got.values()) <= OPS_RATIO * sum(want.values()) + OPS_CONSTANT, (where, got, want)
            for op in ("any", "all", "is_nonzero", "item"):
                assert got[op] <= want[op], (where, op)


def test_a_non_measuring_step_clones_nothing_dense_does_not():
    """The sparse layers snapshot their (CPU) mask once per change of the mask, not at every forward: a step with the
    same mask adds no clone to the dense step's; a mask change costs one clone per sparse layer, once."""
    ids = torch.randint(0, 50, (3, 8), generator=torch.Generator().manual_seed(1))
    counts = []
    for with_mat in (False, True):
        torch.manual_seed(0)
        model = TinyLM(vocab=50)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        mat = mk.MAT(model, opt, warmup_steps=10 ** 6) if with_mat else None
        for _ in range(2):
            _counted_step(model, opt, mat, ids)
        counts.append(_counted_step(model, opt, mat, ids)["clone"])
    assert counts[1] == counts[0]
    mat.active = torch.arange(len(mat.specs)) % 2 == 0
    mat._apply_masks()
    assert _counted_step(model, opt, mat, ids)["clone"] == counts[0] + len(mat.sparse_layers)
    assert _counted_step(model, opt, mat, ids)["clone"] == counts[0]


# --------------------------------------------------------------------------------------------------------------
# defects fixed on the way
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_sparse_flop_formulas_under_compile(backend):
    """The sparse ops' FLOP formulas read the (CPU) mask on the host: under torch.compile the counted FLOPs equal
    eager's, and a mask change is counted (no recompilation needed)."""
    import shutil

    if backend == "inductor" and not shutil.which("g++"):
        pytest.skip("inductor on CPU needs a C++ compiler")
    from torch.utils.flop_counter import FlopCounterMode

    torch._dynamo.reset()
    lin = mk.SparseUpdateLinear(8, 12, row_blocks=3)
    x = torch.randn(5, 8)

    def f(x):
        return lin(x).sum()

    compiled = torch.compile(f, backend=backend)
    for mask in ([True, False, True], [False, False, True]):
        lin.set_active(torch.tensor(mask))
        counts = []
        for fn in (f, compiled):
            with FlopCounterMode(display=False) as fc:
                fn(x).backward()
            counts.append(fc.get_total_flops())
        # forward 2·5·8·12, dW over the active rows 2·5·4·8 each (x needs no gradient)
        assert counts[0] == counts[1] == 2 * 5 * 8 * 12 + 2 * 5 * 8 * 4 * sum(mask)
    torch._dynamo.reset()


def test_weight_grad_flops_with_no_output_features():
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        out = torch.ops.mat_kernels.sparse_weight_grad(torch.randn(5, 0), torch.randn(5, 6),
                                                       torch.tensor([True, True]), [0, 3], [3, 3], [0, 1], 1)
    assert out.shape == (0, 6) and fc.get_total_flops() == 0


@pytest.mark.parametrize("kind", ["linear", "mha", "gate", "submodule"])
def test_a_second_mat_on_an_open_one_is_refused(kind):
    """Sparse Linears, nn.MultiheadAttention routing and requires_grad gates of an open MAT: a second MAT on the
    model (or a part of it) is refused naming the open one, before anything is swapped; after close() it works."""
    from models import MHAModel, small_cnn

    model = {"linear": TinyLM, "submodule": TinyLM, "mha": lambda: MHAModel(True), "gate": small_cnn}[kind]()
    first = mk.MAT(model, torch.optim.SGD(model.parameters(), lr=0.1), warmup_steps=10)
    target = model.blocks[0] if kind == "submodule" else model
    before = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match="controlled by another MAT that is still open"):
        mk.MAT(target, torch.optim.SGD(target.parameters(), lr=0.1), warmup_steps=10)
    assert [type(m) for m in model.modules()] == before
    first.close()
    second = mk.MAT(target, torch.optim.SGD(target.parameters(), lr=0.1), warmup_steps=10)
    second.close()


def test_benchmark_quick_mode(tmp_path):
    """benchmarks/bench_frozen_step.py end to end at tiny shapes: every row has its R columns, and no MAT step reads
    a tensor value back."""
    import csv
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import bench_frozen_step as bench

    out = tmp_path / "frozen.csv"
    assert bench.main(["--quick", "--csv", str(out)]) == 0
    rows = list(csv.DictReader(open(out)))
    assert {r["op"] for r in rows} == {"frozen_step_layer", "frozen_step_model"}
    assert len([r for r in rows if r["op"] == "frozen_step_model"]) == 3 * (len(bench.STEP_PROVIDERS) + 1)
    rows = [r for r in rows if r["provider"] != "dense_twin"]  # the noise floor: timing columns only
    for r in rows:
        assert int(r["scalar_reads"]) == 0, r
        assert float(r["flops_ratio"]) <= 1.0 and float(r["ms"]) > 0
        assert (r["R"] == "nan") == (float(r["flops_ratio"]) == 1.0), r
    steps = [r for r in rows if r["op"] == "frozen_step_model" and float(r["flops_ratio"]) < 1.0]
    assert steps
    for r in steps:  # the saved share's interval holds its point estimate
        lo, mid, hi = (float(r[k]) for k in ("saved_share_lo", "saved_share_of_skippable", "saved_share_hi"))
        assert lo <= mid <= hi and float(r["skippable_ms"]) > 0, r


def test_benchmark_skippable_time_counts_no_forward_gemm():
    """The step level's skippable time comes from the dense step's backward only: a forward ``x @ Wᵀ`` has a detach
    dX's operand shapes and was once counted. Here the only GEMM is the forward's (the backward reaches no weight),
    so nothing is skippable; and Hugging Face ``Conv1D`` weights ([in, out]) count as linear maps [out, in]."""
    import os
    import sys

    import transformers

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import bench_frozen_step as bench

    lin = torch.nn.Linear(48, 48).requires_grad_(False)
    scale = torch.nn.Parameter(torch.ones(()))
    opt = torch.optim.SGD([scale], lr=0.1)
    x = torch.randn(256, 48)
    assert bench._skipped_in_profile(lin, opt, x, lambda m, b: m(b).sum() * scale, {(48, 48): 1.0}, True) == 0.0
    # the same weight shape in the backward does count (dW and dX of a trained square layer)
    lin.requires_grad_(True)
    assert bench._skipped_in_profile(lin, torch.optim.SGD(lin.parameters(), lr=0.1), x,
                                     lambda m, b: m(b.requires_grad_()).sum(), {(48, 48): 1.0}, True) > 0.0
    conv = torch.nn.Sequential(transformers.pytorch_utils.Conv1D(24, 8), torch.nn.Linear(24, 5))
    assert bench._linear_shapes(conv) == [(24, 8), (5, 24)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("frozen_backward", ["dw", "detach"])
def test_a_non_measuring_mat_step_replays_as_a_cuda_graph(frozen_backward):
    """A whole non-measuring MAT step (forward, backward through the sparse layers' kernels, the frozen-slice fused
    AdamW step, zero_grad) captured in one CUDA graph and replayed equals the same steps run eagerly: nothing in it
    reads a tensor back or copies from the host. (MAT's host bookkeeping, e.g. ``step_count``, does not advance in a
    replay: measuring steps run eagerly.)"""
    ids = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(0)).cuda()
    runs = []
    for captured in (True, False):
        torch.manual_seed(0)
        model = TinyLM(vocab=50).cuda()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, fused=True, capturable=True)
        mat = mk.MAT(model, opt, warmup_steps=10 ** 6, frozen_backward=frozen_backward)
        mat.active = torch.arange(len(mat.specs)) % 3 != 0
        mat._apply_masks()

        def step():
            mat.backward(_loss(model, ids))
            mat.step()
            mat.zero_grad()

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # warm-up: plans, device masks, kernels compiled, optimizer state allocated
                step()
        torch.cuda.current_stream().wait_stream(side)
        if captured:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
            for _ in range(4):
                graph.replay()
        else:
            for _ in range(4):
                step()
        torch.cuda.synchronize()
        runs.append([p.detach().clone() for p in model.parameters()])
        mat.close()
    for a, b in zip(*runs):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
