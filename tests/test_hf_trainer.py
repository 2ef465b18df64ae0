"""MAT inside a real Hugging Face ``Trainer`` (mat_kernels.integrations.hf): one line adds it; measurements at the
expected optimizer steps, once per optimizer step under gradient accumulation; frozen slices and their Adam moments
unchanged across steps where they are frozen; the LR schedule untouched; the data order untouched; MAT state saved
in and restored from the Trainer's checkpoints; probes from the train set (default), the eval set, a pair or a
callable; bf16 autocast training measured without autocast; unsupported setups refused; no transformers import.

A tiny BertForMaskedLM (hidden 32, 2 layers, 2 heads, eager attention, no dropout) on random tokens, on the CPU.
"""
import subprocess
import sys

import pytest
import torch

import mat_kernels as mk

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # the Trainer needs it

import mat_kernels.integrations.hf as mkhf  # noqa: E402

V, T, LR, STEPS = 40, 12, 1e-2, 12
MEASURED = [2, 5, 8, 11]  # warmup_steps=1, interval=3: after optimizer steps 2, 5, 8, 11 of 12
# threshold at the 0.3-quantile of each kind: one head of the four is frozen, so a Q/K/V/output weight is frozen
# in part (an optimizer step that is not frozen-aware would move the frozen rows through Adam's moments and decay)
MAT_KW = dict(interval=3, warmup_steps=1, patience=1, policy="quantile", q=0.3, lambda_kwargs={"backend": "torch"})


