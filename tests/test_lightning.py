"""MATCallback in a ``lightning.Trainer`` on CPU: bf16-mixed with gradient accumulation, 16-mixed with a GradScaler
(Lightning's MixedPrecision plugin given a CPU scaler: Lightning's own "16-mixed" wants CUDA), checkpoint save and
restore of MAT's state, and the setups it refuses. Skipped without ``lightning`` (an optional dependency)."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_moved_iff_active
from models import TinyLM

pl = pytest.importorskip("lightning.pytorch")
from mat_kernels.integrations.lightning import MATCallback  # noqa: E402

VOCAB, N, T = 23, 4, 6


class LitLM(pl.LightningModule):
    def __init__(self, seed=0, manual=False):
        super().__init__()
        torch.manual_seed(seed)
        self.net = TinyLM(vocab=VOCAB)
        self.automatic_optimization = not manual

    def forward(self, ids):
        return self.net(ids)

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        return F.cross_entropy(self(ids).float().flatten(0, 1), ids.flatten())  # mean over the batch's samples

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.1)


def _loader(batches=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batches * N, T), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=N, shuffle=False)


class FrozenCheck(pl.Callback):
    """Before each optimizer step (after MATCallback closed the measuring step) keeps the parameters and the mask in
    force; after it asserts the frozen slices did not move and the active ones did."""

    def __init__(self):
        self.froze, self._before = [], None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        mat = pl_module.mat
        params = dict(mat.module.named_parameters())
        self._before = (params, {k: v.detach().clone() for k, v in params.items()}, mat.active.clone(),
                        mat.optimizer.steps_taken)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._before is not None and pl_module.mat.optimizer.steps_taken > self._before[3]:
            params, before, active, _ = self._before
            self.froze.append(assert_moved_iff_active(pl_module.mat.specs, params, before, active))
            self._before = None


def _trainer(callbacks, tmp_path, *, max_steps=-1, max_epochs=None, precision="32-true", accumulate=1, plugins=None):
    kw = dict(precision=precision) if plugins is None else dict(plugins=plugins)
    return pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, max_epochs=max_epochs, callbacks=callbacks,
                      accumulate_grad_batches=accumulate, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, **kw)


def _fit(trainer, module, loader, **kw):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers|bottleneck).*")
        trainer.fit(module, loader, **kw)


MAT_KW = dict(warmup_steps=0, interval=5, lambda_kwargs={"backend": "torch"})


@pytest.mark.parametrize("micro_batches", ["first", "all"])
def test_bf16_mixed_with_gradient_accumulation(tmp_path, micro_batches):
    """20 optimizer steps of 2 micro-batches under bf16-mixed: 4 measurements from the training backward, gating
    from the second, frozen slices bit-for-bit unchanged."""
    module, check = LitLM(seed=1), FrozenCheck()
    cb = MATCallback(micro_batches=micro_batches, **MAT_KW)
    _fit(_trainer([cb, check], tmp_path, max_steps=20, precision="bf16-mixed", accumulate=2), module,
         _loader(batches=40))
    mat = module.mat
    assert mat is cb.mat and mat.step_count == 20 and mat.optimizer.steps_taken == 20
    assert [e["step"] for e in mat.log] == [1, 6, 11, 16] and len(mat.ledger.measure) == 4
    assert len(check.froze) == 20 and any(check.froze) and not all(mat.log[-1]["active"])
    assert all(torch.isfinite(torch.tensor(e["lambda"])).all() for e in mat.log)
    assert cb._ctx is None  # no measuring step left open


def test_16_mixed_with_a_grad_scaler_skips_overflowing_steps(tmp_path):
    """fp16 autocast with a GradScaler that starts at 2^24: Lightning skips the overflowing steps (MAT never sees
    them: no measurement, no count); the others train, measure and gate."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 24)
    module, check = LitLM(seed=2), FrozenCheck()
    cb = MATCallback(**MAT_KW)
    trainer = _trainer([cb, check], tmp_path, max_steps=20,
                       plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    _fit(trainer, module, _loader(batches=20))
    mat = module.mat
    taken = mat.optimizer.steps_taken
    assert 5 <= taken < 20 and mat.step_count == taken  # Lightning counts skipped steps, MAT does not
    assert [e["step"] for e in mat.log] == [s + 1 for s in range(0, taken, 5)]
    assert len(check.froze) == taken and any(check.froze)
    assert all(torch.isfinite(torch.tensor(e["lambda"])).all() for e in mat.log)


def test_checkpoint_restores_mat_state(tmp_path):
    """Two epochs in one run against one epoch, a checkpoint, and a resumed second epoch from a fresh module: the
    same MAT log, masks and weights, bit for bit."""
    loader = _loader(batches=10)
    whole = LitLM(seed=3)
    _fit(_trainer([MATCallback(**MAT_KW)], tmp_path, max_epochs=2), whole, loader)
    first = LitLM(seed=3)
    t1 = _trainer([MATCallback(**MAT_KW)], tmp_path, max_epochs=1)
    _fit(t1, first, loader)
    ckpt = tmp_path / "epoch1.ckpt"
    t1.save_checkpoint(ckpt)
    assert "mat" in torch.load(ckpt, weights_only=False)["optimizer_states"][0]
    resumed = LitLM(seed=99)  # other initial weights: everything must come from the checkpoint
    _fit(_trainer([MATCallback(**MAT_KW)], tmp_path, max_epochs=2), resumed, loader, ckpt_path=ckpt)
    assert whole.mat.step_count == resumed.mat.step_count == 20
    assert resumed.mat.log == whole.mat.log and len(whole.mat.log) == 4
    assert torch.equal(resumed.mat.active, whole.mat.active) and not whole.mat.active.all()
    for (k, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


def test_refused_setups(tmp_path):
    with pytest.raises(ValueError, match="micro_batches"):
        MATCallback(micro_batches="last")
    with pytest.raises(TypeError, match="model and optimizer"):
        MATCallback(probe=None, optimizer=None)
    cases = [(LitLM(manual=True), {}, "manual optimization"),
             (LitLM(), {"precision": "64-true"}, "trainer.precision='64-true'")]
    for module, kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            _fit(_trainer([MATCallback(**MAT_KW)], tmp_path, max_steps=2, **kw), module, _loader(batches=2))


def test_probe_measurement(tmp_path):
    """A fixed probe batch instead of the training backward: measured after the step's update, as with MAT alone."""
    (probe,) = next(iter(_loader(batches=1, seed=5)))
    module = LitLM(seed=4)
    ref = copy.deepcopy(module)
    _fit(_trainer([MATCallback(probe=(probe, probe), **MAT_KW)], tmp_path, max_steps=11), module, _loader())
    assert [e["step"] for e in module.mat.log] == [1, 6, 11]
    assert not torch.equal(next(ref.parameters()), next(module.parameters()))
