import pytest
import torch

from conftest import F64, rel
from lightning_flat.datamodules import MatrixSensingDataModule
from lightning_flat.measurements import MeasurementBatch


def test_problem_draw():
    dm = MatrixSensingDataModule(n=100, d_out=8, d_in=6, rank=2, seed=0)
    assert dm.measurements.A.shape == (100, 8, 6) and dm.measurements.dtype == F64
    assert torch.linalg.matrix_rank(dm.ground_truth) == 2
    assert rel(dm.targets, torch.einsum("nij,ij->n", dm.measurements.A, dm.ground_truth)) < 1e-13
    assert dm.test_error(dm.ground_truth) == 0
    E = torch.zeros(3, 8, 6, dtype=F64)
    assert rel(dm.test_error(E), dm.ground_truth.square().sum().expand(3)) < 1e-14
    same = MatrixSensingDataModule(n=100, d_out=8, d_in=6, rank=2, seed=0)
    assert torch.equal(same.measurements.A, dm.measurements.A)
    noisy = MatrixSensingDataModule(n=100, d_out=8, d_in=6, rank=2, noise_std=0.5, seed=0)
    assert 0.3 < float((noisy.targets - dm.targets).std()) < 0.7


def test_ground_truth_scale_matches_spec():
    norms = [float(MatrixSensingDataModule(n=1, d_out=60, d_in=60, rank=3, seed=s).ground_truth.square().sum())
             for s in range(20)]
    assert 2.0 < sum(norms) / len(norms) < 4.0  # E ||M*||_F^2 = r (1 + ...) ~ 3


def test_batches_are_iid_with_replacement_and_reproducible():
    dm = MatrixSensingDataModule(n=10, d_out=2, d_in=2, rank=1, batch_size=8, seed=0, steps_per_epoch=500)
    batches = list(dm.train_dataloader())
    assert len(batches) == 500 and all(isinstance(b, MeasurementBatch) for b in batches)
    idx = torch.stack([b.index for b in batches])
    counts = torch.bincount(idx.flatten(), minlength=10).double()
    assert counts.min() > 300 and counts.max() < 500  # uniform: 400 each
    dup = sum(int(len(set(row.tolist())) < 8) for row in idx)
    assert dup > 400  # with replacement, 8 of 10 repeats an index ~98% of the time
    b = batches[7]
    assert torch.equal(b.targets, dm.targets[b.index].float())
    assert torch.equal(b.measurements.A, dm.measurements.A[b.index].float())
    again = list(dm.train_dataloader())
    assert all(torch.equal(x.index, y.index) for x, y in zip(batches, again))


def test_full_batch():
    dm = MatrixSensingDataModule(n=10, d_out=2, d_in=2, rank=1, batch_size=None, seed=0, steps_per_epoch=3)
    b = next(iter(dm.train_dataloader()))
    assert b.index is None and len(b) == 10


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n=0), "n must be a positive int"),
        (dict(d_out=-2), "d_out must be a positive int"),
        (dict(rank=7, d_out=6, d_in=8), r"rank must be <= min\(d_out, d_in\) = 6, got 7"),
        (dict(rank=0), "rank must be a positive int"),
        (dict(batch_size=0), "batch_size must be a positive int"),
        (dict(noise_std=-0.1), "noise_std must be >= 0"),
        (dict(steps_per_epoch=0), "steps_per_epoch must be a positive int"),
    ],
    ids=["n", "d_out", "rank-too-big", "rank-zero", "batch_size", "noise_std", "steps_per_epoch"],
)
def test_bad_arguments(kwargs, match):
    args = dict(n=10, d_out=6, d_in=8, rank=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        MatrixSensingDataModule(**args)
