"""SGD with weight decay on the engine, against the exact identities the rank-jump mechanism rests on: the
balancedness recursion of one step, the geometric decay of a direction that gets no gradient, and the fixed point at
zero (float64, the 2 x 2 completion problem of examples/wang_jacot2023)."""

import math

import pytest
import torch

from conftest import F64
from lightning_flat import functional as F
from lightning_flat.datamodules import MeasurementDataModule, MeasurementSampler
from lightning_flat.experiments.training import trainer
from lightning_flat.measurements import Entries
from lightning_flat.models import DeepLinearNet

EPS64 = torch.finfo(F64).eps


def net(depth, seed, width=6):
    return DeepLinearNet([2] + [width] * (depth - 1) + [2], init="uniform", lr=0.03, weight_decay=0.1,
                         seed=seed).double()


def fit(model, dm, steps, lr, ridge):
    """``steps`` more library SGD steps (a new Trainer: its steps count from 0)."""
    model.lr, model.weight_decay = lr, ridge
    trainer(steps).fit(model, dm)


@pytest.mark.parametrize("depth, batch", [(3, 1), (4, 2), (3, None)])
def test_one_step_obeys_the_balancedness_recursion(depth, batch):
    """D_l(t+1) = (1 - lr ridge)^2 D_l(t) + lr^2 (T_{l+1}^T T_{l+1} - T_l T_l^T), D_l = W_{l+1}^T W_{l+1} - W_l W_l^T,
    T_l the minibatch gradient: ridge is weight decay in exactly these units."""
    meas = Entries(torch.tensor([0, 1, 1]), torch.tensor([0, 0, 1]), (2, 2), dtype=F64)
    b = torch.tensor([1.0, 0.25, 1.0], dtype=F64)
    dm = MeasurementDataModule.from_problem(meas, b, batch_size=batch, seed=3)
    model, lr, ridge = net(depth, 7), 0.2, 0.1
    fit(model, dm, 5, lr, ridge)  # a few steps first: the state is not the init
    W0 = [w.detach().clone() for w in model.weights()]
    batch_ = MeasurementSampler(meas, b, batch, dm.seed, 100_000, streams=model.replicas.streams).batch(0)
    Ws = [w.clone().requires_grad_(True) for w in W0]  # the batch of the next Trainer's first step, by autograd
    T = torch.autograd.grad(F.measurement_loss(F.end_to_end(Ws), batch_.measurements, batch_.targets), Ws)
    fit(model, dm, 1, lr, ridge)
    W1 = [w.detach() for w in model.weights()]
    for l in range(depth - 1):
        def gap(W):
            return W[l + 1].T @ W[l + 1] - W[l] @ W[l].T

        want = (1 - lr * ridge) ** 2 * gap(W0) + lr ** 2 * (T[l + 1].T @ T[l + 1] - T[l] @ T[l].T)
        # float64: O(10) roundings of O(|W|^2) terms; relative 1e-12 is 100x above them
        assert float((gap(W1) - want).abs().max() / gap(W0).abs().max()) <= 1e-12


@pytest.mark.parametrize("rows, cols, part", [
    ([0, 1], [0, 0], lambda W: W[0][:, 1]),  # only column 0 drawn: W_1's column 1 gets no gradient
    ([1, 1], [0, 1], lambda W: W[-1][0, :]),  # only row 1 drawn: W_L's row 0 gets none
], ids=["column 0 only", "row 1 only"])
def test_an_unfed_direction_decays_geometrically(rows, cols, part):
    steps, lr, ridge = 300, 0.2, 0.1
    dm = MeasurementDataModule.from_problem(Entries(torch.tensor(rows), torch.tensor(cols), (2, 2), dtype=F64),
                                            torch.tensor([1.0, 0.25], dtype=F64), batch_size=1, seed=1)
    model = net(3, 11)
    before = [w.detach().clone() for w in model.weights()]
    fit(model, dm, steps, lr, ridge)
    after = [w.detach() for w in model.weights()]
    want = (1 - lr * ridge) ** steps * part(before)
    # each step rounds the decayed entries once: relative error <= 2 steps eps
    assert float((part(after) - want).abs().max() / want.abs().max()) <= 2 * steps * EPS64
    if cols == [0, 0]:  # so the second singular value of E is bounded by the decayed column
        bound = (1 - lr * ridge) ** steps * float(part(before).norm()) * math.prod(
            float(torch.linalg.matrix_norm(W, 2)) for W in after[1:])
        assert float(torch.linalg.svdvals(F.end_to_end(after))[1]) <= bound * (1 + 1e-12)


def test_zero_is_a_fixed_point():
    meas = Entries(torch.tensor([0, 1, 1]), torch.tensor([0, 0, 1]), (2, 2), dtype=F64)
    dm = MeasurementDataModule.from_problem(meas, torch.tensor([1.0, 0.25, 1.0], dtype=F64), batch_size=1)
    model = net(3, 0)
    with torch.no_grad():
        for W in model.weights():
            W.zero_()
    fit(model, dm, 50, 0.4, 0.1)
    assert max(float(w.detach().abs().max()) for w in model.weights()) == 0.0
