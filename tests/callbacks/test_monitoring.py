"""EarlyStopping and ModelCheckpoint on a curvature key count reads, not stale repeats of an older read, whatever the
epoch length against the read period; and the leftovers of degenerate states on the lightning_flat models."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

from conftest import rel
from lightning_flat.callbacks import CurvatureOptions, HessianTrace, Sharpness
from lightning_flat.datamodules import MatrixSensingDataModule
from lightning_flat.measurements import Dense
from lightning_flat.models import DeepLinearNet


class Seen(L.Callback):
    """What a monitor reads at each epoch end: (step, value) of the monitored key."""

    def __init__(self, key):
        self.key, self.seen = key, []

    def on_train_epoch_end(self, trainer, pl_module):
        if self.key in trainer.callback_metrics:
            self.seen.append((trainer.global_step, float(trainer.callback_metrics[self.key])))


@pytest.mark.parametrize("epoch, every", [(8, 20), (30, 20)], ids=["epochs-shorter", "epochs-longer"])
def test_early_stopping_counts_reads(epoch, every):
    dm = MatrixSensingDataModule(n=40, d_out=4, d_in=4, rank=1, batch_size=8, seed=0, steps_per_epoch=epoch)
    ht = HessianTrace(every_n_steps=every)
    # mode="max" on a trace that falls: no check improves, so it stops after patience + 1 checks
    stop = EarlyStopping(monitor="hessian/trace", mode="max", patience=3, check_on_train_epoch_end=True)
    seen = Seen("hessian/trace")
    tr = L.Trainer(max_steps=400, logger=False, callbacks=[ht, seen, stop], enable_progress_bar=False,
                   enable_checkpointing=False, enable_model_summary=False, precision="64-true")
    tr.fit(DeepLinearNet([4, 4, 4], lr=0.02, seed=0), dm)
    reads = dict(ht.history["hessian/trace"])
    # every epoch-end check saw a value read at that very step: no stale repeat
    assert [s for s, _ in seen.seen] == [epoch * k for k in range(1, len(seen.seen) + 1)]
    assert all(s in reads and reads[s] == pytest.approx(v, rel=1e-6) for s, v in seen.seen)  # float32 in Lightning
    # the regular cadence goes on between epoch ends
    assert {s for s in reads if s % every == 0} == {s for s in range(0, tr.global_step + 1, every)}
    # stopped after patience (3) non-improving checks following the first: 4 checks, 4 reads
    assert stop.stopped_epoch == 3 and len(seen.seen) == 4 and tr.global_step == 4 * epoch


def test_model_checkpoint_on_a_curvature_key_sees_fresh_reads(tmp_path):
    dm = MatrixSensingDataModule(n=40, d_out=4, d_in=4, rank=1, batch_size=8, seed=0, steps_per_epoch=8)
    sh = Sharpness(every_n_steps=50)
    ck = ModelCheckpoint(dirpath=str(tmp_path), monitor="hessian/sharpness", mode="min", save_top_k=1)
    tr = L.Trainer(max_steps=24, logger=False, callbacks=[sh, ck], enable_progress_bar=False,
                   enable_model_summary=False, precision="64-true")
    tr.fit(DeepLinearNet([4, 4, 4], lr=0.02, seed=0), dm)
    steps = [s for s, _ in sh.history["hessian/sharpness"]]
    assert steps == [0, 8, 16, 24]  # read at 0 (the cadence) and at each epoch end, for the monitor
    best = min(v for s, v in sh.history["hessian/sharpness"] if s > 0)
    assert rel(ck.best_model_score, best) < 1e-6  # the checkpoint's score is a read's value (float32 in Lightning)


@pytest.mark.parametrize("precision", ["16-true", "bf16-true"])
def test_half_precision_models_are_measured_in_float32(precision):
    dm = MatrixSensingDataModule(n=40, d_out=4, d_in=4, rank=1, batch_size=8, seed=0)
    ht, sh = HessianTrace(every_n_steps=5), Sharpness(every_n_steps=5)
    model = DeepLinearNet([4, 4, 4], lr=0.02, seed=0)
    tr = L.Trainer(max_steps=5, logger=False, callbacks=[ht, sh], precision=precision, enable_progress_bar=False,
                   enable_checkpointing=False, enable_model_summary=False)
    tr.fit(model, dm)
    # the read is of the half-precision weights upcast exactly to float32, with float32 data
    W = [w.detach().float() for w in model.weights()]
    meas, y = dm.measurements.to(dtype=torch.float32), dm.targets.float()
    from lightning_flat import functional as F

    H = F.loss_hessian(W, meas, y)
    # float32 products of O(1) numbers over n = 40 measurements: ~1e-5 relative
    assert rel(ht.last["hessian/trace"], F.hessian_trace(W, meas)) < 1e-5
    assert rel(sh.last["hessian/sharpness"], torch.linalg.eigvalsh(H)[-1]) < 1e-4


def test_given_targets_must_match_the_measurements():
    meas = Dense(torch.randn(5, 2, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"targets must have one value per measurement: 5 measurements, got "
                                         r"targets of shape \(4,\)"):
        CurvatureOptions(measurements=meas, targets=torch.zeros(4, dtype=torch.float64))


def test_resuming_a_checkpoint_with_non_finite_weights_names_the_checkpoint(tmp_path):
    dm = MatrixSensingDataModule(n=40, d_out=4, d_in=4, rank=1, batch_size=8, seed=0)
    model = DeepLinearNet([4, 4, 4], lr=0.02, seed=0).double()
    tr = L.Trainer(max_steps=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                   precision="64-true", default_root_dir=str(tmp_path))
    tr.fit(model, dm)
    path = str(tmp_path / "bad.ckpt")
    tr.save_checkpoint(path)
    state = torch.load(path, weights_only=False)
    state["state_dict"]["layers.0"] = torch.full_like(state["state_dict"]["layers.0"], float("nan"))
    torch.save(state, path)
    tr2 = L.Trainer(max_steps=4, logger=False, enable_progress_bar=False, enable_model_summary=False,
                    precision="64-true", default_root_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"factor 1 is not finite in the checkpoint being resumed \(.*bad.ckpt\)"):
        tr2.fit(DeepLinearNet([4, 4, 4], lr=0.02, seed=0), dm, ckpt_path=path)