@pytest.fixture(autouse=True)
def _one_thread():
    # a model this small runs fastest on one thread, and a busy 2-core machine makes OpenMP threads spin
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _dataset(n=64, seed=1):
    """MLM examples: 4 of T positions replaced by a [MASK] id (4) and labelled, the rest -100."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(5, V, (T,), generator=g)
        labels = torch.full((T,), -100)
        pos = torch.randperm(T, generator=g)[:4]
        labels[pos] = ids[pos]
        ids = ids.clone()
        ids[pos] = 4
        out.append({"input_ids": ids, "attention_mask": torch.ones(T, dtype=torch.long), "labels": labels})
    return out


def _model(seed=0):
    cfg = transformers.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=16, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, attn_implementation="eager")
    torch.manual_seed(seed)
    return transformers.BertForMaskedLM(cfg)


def _trainer(tmp_path, callbacks=None, model=None, **kw):
    args = dict(output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=4, learning_rate=LR,
                weight_decay=0.1, report_to=[], save_strategy="no", use_cpu=True, logging_strategy="no",
                disable_tqdm=True, seed=0)
    args.update(kw)
    return transformers.Trainer(model=model if model is not None else _model(),
                                args=transformers.TrainingArguments(**args), train_dataset=_dataset(),
                                callbacks=callbacks)


def _parts(spec, params):
    """(name, view) of every parameter part a module owns (weights and bias entries)."""
    for sl in spec.slices:
        b = params[sl.bias] if sl.bias is not None else None
        if sl.axis == "all":
            yield sl.weight, lambda t: t
            if b is not None:
                yield sl.bias, lambda t: t
            continue
        for a, n in sl.ranges:
            if sl.axis == "rows":
                yield sl.weight, lambda t, a=a, n=n: t[a:a + n]
                if b is not None:
                    yield sl.bias, lambda t, a=a, n=n: t[a:a + n]
            else:
                yield sl.weight, lambda t, a=a, n=n: t[:, a:a + n]


class _Recorder(transformers.TrainerCallback):
    """Around every optimizer step: the learning rate used, the active set, and for every module part whether the
    parameter and its Adam moments changed. At every step end: (global step, measurements so far). Training
    forwards: the input ids seen."""

    def __init__(self):
        self.mat, self.steps, self.lrs, self.parts, self.inputs = None, [], [], [], []

    def watch(self, model):
        model.register_forward_pre_hook(
            lambda m, a, kw: self.inputs.append(kw["input_ids"].clone()) if m.training else None, with_kwargs=True)

    def _state(self):
        params = dict(self.mat.module.named_parameters())
        opt = self.mat.optimizer.optimizer
        snap = {}
        for n, p in params.items():
            st = opt.state.get(p, {})
            snap[n] = [p.detach().clone()] + [st[k].clone() for k in ("exp_avg", "exp_avg_sq") if k in st]
        return snap

    def on_pre_optimizer_step(self, args, state, control, **kw):
        self.lrs.append(self.mat.optimizer.optimizer.param_groups[0]["lr"])
        self.active, self.before = self.mat.active.clone(), self._state()

    def on_optimizer_step(self, args, state, control, **kw):
        after = self._state()
        for m, spec in enumerate(self.mat.specs):
            for name, view in _parts(spec, dict(self.mat.module.named_parameters())):
                old, new = self.before[name], after[name]
                unchanged = all(torch.equal(view(o), view(x)) for o, x in zip(old, new)) and len(old) == len(new)
                self.parts.append((state.global_step + 1, spec.name, bool(self.active[m]), name, unchanged))

    def on_step_end(self, args, state, control, **kw):
        self.steps.append((state.global_step, len(self.mat.log)))


def _run(tmp_path, mat=True, **kw):
    rec = _Recorder()
    trainer = _trainer(tmp_path, callbacks=[rec], **kw)
    rec.watch(trainer.model)
    if mat:
        trainer = mkhf.with_mat(trainer, **MAT_KW)  # the one extra line
        rec.mat = trainer.mat
    else:
        rec.on_pre_optimizer_step = rec.on_optimizer_step = rec.on_step_end = lambda *a, **k: None
    trainer.train()
    return trainer, rec


def test_trainer_with_mat_in_one_line(tmp_path):
    model = _model()
    plain_keys = list(model.state_dict())
    trainer, rec = _run(tmp_path)
    mat = trainer.mat
    # the Trainer's own optimizer (AdamW, its weight-decay groups), wrapped: accelerate -> MATOptimizer -> AdamW
    assert type(trainer.optimizer).__name__ == "AcceleratedOptimizer"
    assert isinstance(trainer.optimizer.optimizer, mkhf.MATOptimizer)
    inner = mat.optimizer.optimizer
    assert isinstance(inner, torch.optim.AdamW) and [g["weight_decay"] for g in inner.param_groups] == [0.1, 0.0]
    # MAT swapped the linears for sparse-update layers sharing their Parameters: the optimizer holds the model's
    assert mat.report()["sparse_backward_layers"] == 12 and mat.report()["masked_weights"] == []
    assert {id(p) for g in inner.param_groups for p in g["params"]} == {id(p) for p in mat.module.parameters()}
    # accelerate reloaded the optimizer's state when it wrapped it (new param_group dicts): the per-block Adam
    # correction must read the live groups, whose lr the scheduler sets
    cached = getattr(mat.optimizer, "_group", None)
    assert cached is None or all(any(g is h for h in inner.param_groups) for g in cached.values())
    # measured after optimizer steps 2, 5, 8, 11 (counted in optimizer steps, logged at those global steps)
    assert trainer.state.global_step == mat.step_count == STEPS
    assert [e["step"] for e in mat.log] == MEASURED
    assert [s for (s, n), (_, prev) in zip(rec.steps, [(0, 0)] + rec.steps) if n > prev] == MEASURED
    assert mat.log[0]["active"] == [True] * len(mat.specs)  # no gating before two measurements
    assert any(not all(e["active"]) for e in mat.log)  # something was frozen
    for layer, order, _ in mat.sparse_layers:  # the masks reached the sparse-update layers
        assert torch.equal(layer.active, mat.active[order])
    # frozen slices (weights, bias entries, Adam moments) unchanged across every step where they were frozen;
    # active weight slices moved
    frozen = [p for p in rec.parts if not p[2]]
    assert frozen and all(p[4] for p in frozen), [p for p in frozen if not p[4]][:3]
    assert not any(p[4] for p in rec.parts if p[2] and p[3].endswith("weight"))
    assert {p[0] for p in frozen} == set(range(MEASURED[1] + 1, STEPS + 1))  # frozen from the 2nd decision on
    assert {(p[0], p[3]) for p in frozen} & {(p[0], p[3]) for p in rec.parts if p[2]}  # tensors frozen in part
    # the LR scheduler (linear decay, no warmup) drives the wrapped optimizer's param_groups
    assert rec.lrs == pytest.approx([LR * (STEPS - k) / STEPS for k in range(STEPS)], rel=1e-6)
    assert trainer.lr_scheduler.get_last_lr() == pytest.approx([0.0, 0.0])
    # the weights keep their names: a checkpoint made with MAT loads into the plain model
    assert list(mat.module.state_dict()) == plain_keys


def test_data_order_and_model_mode_untouched(tmp_path):
    """The default probe batch is collated without drawing from the global RNGs: MAT sees the same training
    batches in the same order as a run without it; the model is left in training mode."""
    with_mat, rec = _run(tmp_path / "a")
    _, plain = _run(tmp_path / "b", mat=False)
    assert len(rec.inputs) == len(plain.inputs) == STEPS
    assert all(torch.equal(a, b) for a, b in zip(rec.inputs, plain.inputs))
    (cb,) = [c for c in with_mat.callback_handler.callbacks if isinstance(c, mkhf.MATCallback)]
    probe_batch, probe_labels = cb.probe(0)
    first = _dataset()[:4]
    assert torch.equal(probe_batch["input_ids"], torch.stack([e["input_ids"] for e in first]))
    assert torch.equal(probe_labels, torch.stack([e["labels"] for e in first]))
    assert with_mat.model.training


def test_gradient_accumulation_measures_once_per_optimizer_step(tmp_path):
    rec = _Recorder()
    trainer = _trainer(tmp_path, callbacks=[rec], gradient_accumulation_steps=2)
    rec.watch(trainer.model)
    trainer = mkhf.with_mat(trainer, **MAT_KW)
    rec.mat = mat = trainer.mat
    calls = []
    measure = mat.measure
    mat.measure = lambda: calls.append(mat.step_count) or measure()
    trainer.train()
    assert len(rec.inputs) == 2 * STEPS  # 24 micro-batches ...
    assert mat.step_count == trainer.state.global_step == STEPS  # ... 12 optimizer steps ...
    assert calls == [s - 1 for s in MEASURED] and [e["step"] for e in mat.log] == MEASURED  # ... 4 measurements
    frozen = [p for p in rec.parts if not p[2]]
    assert frozen and all(p[4] for p in frozen)


def test_checkpoint_resume_restores_mat(tmp_path):
    kw = dict(max_steps=8, save_strategy="steps", save_steps=4)
    full = mkhf.with_mat(_trainer(tmp_path / "full", **kw), warmup_steps=0, interval=2,
                         lambda_kwargs={"backend": "torch"})
    full.train()
    ckpt = tmp_path / "full" / "checkpoint-4"
    saved = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert saved["mat"]["step_count"] == 4 and len(saved["mat"]["log"]) == 2
    _trainer(tmp_path / "plain").create_optimizer().load_state_dict(saved)  # a plain one ignores the MAT entry
    resumed = mkhf.with_mat(_trainer(tmp_path / "resumed", model=_model(seed=5), **kw), warmup_steps=0, interval=2,
                            lambda_kwargs={"backend": "torch"})
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert resumed.mat.step_count == 8 and resumed.mat.log == full.mat.log
    assert torch.equal(resumed.mat.optimizer.block_steps, full.mat.optimizer.block_steps)
    for (k, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), k
    # a checkpoint without MAT state: MAT starts afresh, and says so
    torch.save({k: v for k, v in saved.items() if k != "mat"}, ckpt / "optimizer.pt")
    again = mkhf.with_mat(_trainer(tmp_path / "again", **{**kw, "max_steps": 5}), warmup_steps=0, interval=2,
                          lambda_kwargs={"backend": "torch"})
    with pytest.warns(UserWarning, match="without MAT state"):
        again.train(resume_from_checkpoint=str(ckpt))
    assert again.mat.step_count == 1


@pytest.mark.parametrize("kind", ["eval", "pair", "callable"])
def test_probe_sources(tmp_path, kind):
    ds = _dataset(8, seed=3)
    batch = {k: torch.stack([e[k] for e in ds]) for k in ds[0]}
    probe = {"eval": "eval", "pair": (batch, batch["labels"]), "callable": lambda step: (batch, None)}[kind]
    trainer = _trainer(tmp_path, max_steps=3)
    trainer.eval_dataset = ds
    trainer = mkhf.with_mat(trainer, probe=probe, warmup_steps=0, interval=1, lambda_kwargs={"backend": "torch"})
    trainer.train()
    assert [e["step"] for e in trainer.mat.log] == [1, 2, 3]
    ref = mk.model_lambda_max(trainer.model.eval(), batch, specs=trainer.mat.specs, backend="torch").as_dict()
    got = trainer.mat.measure().values.tolist()  # eval: the first 8 eval examples = the batch above
    assert got == pytest.approx([ref[n] for n in trainer.mat.names], rel=1e-5)


def test_bf16_autocast_training_measures_without_autocast(tmp_path):
    """Under bf16 mixed precision accelerate wraps the model's forward in autocast; the measurement runs the forward
    it wrapped (the Gram capture needs one dtype per layer), and training forwards keep autocast."""
    trainer = mkhf.with_mat(_trainer(tmp_path, max_steps=2, bf16=True), warmup_steps=0, interval=1,
                            lambda_kwargs={"backend": "torch"})
    trainer.train()
    assert [e["step"] for e in trainer.mat.log] == [1, 2]
    assert "_original_forward" in vars(trainer.model) and "forward" in vars(trainer.model)  # autocast kept
    (cb,) = [c for c in trainer.callback_handler.callbacks if isinstance(c, mkhf.MATCallback)]
    batch, _ = cb.probe(0)
    unpatched = lambda m, b: m._original_forward(**{k: v for k, v in b.items() if k != "labels"})  # noqa: E731
    fp32 = mk.model_lambda_max(trainer.model.eval(), batch, specs=trainer.mat.specs, backend="torch",
                               forward=unpatched)
    assert trainer.mat.measure().values.tolist() == pytest.approx([fp32[n] for n in trainer.mat.names], rel=1e-5)


def test_unsupported_setups_are_refused(tmp_path):
    trainer = _trainer(tmp_path, optim="adafactor")
    with pytest.raises(TypeError, match="MAT cannot wrap the Trainer's optimizer Adafactor.*optim='adamw_torch"):
        mkhf.with_mat(trainer)
    assert trainer.optimizer is None and not any(isinstance(m, mk.SparseUpdateLinear) for m in trainer.model.modules())
    trainer = _trainer(tmp_path)
    with pytest.raises(ValueError, match="probe=None"):
        mkhf.with_mat(trainer, probe=None)
    with pytest.raises(ValueError, match="probe must be"):
        mkhf.with_mat(trainer, probe="test")
    mkhf.with_mat(trainer)
    with pytest.raises(ValueError, match="already"):
        mkhf.with_mat(trainer)
    with pytest.raises(TypeError, match="transformers.Trainer"):
        mkhf.with_mat(object())
    args = transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    with pytest.raises(ValueError, match="model_init"):
        mkhf.with_mat(transformers.Trainer(model_init=lambda: _model(), args=args, train_dataset=_dataset(8)))
    with pytest.raises(TypeError, match="unsupported optimizer|MAT cannot wrap"):
        mkhf.with_mat(_trainer(tmp_path, optim="rmsprop"))


def test_import_needs_no_transformers():
    code = ("import sys; sys.modules['transformers'] = None; sys.modules['accelerate'] = None; "
            "import mat_kernels, mat_kernels.integrations.hf; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_ledger_counts_steps_and_measurements(tmp_path):
    """count_flops=True: every optimizer step's FLOPs in trainer.mat.ledger, the measurement's own forward and
    backward kept apart (a measuring step counts what a plain step with the same masks counts)."""
    trainer = mkhf.with_mat(_trainer(tmp_path), count_flops=True, **MAT_KW)
    trainer.train()
    ledger = trainer.mat.ledger
    assert len(ledger.train) == len(ledger.train_seconds) == STEPS and all(f > 0 for f in ledger.train)
    assert [s for s, _ in ledger.measure] == [s - 1 for s in MEASURED] and all(f > 0 for _, f in ledger.measure)
    # masks change only after the 2nd measurement: before, every step (measuring or not) counts the same
    first_change = MEASURED[1]
    assert len(set(ledger.train[:first_change])) == 1
    assert ledger.train[-1] < ledger.train[0]  # frozen modules' dW skipped
    assert 0 < ledger.measurement_share() < 1 and 0 < ledger.measurement_time_share() < 1


def test_trainer_with_mat_on_a_grouped_query_attention_model(tmp_path):
    """Qwen2 (grouped-query attention, q/k/v biases) in a Trainer with the one extra line: key/value groups are
    gated by sparse updates (nothing merely masked) and frozen groups stay frozen through AdamW."""
    cfg = transformers.Qwen2Config(vocab_size=V, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                   attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(cfg)
    data = [{"input_ids": d["input_ids"], "labels": d["input_ids"].clone()} for d in _dataset(32)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=4,
                                          learning_rate=LR, report_to=[], save_strategy="no", use_cpu=True,
                                          logging_strategy="no", disable_tqdm=True, seed=0)
    trainer = mkhf.with_mat(transformers.Trainer(model=model, args=args, train_dataset=data), **MAT_KW)
    mat = trainer.mat
    assert mat.report()["masked_weights"] == [] and "model.layers.0.self_attn.group1" in mat.names
    q = model.model.layers[0].self_attn.q_proj.weight
    snapshots = []

    class Watch(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            snapshots.append((q.detach().clone(), mat.active.clone()))

        def on_step_end(self, args, state, control, **kw):
            before, active = snapshots[-1]
            for g in range(2):  # group g owns Q rows [8g, 8g + 8)
                m = mat.names.index(f"model.layers.0.self_attn.group{g}")
                assert torch.equal(q[8 * g:8 * g + 8], before[8 * g:8 * g + 8]) != bool(active[m])

    trainer.add_callback(Watch())
    trainer.train()
    assert len(mat.log) >= 2 and any(not a for _, act in snapshots for a in act.tolist())
