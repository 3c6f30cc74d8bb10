import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from helpers import trainer
from lightning_flat.callbacks import FiniteLossGuard, HyperparameterSchedule, LabelNoise
from lightning_flat.callbacks.schedule import Schedule
from lightning_flat.datamodules import MatrixSensingDataModule
from lightning_flat.models import DeepLinearNet


class UserNet(L.LightningModule):
    """A plain LightningModule on the same data: the callbacks act through Lightning's hooks."""

    def __init__(self):
        super().__init__()
        self.W = torch.nn.Parameter(torch.eye(3))

    def training_step(self, batch, batch_idx):
        loss = (batch.measurements(self.W) - batch.targets).square().mean()
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0)


def test_divergence_stops_cleanly_with_step_and_value():
    dm = MatrixSensingDataModule(n=50, d_out=5, d_in=5, rank=1, batch_size=10, seed=0)
    net = DeepLinearNet([5, 5, 5, 5], lr=10.0)
    guard = FiniteLossGuard()
    tr, mem = trainer(500, [guard])
    with pytest.warns(UserWarning, match=r"non-finite training loss at step \d+"):
        tr.fit(net, dm)
    assert guard.stopped_step is not None and guard.stopped_step < 100
    assert tr.global_step == guard.stopped_step + 1  # the run ended right there
    assert f"step {guard.stopped_step}" in guard.message and str(guard.stopped_value) in guard.message
    assert all(torch.isfinite(w).all() for w in net.weights())  # the bad update never reached the weights


def test_phases_values_at_boundaries():
    p = Schedule("lr", [(0, 0.1), (10, 0.01), (25, 0.5)])
    assert [p.value(s) for s in (0, 9, 10, 24, 25, 10**6)] == [0.1, 0.1, 0.01, 0.01, 0.5, 0.5]
    assert Schedule("lr", 0.3).value(123) == 0.3


@pytest.mark.parametrize(
    "spec, match",
    [([(1, 0.1)], "must start with a phase at step 0"), ([(0, 0.1), (0, 0.2)], "must increase strictly"),
     ([(0, -1.0)], r"lr\[0\] value must be >= 0"), ("fast", "must be a number, a named shape"),
     ([(0, 1, 2)], "pair")],
    ids=["start", "order", "negative", "string", "triple"],
)
def test_bad_phases(spec, match):
    with pytest.raises(ValueError, match=match):
        HyperparameterSchedule(lr=spec)


class Record(Callback):
    """A user's per-step callback: the lr it sees before each step, the noise std in effect after it."""

    def __init__(self, noise):
        self.noise, self.seen = noise, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append([trainer.global_step, trainer.optimizers[0].param_groups[0]["lr"]])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen[-1].append(self.noise.last_std)


@pytest.mark.parametrize("kind", ["linear_net", "user_module"])
def test_schedule_applies_lr_and_label_noise_by_step(kind):
    dm = MatrixSensingDataModule(n=20, d_out=3, d_in=3, rank=1, batch_size=5, seed=0)
    net = DeepLinearNet([3, 3], lr=1.0) if kind == "linear_net" else UserNet()
    # the schedule comes after LabelNoise in the list: values must still be in place before each step
    sched = HyperparameterSchedule(lr=[(0, 0.1), (3, 0.05)], label_noise=[(0, 1.0), (4, 0.0)], every_n_steps=2)
    noise = LabelNoise(1.0)
    record = Record(noise)
    tr, mem = trainer(6, [record, noise, sched])
    tr.fit(net, dm)
    assert noise.std == 1.0  # the configured value; the schedule never writes it
    assert record.seen == [[0, 0.1, 1.0], [1, 0.1, 1.0], [2, 0.1, 1.0], [3, 0.05, 1.0], [4, 0.05, 0.0],
                           [5, 0.05, 0.0]]
    steps, values = mem.series("hparams/label_noise")
    assert 4 in steps and values[steps.index(4)] == 0.0


def test_label_noise_schedule_needs_label_noise_callback():
    dm = MatrixSensingDataModule(n=20, d_out=3, d_in=3, rank=1, batch_size=5, seed=0)
    tr, _ = trainer(2, [HyperparameterSchedule(label_noise=0.5)])
    with pytest.raises(ValueError, match="needs a LabelNoise callback"):
        tr.fit(DeepLinearNet([3, 3]), dm)
