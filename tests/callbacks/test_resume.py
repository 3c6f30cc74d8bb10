"""Kill and resume: a seeded run stopped at step k and resumed from its checkpoint ends bitwise where the
uninterrupted run ends (sampler, LabelNoise, SAM, schedules, optimizer state, measuring-callback histories)."""

import math
import os

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from helpers import KillAt, Killed, trainer
from lightning_flat.callbacks import SAM, FiniteLossGuard, HessianTrace, HyperparameterSchedule, LabelNoise
from lightning_flat.datamodules import MatrixSensingDataModule
from lightning_flat.models import DeepLinearNet

STEPS = 12




def setup(tmp, extra=()):
    dm = MatrixSensingDataModule(n=30, d_out=3, d_in=4, rank=1, batch_size=5, seed=0)
    net = DeepLinearNet([4, 5, 3], lr=0.05, momentum=0.9, seed=2)
    cbs = [LabelNoise(0.5, seed=1), SAM(rho=0.05, m=1), HessianTrace(3),
           HyperparameterSchedule(lr=[(0, 0.05), (7, {"shape": "cosine", "start": 0.05, "end": 0.01, "steps": 4})],
                                  label_noise=[(0, 0.5), (9, 0.1)]),
           ModelCheckpoint(dirpath=str(tmp), every_n_train_steps=5, save_top_k=-1, filename="{step}"), *extra]
    tr, mem = trainer(STEPS, cbs, enable_checkpointing=True)
    return dm, net, tr, mem, cbs


def test_kill_and_resume_is_bitwise(tmp_path):
    dm, ref, tr, ref_mem, ref_cbs = setup(tmp_path / "a")
    tr.fit(ref, dm)

    dm, net, tr, _, _ = setup(tmp_path / "b", [KillAt(7)])
    with pytest.raises(Killed):
        tr.fit(net, dm)
    ckpt = tmp_path / "b" / "step=5.ckpt"
    assert ckpt.exists()

    dm, resumed, tr, mem, cbs = setup(tmp_path / "c")
    tr.fit(resumed, dm, ckpt_path=str(ckpt))
    assert tr.global_step == STEPS
    assert all(torch.equal(a, b) for a, b in zip(ref.weights(), resumed.weights()))
    # the measuring callback's curve continues exactly: restored history plus the resumed steps
    assert cbs[2].history["hessian/trace"] == ref_cbs[2].history["hessian/trace"]
    assert cbs[0].last_std == ref_cbs[0].last_std == 0.1 and cbs[0].std == 0.5  # scheduled, configured
    # and the logged curves after the restart are the uninterrupted run's, step for step
    for key in ("hessian/trace", "train/loss", "train/full_loss", "hparams/lr", "hparams/label_noise"):
        assert mem.history[key] == [e for e in ref_mem.history[key] if e[0] >= 5], key


def test_divergence_keeps_the_last_checkpoint_loadable(tmp_path):
    dm = MatrixSensingDataModule(n=50, d_out=5, d_in=5, rank=1, batch_size=10, seed=0)
    net = DeepLinearNet([5, 5, 5, 5], lr=10.0)
    guard = FiniteLossGuard()
    ckpt = ModelCheckpoint(dirpath=str(tmp_path), every_n_train_steps=1, save_last=True)
    tr, mem = trainer(500, [guard, ckpt], enable_checkpointing=True)
    with pytest.warns(UserWarning, match="non-finite training loss"):
        tr.fit(net, dm)
    assert guard.stopped_step is not None
    state = torch.load(os.path.join(tmp_path, "last.ckpt"), weights_only=False)["state_dict"]
    loaded = [state[f"layers.{j}"] for j in range(3)]
    assert all(torch.isfinite(w).all() for w in loaded)
    assert all(torch.equal(w, p.detach()) for w, p in zip(loaded, net.weights()))
    # no NaN/inf point is drawn: the stop step's non-finite loss is in the guard's record, not in the curves
    steps, losses = mem.series("train/loss")
    assert not math.isfinite(guard.stopped_value) and steps[-1] < guard.stopped_step
    assert all(math.isfinite(v) for key in mem.history for _, v in mem.history[key])
