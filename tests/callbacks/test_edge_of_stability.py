"""Sharpness in edge-of-stability mode on the univariate-regression models: 2/lr read from the optimizer (a schedule
is followed), the exact top eigenvalue of the dense Hessian, per replica, diverged replicas left out."""

import math

import torch

from conftest import rel
from helpers import trainer
from lightning_flat import functional as F
from lightning_flat.callbacks import HyperparameterSchedule, Sharpness
from lightning_flat.datamodules import UnivariateRegressionDataModule
from lightning_flat.models import DeepLinearNet, ResidualLinearNet


def test_two_over_lr_follows_the_schedule_and_sharpness_is_exact():
    dm = UnivariateRegressionDataModule(n=30, d=4, seed=1)
    net = ResidualLinearNet(4, 3, scale=0.5, lr=[0.05, 0.02], replicas=2, seed=[1, 2])
    sharp = Sharpness(every_n_steps=5, edge_of_stability=True)
    sched = HyperparameterSchedule(lr={"replicas": [[(0, 0.05), (10, 0.01)], 0.02]})
    tr, mem = trainer(20, [sharp, sched])
    tr.fit(net, dm)
    two = dict((s, v) for s, v in sharp.replica_history["hessian/two_over_lr"])
    assert two[5] == [2 / 0.05, 2 / 0.02] and two[10] == [2 / 0.01, 2 / 0.02] and two[20] == [2 / 0.01, 2 / 0.02]
    step, values = sharp.replica_history["hessian/sharpness"][-1]
    assert step == 20
    for r in range(2):
        W = [w[r].detach() for w in net.weights()]
        H = F.loss_hessian(W, dm.measurements, dm.targets, end_to_end=net.replica_end_to_end(r))
        assert rel(values[r], torch.linalg.eigvalsh(H)[-1]) < 1e-10  # batched vs single dense Hessian, float64
    assert mem.history["hessian/two_over_lr/r0"][-1] == (20, 2 / 0.01)


def test_diverged_replicas_are_not_measured():
    dm = UnivariateRegressionDataModule(n=30, d=4, seed=1)
    net = DeepLinearNet([4, 4, 4, 1], init_scale=0.5, lr=[0.01, 50.0], replicas=2, seed=[0, 1])
    sharp = Sharpness(every_n_steps=10, edge_of_stability=True)
    tr, mem = trainer(30, [sharp])
    import pytest

    with pytest.warns(UserWarning, match="replica 1 .* diverged"):
        tr.fit(net, dm)
    _, values = sharp.replica_history["hessian/sharpness"][-1]
    assert math.isfinite(values[0]) and math.isnan(values[1])
    assert math.isfinite(sharp.history["hessian/sharpness"][-1][1])  # the mean is over the active replica
