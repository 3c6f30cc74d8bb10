"""Divergence never crashes a run: with every measuring callback (and the README's set), single runs and replicas,
with and without FiniteLossGuard, a run at a learning rate that blows up ends cleanly; no NaN or inf point reaches
the loggers, frozen replicas are not measured, healthy replicas train on."""

import math

import pytest
import torch

from helpers import trainer
from lightning_flat.callbacks import (SAM, Balancedness, EffectiveRank, FiniteLossGuard, HessianTrace,
                                      HyperparameterSchedule, LabelNoise, MatrixNorms, Sharpness)
from lightning_flat.datamodules import MatrixSensingDataModule
from lightning_flat.models import DeepLinearNet

CALLBACKS = {
    "trace": lambda: [HessianTrace(5)],
    "sharpness-exact": lambda: [Sharpness(5, method="exact")],
    "sharpness-lanczos": lambda: [Sharpness(5, method="lanczos")],
    "norms": lambda: [MatrixNorms(5)],
    "ranks": lambda: [EffectiveRank(5)],
    "balance": lambda: [Balancedness(5)],
    "readme": lambda: [LabelNoise(1.0), HyperparameterSchedule(label_noise=[(0, 1.0), (30, 0.0)]), HessianTrace(5),
                       Sharpness(5), MatrixNorms(5)],
}


@pytest.mark.parametrize("replicas", [1, 3], ids=["single", "replicas"])
@pytest.mark.parametrize("guard", [False, True], ids=["no-guard", "guard"])
@pytest.mark.parametrize("name", list(CALLBACKS))
def test_a_diverging_run_ends_cleanly(name, guard, replicas, capfd):
    dm = MatrixSensingDataModule(n=30, d_out=4, d_in=4, rank=1, batch_size=6, seed=0)
    net = DeepLinearNet([4, 4, 4], lr=50.0 if replicas == 1 else [0.01, 50.0, 0.02], replicas=replicas, seed=0)
    cbs = CALLBACKS[name]() + ([FiniteLossGuard(check_grads=True)] if guard else [])
    tr, mem = trainer(60, cbs, log_every_n_steps=5)
    with pytest.warns(UserWarning):  # the guard's stop, or the frozen replica, is said
        tr.fit(net, dm)
    assert all(math.isfinite(v) for key in mem.history for _, v in mem.history[key]), name
    assert "MKL" not in capfd.readouterr().out  # no LAPACK error spam from measuring a diverged state
    if replicas > 1:
        assert net.replicas.active.tolist() == [True, False, True] and tr.global_step == 60
        assert all(torch.isfinite(w[[0, 2]]).all() for w in net.weights())
        frozen_at = net.diverged[1][0]
        assert all(s <= frozen_at for k, v in mem.history.items() if k.endswith("/r1") for s, _ in v)  # none after
    elif guard:
        assert all(torch.isfinite(w).all() for w in net.weights())


def test_a_non_finite_sam_gradient_is_refused_like_a_non_finite_loss():
    dm = MatrixSensingDataModule(n=30, d_out=4, d_in=4, rank=1, batch_size=6, seed=0)
    guard = FiniteLossGuard()
    tr, _ = trainer(200, [SAM(rho=1e6), guard])  # an absurd ascent radius: the SAM gradient blows up first
    with pytest.warns(UserWarning, match="non-finite (gradient|training loss)"):
        tr.fit(DeepLinearNet([4, 4, 4], lr=0.5), dm)
    assert guard.stopped_step is not None
