"""Replicas: R networks in one module train exactly as R single runs with the corresponding seeds and settings."""

import pytest
import torch

from conftest import F64, rel
from helpers import trainer
from lightning_flat import functional as F
from lightning_flat.callbacks import (SAM, FiniteLossGuard, HessianTrace, HyperparameterSchedule, LabelNoise,
                                      MatrixNorms, Sharpness)
from lightning_flat.datamodules import MatrixSensingDataModule, MeasurementDataModule
from lightning_flat.measurements import Entries
from lightning_flat.models import DeepLinearNet, ResidualLinearNet
from lightning_flat.engine import ReplicaGrid

DIMS = [4, 5, 3]


def data(batch_size=5):
    return MatrixSensingDataModule(n=30, d_out=3, d_in=4, rank=1, batch_size=batch_size, seed=0)


def fit(model, steps, callbacks=(), batch_size=5, dm=None):
    tr, mem = trainer(steps, callbacks)
    tr.fit(model, dm or data(batch_size))
    return model, mem


def close(replica_model, r, single, tol=1e-10):
    return all(rel(W[r], S) < tol for W, S in zip(replica_model.weights(), single.weights()))


def test_eight_replicas_equal_eight_single_runs():
    lrs = [0.01 * (r + 1) for r in range(8)]
    wds = [0.0, 0.1, 0.0, 0.2, 0.0, 0.05, 0.0, 0.3]
    rep, _ = fit(DeepLinearNet(DIMS, lr=lrs, weight_decay=wds, momentum=0.5, replicas=8, seed=10), 200)
    assert rep.replicas.seeds == list(range(10, 18))
    for r in range(8):
        single, _ = fit(DeepLinearNet(DIMS, lr=lrs[r], weight_decay=wds[r], momentum=0.5, seed=10 + r), 200)
        assert close(rep, r, single), r


@pytest.mark.parametrize("batch_size", [4, None], ids=["sgd", "gd"])
def test_label_noise_per_replica_equals_single_runs(batch_size):
    rep, _ = fit(DeepLinearNet(DIMS, lr=0.02, replicas=3, seed=[5, 9, 9]), 60, [LabelNoise([0.3, 0.3, 0.6], seed=7)],
                 batch_size=batch_size)
    for r, (s, std) in enumerate([(5, 0.3), (9, 0.3), (9, 0.6)]):
        single, _ = fit(DeepLinearNet(DIMS, lr=0.02, seed=s), 60, [LabelNoise(std, seed=7)], batch_size=batch_size)
        assert close(rep, r, single), r
    assert not close(rep, 1, fit(DeepLinearNet(DIMS, lr=0.02, seed=9), 60, batch_size=batch_size)[0])


def test_per_replica_schedules_and_sam():
    sched = HyperparameterSchedule(lr={"replicas": [[(0, 0.1), (5, 0.01)], 0.05]})
    rep, mem = fit(DeepLinearNet(DIMS, replicas=2, seed=3), 12, [sched, SAM(0.05, m=2)])
    for r, lr in enumerate([[(0, 0.1), (5, 0.01)], 0.05]):
        single, _ = fit(DeepLinearNet(DIMS, seed=3 + r), 12, [HyperparameterSchedule(lr=lr), SAM(0.05, m=2)])
        assert close(rep, r, single), r
    assert mem.history["hparams/lr/r1"][0] == (0, 0.05)


def test_a_diverging_replica_is_frozen_and_the_others_are_untouched():
    lrs = [0.02, 0.02, 30.0, 0.02]
    guard = FiniteLossGuard()
    with pytest.warns(UserWarning, match=r"replica 2 \(seed 2\) diverged at step \d+"):
        rep, mem = fit(DeepLinearNet([4, 5, 5, 3], lr=lrs, replicas=4, seed=0), 40, [guard, HessianTrace(10)])
    ref, _ = fit(DeepLinearNet([4, 5, 5, 3], lr=[0.02] * 4, replicas=4, seed=0), 40)
    assert rep.replicas.active.tolist() == [True, True, False, True] and 2 in rep.diverged
    assert guard.stopped_step is None  # the run went on
    for r in (0, 1, 3):
        assert all(torch.equal(W[r], V[r]) for W, V in zip(rep.weights(), ref.weights()))
    # logged means are over the active replicas only
    tr_last = F.hessian_trace(rep.weights(), data().measurements)
    assert rel(mem.last("hessian/trace"), tr_last[[0, 1, 3]].mean()) < 1e-12
    assert mem.last("replicas/active") == 3.0


