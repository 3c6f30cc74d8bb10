"""Fused chunks: several SGD steps per Lightning call are bitwise the steps Lightning takes one per call, with every
per-step callback, boundary, checkpoint and logged value where it would be."""

import os

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint

from helpers import Killed, trainer
from lightning_flat.callbacks import (SAM, FiniteLossGuard, HessianTrace, HyperparameterSchedule, LabelNoise,
                                      MatrixNorms)
from lightning_flat.datamodules import MatrixSensingDataModule, MeasurementSampler
from lightning_flat.engine import StepHook
from lightning_flat.models import DeepLinearNet

STEPS = 47


def data():
    return MatrixSensingDataModule(n=30, d_out=3, d_in=4, rank=1, batch_size=5, seed=0, steps_per_epoch=20)


def callbacks(m=None, replicas=1):
    noise = [0.4, 0.2] if replicas == 2 else 0.4
    return [LabelNoise(noise, seed=1), SAM(rho=0.05, m=m), FiniteLossGuard(check_grads=True),
            HessianTrace(13), MatrixNorms(6),
            HyperparameterSchedule(lr=[(0, 0.05), (9, {"shape": "cosine", "start": 0.05, "end": 0.01, "steps": 20})],
                                   label_noise=[(0, 0.4), (30, 0.1)], sam_rho=[(0, 0.05), (20, 0.0)],
                                   every_n_steps=7)]


def run(chunk_size, m=None, replicas=1, extra=(), steps=STEPS, log_every=5, **kw):
    seed = [2, 5] if replicas == 2 else 2
    net = DeepLinearNet([4, 5, 3], lr=0.05, momentum=0.9, weight_decay=0.01, replicas=replicas, seed=seed,
                        chunk_size=chunk_size)
    cbs = callbacks(m, replicas) + list(extra)
    tr, mem = trainer(steps, cbs, log_every_n_steps=log_every, **kw)
    tr.fit(net, data())
    return net, mem, cbs, tr


@pytest.mark.parametrize("m", [None, 2], ids=["nSAM", "2SAM"])
@pytest.mark.parametrize("replicas", [1, 2])
def test_chunks_equal_one_step_per_call_bitwise(m, replicas):
    ref, ref_mem, ref_cbs, _ = run(1, m, replicas)
    assert ref.engine.mode == "stepwise" and "chunk_size=1" in ref.engine.reason
    for chunk_size in (7, 100):
        net, mem, cbs, tr = run(chunk_size, m, replicas)
        assert net.engine.mode == "fused" and tr.global_step == STEPS
        assert all(torch.equal(a, b) for a, b in zip(net.weights(), ref.weights()))
        assert mem.history == ref_mem.history  # every logged value at the same step
        assert cbs[3].history == ref_cbs[3].history and cbs[4].replica_history == ref_cbs[4].replica_history


class Every(Callback):
    """A user's callback with a per-step hook: it must see every global step."""

    def __init__(self):
        self.steps = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append(trainer.global_step)


def test_a_user_per_step_callback_sees_every_step_and_changes_nothing():
    every = Every()
    net, mem, _, _ = run(100, extra=[every])
    assert every.steps == list(range(1, STEPS + 1))
    assert net.engine.mode == "stepwise" and "Every.on_train_batch_end" in net.engine.reason
    ref, ref_mem, _, _ = run(100)
    assert all(torch.equal(a, b) for a, b in zip(net.weights(), ref.weights()))
    assert mem.history == ref_mem.history


class Steps(StepHook, Callback):
    """Records the engine's steps (through the declared interface, so the chunks stay fused)."""

    def __init__(self, kill_at=None):
        self.seen, self.kill_at = [], kill_at

    def step_check(self, ctx):
        if ctx.step == self.kill_at:
            raise Killed(f"killed at step {ctx.step}")
        self.seen.append(ctx.step)


class Calls(Callback):
    """Counts Lightning's training_step calls without a per-step hook (on_train_epoch_end only)."""

    def __init__(self):
        self.epochs = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.epochs.append((trainer.current_epoch, trainer.global_step))


def test_chunks_end_at_every_boundary(tmp_path):
    steps, calls = Steps(), Calls()
    ckpt = ModelCheckpoint(dirpath=str(tmp_path), every_n_train_steps=11, save_top_k=-1, filename="{step}")
    net, mem, cbs, tr = run(100, extra=[steps, calls, ckpt], enable_checkpointing=True)
    assert net.engine.mode == "fused" and tr.global_step == STEPS
    assert steps.seen == list(range(STEPS))  # every SGD step once, in order
    assert [s for s, _ in cbs[3].history["hessian/trace"]] == [0, 13, 26, 39, STEPS]  # measuring cadence + end
    assert [s for s, _ in mem.history["train/loss"]] == list(range(4, STEPS, 5))  # log_every_n_steps=5
    assert sorted(os.listdir(tmp_path)) == ["step=11.ckpt", "step=22.ckpt", "step=33.ckpt", "step=44.ckpt"]
    assert calls.epochs == [(0, 20), (1, 40), (2, 47)]  # steps_per_epoch=20 SGD steps per epoch, then max_steps
    loops = tr.fit_loop.epoch_loop.batch_progress
    assert loops.total.completed == STEPS  # Lightning's batch count is the SGD step count


