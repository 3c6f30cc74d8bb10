"""The examples' training frame: fit (a Trainer with a memory logger), the step recorder and quiet(), against plain
gradient descent written out by hand with autograd."""

import logging
import os
import warnings

import torch

from conftest import rel
from lightning_flat import functional as F
from lightning_flat.datamodules import UnivariateRegressionDataModule
from lightning_flat.experiments.recording import StepRecorder
from lightning_flat.experiments.training import fit, quiet, trainer, wandb_group
from lightning_flat.models import DeepLinearNet

LR, STEPS = 0.05, 10
# float64: the engine's analytic gradients and autograd agree to ~1e-15 per step; 10 contracting steps stay below 1e-12
TOL = 1e-12


def problem():
    dm = UnivariateRegressionDataModule(n=20, d=3, seed=1)  # full batch: plain gradient descent
    return dm, DeepLinearNet([3, 3, 1], init="gaussian", init_scale=0.5, lr=LR, seed=2).double()


def by_hand(model, dm, steps):
    """Gradient descent on the library's loss by autograd: the weights, losses and products of every state."""
    W = [w.detach().clone().requires_grad_(True) for w in model.weights()]
    states, losses, products = [], [], []
    for _ in range(steps + 1):
        states.append([w.detach().clone() for w in W])
        loss = F.measurement_loss(F.end_to_end(W), dm.measurements, dm.targets)
        losses.append(float(loss.detach()))
        products.append(F.end_to_end(W).detach().clone())
        grads = torch.autograd.grad(loss, W)
        with torch.no_grad():
            for w, g in zip(W, grads):
                w -= LR * g
    return states, losses, products


def test_fit_and_the_recorder_follow_gradient_descent():
    dm, model = problem()
    states, losses, products = by_hand(model, dm, STEPS)
    rec = StepRecorder(snapshot_steps=[0, 3, 7], track_from=2)
    done = fit(model, dm, STEPS, callbacks=[rec], log_every_n_steps=5)
    assert all(rel(w, s) < TOL for w, s in zip(model.weights(), states[STEPS]))
    # the recorder: losses and products of the states 2..9 (before each update), weights at 0, 3, 7 and the end
    assert len(rec.losses) == len(rec.products) == STEPS - 2
    assert all(abs(float(a) / b - 1) < TOL for a, b in zip(rec.losses, losses[2:STEPS]))
    assert all(rel(a, b) < TOL for a, b in zip(rec.products, products[2:STEPS]))
    assert sorted(rec.snapshots) == [0, 3, 7, STEPS]
    for step, weights in rec.snapshots.items():
        assert all(rel(w, s) < TOL for w, s in zip(weights, states[step]))
    # the memory logger keeps what the model logged: the full loss of the state after 4 and 9 updates
    logged = done.memory.history["train/full_loss"]
    assert [s for s, _ in logged] == [4, 9] and all(abs(v / losses[s] - 1) < TOL for s, v in logged)
    assert done.trainer.global_step == STEPS and done.seconds > 0


def test_products_can_be_left_out_and_replicas_keep_their_dimension():
    dm = UnivariateRegressionDataModule(n=20, d=3, seed=1)
    model = DeepLinearNet([3, 3, 1], init="gaussian", init_scale=[0.5, 0.3], lr=LR, replicas=2, seed=[2, 5]).double()
    rec = StepRecorder(snapshot_steps=[1], track_from=0, products=False)
    trainer(3, callbacks=[rec]).fit(model, dm)
    assert rec.products == [] and len(rec.losses) == 3 and rec.losses[0].shape == (2,)
    assert [tuple(w.shape) for w in rec.snapshots[1]] == [(2, 3, 3), (2, 1, 3)]
    singles = [DeepLinearNet([3, 3, 1], init="gaussian", init_scale=s, lr=LR, seed=k).double() for s, k in
               ((0.5, 2), (0.3, 5))]
    for r, single in enumerate(singles):  # each replica is the run of its own seed and scale
        states, _, _ = by_hand(single, dm, 1)
        assert all(rel(w[r], s) < TOL for w, s in zip(rec.snapshots[1], states[1]))


def test_wandb_group_is_the_output_folder_name():
    # fit(wandb=...) itself runs in every example's quick test, which counts the offline runs it leaves
    assert wandb_group("outputs/gatmiry2023_quick/") == wandb_group("outputs/gatmiry2023_quick") == "gatmiry2023_quick"


def test_quiet_silences_what_the_examples_count_themselves(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    threads = torch.get_num_threads()
    for name in ("lightning.pytorch", "lightning.pytorch.utilities.rank_zero", "lightning.fabric"):
        monkeypatch.setattr(logging.getLogger(name), "level", logging.getLogger(name).level)  # restored afterwards
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        try:
            assert quiet(1) == 1 and torch.get_num_threads() == 1
            warnings.warn("replica 3 diverged at step 12")
            warnings.warn("something else")
        finally:
            torch.set_num_threads(threads)
    assert [str(w.message) for w in seen] == ["something else"]
    assert os.environ["WANDB_MODE"] == "offline"
    assert logging.getLogger("lightning.pytorch").level == logging.WARNING