def test_guard_policy_any_stops_at_the_first_diverged_replica():
    guard = FiniteLossGuard(replicas="any")
    with pytest.warns(UserWarning, match="diverged"):
        fit(DeepLinearNet([4, 5, 5, 3], lr=[0.05, 30.0], replicas=2), 100, [guard])
    assert guard.stopped_step is not None and "replica" in guard.message


def test_callbacks_measure_each_replica():
    cbs = [HessianTrace(5), Sharpness(5, method="lanczos", tol=1e-10), MatrixNorms(5)]
    rep, mem = fit(DeepLinearNet(DIMS, lr=0.03, replicas=3, seed=0), 10, cbs)
    dm = data()
    for r in range(3):
        W = [w[r].detach() for w in rep.weights()]
        H = F.loss_hessian(W, dm.measurements, dm.targets)
        step, values = cbs[0].replica_history["hessian/trace"][-1]
        assert step == 10 and rel(values[r], F.hessian_trace(W, dm.measurements)) < 1e-12
        assert rel(cbs[1].replica_history["hessian/sharpness"][-1][1][r], torch.linalg.eigvalsh(H)[-1]) < 1e-6
        assert rel(mem.last(f"norm/nuclear/r{r}"), F.nuclear_norm(F.end_to_end(W))) < 1e-12
    columns, rows = cbs[0].replica_table()
    assert columns == ["step", "replica", "hessian/trace"] and len(rows) == 3 * 3


def test_grid_round_trip_and_custom_problem():
    grid = ReplicaGrid(seeds=[0, 1, 2], lr=[0.05, 0.1])
    model = DeepLinearNet([2, 8, 2], init="uniform", **grid.model_kwargs())
    dm = MeasurementDataModule.from_problem(Entries(torch.tensor([0, 1, 1]), torch.tensor([0, 0, 1]), (2, 2)),
                                            torch.tensor([1.0, 0.25, 1.0], dtype=F64), batch_size=1)
    fit(model, 20, dm=dm)
    losses = F.measurement_loss(model.end_to_end().detach(), dm.measurements, dm.targets)
    table = grid.table(loss=losses)
    assert table["seed"] == [0, 0, 1, 1, 2, 2] and table["lr"] == [0.05, 0.1] * 3 and len(table["loss"]) == 6
    single, _ = fit(DeepLinearNet([2, 8, 2], init="uniform", lr=0.1, seed=1), 20, dm=dm)
    assert close(model, 3, single)


def test_a_single_run_takes_the_replica_argument_forms():
    """R = 1 with lists of one value is the single run with those values: no caller branches on the count."""
    a = DeepLinearNet(DIMS, lr=[0.05], weight_decay=[0.01], init_scale=[0.3], seed=[4])
    b = DeepLinearNet(DIMS, lr=0.05, weight_decay=0.01, init_scale=0.3, seed=4)
    assert a.replicas.seeds == b.replicas.seeds == [4] and a.lr == b.lr == 0.05 and a.weight_decay == 0.01
    assert all(torch.equal(x, y) for x, y in zip(a.weights(), b.weights()))
    ra, rb = ResidualLinearNet(3, 2, scale=[0.5], seed=[2]), ResidualLinearNet(3, 2, scale=0.5, seed=2)
    assert all(torch.equal(x, y) for x, y in zip(ra.weights(), rb.weights())) and torch.equal(ra.w, rb.w)


def test_bad_replica_arguments():
    with pytest.raises(ValueError, match=r"lr must be a number or a list of 3 numbers"):
        DeepLinearNet(DIMS, replicas=3, lr=[0.1, 0.2])
    with pytest.raises(ValueError, match="seed must be an int or a list of 3 ints"):
        DeepLinearNet(DIMS, replicas=3, seed=[1, 2])
    with pytest.raises(ValueError, match=r"lr must be a number or a list of 1 numbers"):
        DeepLinearNet(DIMS, lr=[0.1, 0.2])
    with pytest.raises(ValueError, match="2 per-replica schedules but the model has 3"):
        fit(DeepLinearNet(DIMS, replicas=3), 1, [HyperparameterSchedule(lr=[0.1, 0.2])])
    with pytest.raises(ValueError, match="sam_rho cannot be set per replica"):
        HyperparameterSchedule(sam_rho=[0.1, 0.2])
    with pytest.raises(ValueError, match="seeds must be a non-empty list"):
        ReplicaGrid(seeds=[])