def test_kill_mid_chunk_and_resume_is_bitwise(tmp_path):
    ref, ref_mem, ref_cbs, _ = run(100)
    ckpt = lambda d: ModelCheckpoint(dirpath=str(d), every_n_train_steps=11, save_top_k=-1,  # noqa: E731
                                     filename="{step}")
    killer = Steps(kill_at=30)
    with pytest.raises(Killed):
        run(100, extra=[killer, ckpt(tmp_path / "a")], enable_checkpointing=True)
    assert killer.seen == list(range(30))
    resumed_steps = Steps()
    net = DeepLinearNet([4, 5, 3], lr=0.05, momentum=0.9, weight_decay=0.01, seed=2)
    cbs = callbacks() + [resumed_steps, ckpt(tmp_path / "b")]
    tr, mem = trainer(STEPS, cbs, log_every_n_steps=5, enable_checkpointing=True)
    tr.fit(net, data(), ckpt_path=str(tmp_path / "a" / "step=22.ckpt"))
    assert net.engine.mode == "fused" and resumed_steps.seen == list(range(22, STEPS))
    assert all(torch.equal(a, b) for a, b in zip(net.weights(), ref.weights()))
    assert cbs[3].history == ref_cbs[3].history
    for key, values in mem.history.items():
        assert values == [e for e in ref_mem.history[key] if e[0] >= 22], key


def test_divergence_stops_mid_chunk_as_one_step_per_call():
    def diverge(chunk_size):
        dm = MatrixSensingDataModule(n=50, d_out=5, d_in=5, rank=1, batch_size=10, seed=0)
        net, guard = DeepLinearNet([5, 5, 5, 5], lr=10.0, chunk_size=chunk_size), FiniteLossGuard()
        tr, _ = trainer(500, [guard])
        with pytest.warns(UserWarning, match="non-finite training loss"):
            tr.fit(net, dm)
        return net, guard, tr

    net, guard, tr = diverge(100)
    ref, ref_guard, _ = diverge(1)
    assert guard.stopped_step == ref_guard.stopped_step and tr.global_step == guard.stopped_step + 1
    assert all(torch.isfinite(w).all() and torch.equal(w, v) for w, v in zip(net.weights(), ref.weights()))


class Validated(DeepLinearNet):
    def validation_step(self, batch, batch_idx):
        pass


class OwnStep(DeepLinearNet):
    def training_step(self, batch, batch_idx):
        return self.loss(batch)


@pytest.mark.parametrize("case, mode, reason", [
    (dict(trainer_kw=dict(accumulate_grad_batches=2)), "lightning", "accumulate_grad_batches=2"),
    (dict(trainer_kw=dict(gradient_clip_val=1.0)), "stepwise", "gradient_clip_val=1.0"),
    (dict(extra=[LearningRateMonitor()]), "stepwise", "LearningRateMonitor.on_train_batch_start"),
    (dict(model_kw=dict(optimizer="lbfgs", lr=1.0)), "lightning", "optimizer='lbfgs'"),
    (dict(cls=OwnStep), "lightning", "OwnStep replaces training_step"),
    (dict(cls=Validated), "stepwise", "Validated.validation_step"),
], ids=["accumulate", "clip", "lr-monitor", "lbfgs", "own-training-step", "validation"])
def test_the_engine_says_when_it_leaves_the_fused_path(case, mode, reason):
    net = case.get("cls", DeepLinearNet)([4, 3], **case.get("model_kw", {}))
    tr, _ = trainer(4, case.get("extra", []), **case.get("trainer_kw", {}))
    tr.fit(net, data())
    assert net.engine.mode == mode and reason in net.engine.reason and tr.global_step == 4


def test_own_training_step_trains_by_autograd():
    net, ref = OwnStep([4, 3], seed=1, lr=0.1), DeepLinearNet([4, 3], seed=1, lr=0.1, gradients="autograd")
    for model in (net, ref):
        trainer(5)[0].fit(model, data())
    assert all(torch.allclose(a, b, rtol=1e-12, atol=0) for a, b in zip(net.weights(), ref.weights()))


def test_sampler_items_cover_each_epoch_and_end_on_a_single_step():
    dm = data()
    sampler = MeasurementSampler(dm.measurements, dm.targets, 5, 0, 20, start_step=lambda: 13,
                                 steps_in_call=lambda s: 4)
    items = list(sampler)
    starts = [13, 17]
    assert [getattr(x, "start", None) for x in items[:2]] == starts and len(sampler) == 7
    assert [getattr(x, "length", 1) for x in items] == [4, 2, 1]  # 13-16, 17-18, then step 19 alone
    chunk = items[0]
    for t in range(13, 17):  # a chunk's batches are the one-at-a-time batches
        a, b = chunk.batch(t), sampler.batch(t)
        assert torch.equal(a.targets, b.targets) and torch.equal(a.measurements.A, b.measurements.A)
    with pytest.raises(IndexError, match="outside this chunk"):
        chunk.batch(17)


def test_a_plain_trainer_takes_the_fused_path(tmp_path):
    """DeepLinearNet, a lightning_flat datamodule, LabelNoise and Lightning's default callbacks (progress bar,
    model summary, checkpoint): no flag needed."""
    net = DeepLinearNet([4, 5, 3])
    tr = L.Trainer(max_steps=30, callbacks=[LabelNoise(0.1)], default_root_dir=str(tmp_path), logger=False,
                   enable_progress_bar=True, enable_model_summary=True, enable_checkpointing=True)
    tr.fit(net, data())
    assert net.engine.mode == "fused" and net.engine.oracle == "analytic" and net.engine.reason == ""
    assert tr.global_step == 30
