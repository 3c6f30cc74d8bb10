"""Analytic gradients against autograd, float64: the chain rule of every parameterization, and whole engine steps
(momentum, weight decay, replicas) with the analytic oracle against the autograd oracle.

Tolerance: both sides evaluate the same products of at most L = 10 factors of width <= 7 in another order, so their
relative difference is a few (L d) eps ~ 1e-14; 1e-12 leaves a margin and still fails on any wrong term."""

import pytest
import torch

from conftest import randn, rel
from helpers import make_measurements, trainer
from lightning_flat import functional as F
from lightning_flat.callbacks import LabelNoise, HyperparameterSchedule
from lightning_flat.datamodules import MatrixSensingDataModule, MeasurementDataModule
from lightning_flat.functional.gradients import chain_prefixes, chain_vjp, residual_and_end_to_end_gradient
from lightning_flat.measurements import RankOne
from lightning_flat.models import DeepLinearNet, QuadraticNet

TOL = 1e-12


def autograd_grads(loss_fn, weights):
    leaves = [w.detach().clone().requires_grad_() for w in weights]
    return torch.autograd.grad(loss_fn(leaves), leaves)


@pytest.mark.parametrize("depth", range(1, 11))
@pytest.mark.parametrize("replicas", [None, 3], ids=["single", "replicas"])
@pytest.mark.parametrize("kind", ["dense", "rankone", "entries"])
def test_chain_gradients_equal_autograd(depth, replicas, kind, gen):
    dims = [int(d) for d in torch.randint(2, 8, (depth + 1,), generator=gen)]
    lead = () if replicas is None else (replicas,)
    W = [randn(*lead, dims[j + 1], dims[j], g=gen) / dims[j] ** 0.5 for j in range(depth)]
    meas = make_measurements(kind, 11, dims[-1], dims[0], gen)
    y = randn(*lead, 11, g=gen)

    def loss(ws):
        return F.measurement_loss(F.end_to_end(ws), meas, y).sum()

    P = chain_prefixes(W)
    losses, G = residual_and_end_to_end_gradient(P[-1], meas, y)
    assert rel(losses.sum(), loss(W)) < TOL
    for a, b in zip(chain_vjp(W, P, G), autograd_grads(loss, W)):
        assert rel(a, b) < TOL


@pytest.mark.parametrize("replicas", [1, 2])
def test_quadratic_gradients_equal_autograd(replicas, gen):
    net = QuadraticNet(6, 3, 2, replicas=replicas).double()
    x = randn(9, 6, g=gen)
    meas, y = RankOne(x, x), randn(9, g=gen)
    W = [w.detach() for w in net.weights()]
    E, cache = net.end_to_end_and_cache(W)
    _, G = residual_and_end_to_end_gradient(E, meas, y)
    ref = autograd_grads(lambda ws: net.replica_losses_from_weights(ws, (meas, y)).sum(), W)
    for a, b in zip(net.end_to_end_vjp(W, cache, G), ref):
        assert rel(a, b) < TOL


def fit(model, steps=30, callbacks=(), dm=None):
    dm = dm or MatrixSensingDataModule(n=30, d_out=3, d_in=4, rank=1, batch_size=7, seed=0)
    tr, mem = trainer(steps, callbacks)
    tr.fit(model, dm)
    return model, mem


@pytest.mark.parametrize("depth", [1, 2, 5, 10])
def test_training_analytic_equals_autograd(depth):
    """30 SGD steps with momentum, weight decay, label noise and an lr schedule: the two oracles agree (the runs
    start equal and each step's gradient agrees to ~1e-14, so 30 steps stay within 1e-12)."""
    def run(gradients, replicas):
        kw = dict(lr=[0.02, 0.03], weight_decay=[0.01, 0.0]) if replicas == 2 else dict(lr=0.02, weight_decay=0.01)
        net = DeepLinearNet([4] + [5] * (depth - 1) + [3], momentum=0.5, replicas=replicas, seed=3,
                            gradients=gradients, **kw)
        cbs = [LabelNoise(0.2), HyperparameterSchedule(lr={"replicas": [[(0, 0.02), (10, 0.01)], 0.03]}
                                                       if replicas == 2 else [(0, 0.02), (10, 0.01)])]
        return fit(net, callbacks=cbs)[0]

    for replicas in (1, 2):
        a, b = run("analytic", replicas), run("autograd", replicas)
        assert a.engine.oracle == "analytic" and b.engine.oracle == "autograd"
        assert a.engine.mode == b.engine.mode == "fused"
        for wa, wb in zip(a.weights(), b.weights()):
            assert rel(wa, wb) < TOL


def test_quadratic_training_analytic_equals_autograd(gen):
    x = randn(40, 5, g=gen)
    dm = MeasurementDataModule.from_problem(RankOne(x, x), (x[:, :2] ** 2).sum(1), batch_size=8)
    a = fit(QuadraticNet(5, 3, 1, lr=0.01, momentum=0.3, weight_decay=0.01, seed=1), dm=dm)[0]
    b = fit(QuadraticNet(5, 3, 1, lr=0.01, momentum=0.3, weight_decay=0.01, seed=1, gradients="autograd"), dm=dm)[0]
    assert a.engine.oracle == "analytic"
    assert all(rel(wa, wb) < TOL for wa, wb in zip(a.weights(), b.weights()))


def test_trace_penalty_and_subclassed_parameterization_use_autograd():
    net = fit(DeepLinearNet([4, 3], trace_penalty=0.1), steps=2)[0]
    assert net.engine.oracle == "autograd" and net.engine.mode == "fused"

    class Scaled(DeepLinearNet):  # a new parameterization without its vector-Jacobian product
        def end_to_end_from(self, weights):
            return 2.0 * F.end_to_end(weights)

    s = fit(Scaled([4, 5, 3], seed=1), steps=5)[0]
    ref = fit(Scaled([4, 5, 3], seed=1, gradients="autograd"), steps=5)[0]
    assert s.engine.oracle == "autograd"
    assert all(torch.equal(a, b) for a, b in zip(s.weights(), ref.weights()))


@pytest.mark.parametrize("depth", [1, 3, 10])
def test_residual_training_analytic_equals_autograd(depth):
    from lightning_flat.datamodules import UnivariateRegressionDataModule
    from lightning_flat.models import ResidualLinearNet

    dm = UnivariateRegressionDataModule(n=30, d=4, seed=2, batch_size=8)
    runs = [fit(ResidualLinearNet(4, depth, scale=[0.5, 1.0], lr=[0.01, 0.02], momentum=0.5, weight_decay=0.01,
                                  replicas=2, seed=[1, 2], gradients=g), dm=dm)[0] for g in ("analytic", "autograd")]
    assert [r.engine.oracle for r in runs] == ["analytic", "autograd"]
    assert all(rel(a, b) < TOL for a, b in zip(runs[0].weights(), runs[1].weights()))
