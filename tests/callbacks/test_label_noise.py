import math

import pytest
import torch

from helpers import trainer
from lightning_flat.callbacks import LabelNoise
from lightning_flat.datamodules import MatrixSensingDataModule
from lightning_flat.models import DeepLinearNet


def run(std, lr=0.0, steps=300, noise_seed=0, batch_size=50):
    dm = MatrixSensingDataModule(n=100, d_out=5, d_in=5, rank=1, batch_size=batch_size, seed=0)
    targets = dm.targets.clone()
    net = DeepLinearNet([5, 5, 5], lr=lr, seed=0)
    cbs = [LabelNoise(std, seed=noise_seed)] if std is not None else []
    tr, mem = trainer(steps, cbs)
    tr.fit(net, dm)
    assert torch.equal(dm.targets, targets)  # the stored dataset is never modified
    assert torch.equal(dm.measurements_as(torch.float64, "cpu")[1], targets)
    return net, torch.tensor(mem.series("train/loss")[1], dtype=torch.float64)


def test_loss_rises_by_std_squared_at_zero_lr():
    std = 0.7
    _, clean = run(None)
    _, noisy = run(std)
    diff = noisy - clean  # same batches (same sampler seed), so the difference is the noise alone
    se = float(diff.std()) / math.sqrt(len(diff))
    assert abs(float(diff.mean()) - std ** 2) < 4 * se
    assert se < 0.1 * std ** 2  # the check has power


def test_same_seed_same_run_other_seed_other_run():
    a, _ = run(1.0, lr=0.01, steps=50)
    b, _ = run(1.0, lr=0.01, steps=50)
    c, _ = run(1.0, lr=0.01, steps=50, noise_seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a.weights(), b.weights()))
    assert not torch.equal(a.weights()[0], c.weights()[0])


def test_noise_is_fresh_per_step_and_sample():
    ln = LabelNoise(1.0, seed=0)
    cpu = torch.device("cpu")
    x0 = ln.noise((1000,), 0, 0, torch.float64, cpu)
    x1 = ln.noise((1000,), 1, 0, torch.float64, cpu)
    assert torch.equal(x0, ln.noise((1000,), 0, 0, torch.float64, cpu))
    assert abs(float(torch.corrcoef(torch.stack([x0, x1]))[0, 1])) < 0.1
    assert abs(float(x0.std()) - 1) < 0.1 and len(set(x0.tolist())) == 1000


def lightning_step(batch, step=3):
    """The context in which the step phases see a batch on Lightning's path (targets replaced in place)."""
    from lightning_flat.engine import Replicas, StepContext

    return StepContext(step=step, trainer=None, module=None, batch=batch, replicas=Replicas(1, seed=None),
                       in_place=True)


def test_dict_and_list_batches():
    ln = LabelNoise(2.0)
    y = torch.zeros(4, dtype=torch.float64)
    d = {"x": None, "y": y}
    LabelNoise(2.0, target_key="y").step_targets(lightning_step(d))
    assert d["y"] is not y and d["y"].abs().sum() > 0 and y.abs().sum() == 0
    lst = [None, y]
    ln.step_targets(lightning_step(lst))
    assert lst[1] is not y and torch.equal(lst[1], d["y"])
    with pytest.raises(TypeError, match="LabelNoise cannot change the targets of a tuple"):
        ln.step_targets(lightning_step((None, y)))


def test_state_dict_round_trip_and_bad_std():
    ln = LabelNoise(0.5, seed=4)
    other = LabelNoise(1.0, seed=0)
    other.load_state_dict(ln.state_dict())
    assert other.std == 0.5 and other.seed == 4
    with pytest.raises(ValueError, match="std must be >= 0"):
        LabelNoise(-1.0)
    with pytest.raises(ValueError, match="std must be >= 0"):
        ln.std = -0.1
