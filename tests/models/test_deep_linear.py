import math

import pytest
import torch

from conftest import F64, rel
from helpers import trainer
from lightning_flat import functional as F
from lightning_flat.datamodules import MatrixSensingDataModule
from lightning_flat.measurements import MeasurementBatch
from lightning_flat.models import DeepLinearNet


def test_shapes_and_end_to_end():
    net = DeepLinearNet([3, 5, 4, 2], seed=1)
    W = net.weights()
    assert [tuple(w.shape) for w in W] == [(5, 3), (4, 5), (2, 4)]
    assert rel(net.end_to_end(), W[2] @ W[1] @ W[0]) < 1e-6
    assert net.dtype == torch.float32 and net.double().end_to_end().dtype == F64


def test_seed_fixes_the_draw():
    a, b, c = DeepLinearNet([4, 4, 4], seed=3), DeepLinearNet([4, 4, 4], seed=3), DeepLinearNet([4, 4, 4], seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a.weights(), b.weights()))
    assert not torch.equal(a.weights()[0], c.weights()[0])


def test_gaussian_init_scale_is_entry_std():
    net = DeepLinearNet([200, 300, 100], init="gaussian", init_scale=0.5)
    for W in net.weights():
        assert abs(float(W.std()) - 0.5) < 0.01
    default = DeepLinearNet([400, 300], init="gaussian")
    assert abs(float(default.weights()[0].std()) - 1 / math.sqrt(400)) < 0.002


def test_uniform_init_matches_nn_linear_default_bound():
    W = DeepLinearNet([100, 200], init="uniform").weights()[0]
    assert float(W.abs().max()) <= 0.1 and float(W.abs().max()) > 0.099
    W = DeepLinearNet([100, 200], init="uniform", init_scale=0.2).weights()[0]
    assert abs(float(W.std()) - 0.2) < 0.005


def test_orthogonal_identity_balanced_inits():
    for W in DeepLinearNet([3, 5, 2], init="orthogonal", init_scale=2.0).double().weights():
        small = min(W.shape)
        gram = W.T @ W if W.shape[0] >= W.shape[1] else W @ W.T
        assert rel(gram, 4.0 * torch.eye(small, dtype=F64)) < 1e-6
    W = DeepLinearNet([3, 4, 3], init="identity").weights()
    assert torch.equal(W[0], torch.eye(4, 3)) and torch.equal(W[1], torch.eye(3, 4))
    net = DeepLinearNet([6, 5, 4, 6], init="balanced", init_scale=0.7).double()
    for j, Wj in enumerate(net.weights()[:-1]):
        Wn = net.weights()[j + 1]
        assert rel(Wn.T @ Wn, Wj @ Wj.T) < 1e-5


def test_loss_is_mean_squared_error_without_half():
    dm = MatrixSensingDataModule(n=30, d_out=3, d_in=4, rank=1, seed=0)
    net = DeepLinearNet([4, 5, 3]).double()
    E = net.end_to_end()
    batch = MeasurementBatch(dm.measurements, dm.targets)
    ref = ((torch.einsum("nij,ij->n", dm.measurements.A, E) - dm.targets) ** 2).mean()
    assert rel(net.loss(batch), ref) < 1e-12
    assert rel(net.loss({"measurements": dm.measurements, "targets": dm.targets}), ref) < 1e-12
    with pytest.raises(TypeError, match="batch must be a MeasurementBatch"):
        net.loss(torch.zeros(3))


def test_one_sgd_step_is_the_hand_computed_update():
    """Full-batch GD with ridge: W <- W - lr (grad L + lam W), in float64."""
    dm = MatrixSensingDataModule(n=20, d_out=3, d_in=3, rank=1, batch_size=None, seed=0)
    net = DeepLinearNet([3, 4, 3], lr=0.05, weight_decay=0.1, seed=2)
    W0 = [w.detach().double().clone().requires_grad_() for w in net.weights()]
    loss = F.measurement_loss(W0[1] @ W0[0], dm.measurements, dm.targets)
    grads = torch.autograd.grad(loss, W0)
    expected = [w - 0.05 * (g + 0.1 * w) for w, g in zip(W0, grads)]
    tr, _ = trainer(1)
    tr.fit(net, dm)
    assert all(rel(w, e) < 1e-12 for w, e in zip(net.weights(), expected))


def test_training_logs_losses_and_test_error():
    dm = MatrixSensingDataModule(n=60, d_out=4, d_in=4, rank=1, batch_size=10, seed=0)
    net = DeepLinearNet([4, 4, 4], lr=0.02)
    tr, mem = trainer(20, log_every_n_steps=5)
    tr.fit(net, dm)
    steps, _ = mem.series("train/loss")
    assert steps == [4, 9, 14, 19]
    assert set(mem.history) >= {"train/loss", "train/full_loss", "test/error", "test/relative_error"}
    E = net.end_to_end().double()
    assert rel(dm.test_error(E), mem.last("test/error")) < 0.2  # last log is one step before the end


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(dims=[3]), "dims must list at least"),
        (dict(dims=[3, -1]), r"dims\[1\] must be a positive int"),
        (dict(dims=[3, 3], init="xavier"), "init must be one of"),
        (dict(dims=[3, 3], init_scale=-1.0), "init_scale must be >= 0"),
        (dict(dims=[3, 3], lr=-0.1), "lr must be >= 0"),
        (dict(dims=[3, 3], weight_decay=-1), "weight_decay must be >= 0"),
        (dict(dims=[3, 3], momentum=1.0), "momentum must be < 1"),
        (dict(dims=[3, 3], replicas=0), "replicas must be a positive int"),
    ],
    ids=["short-dims", "negative-width", "init", "init_scale", "lr", "weight_decay", "momentum", "replicas"],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DeepLinearNet(**kwargs)
