"""ObservedEntriesDataModule and the sampler's epoch-shuffling mode."""

import pytest
import torch

from helpers import trainer
from lightning_flat.datamodules import MeasurementSampler, ObservedEntriesDataModule
from lightning_flat.measurements import Entries
from lightning_flat.models import DeepLinearNet

F64 = torch.float64


def test_observed_entries_problem():
    dm = ObservedEntriesDataModule(observed=[[1.0, None], [0.25, 1.0]], ground_truth=[[1.0, 4.0], [0.25, 1.0]])
    assert dm.measurements.rows.tolist() == [0, 1, 1] and dm.measurements.cols.tolist() == [0, 0, 1]
    assert dm.targets.tolist() == [1.0, 0.25, 1.0] and dm.n == 3 and dm.batch_size == 1
    E = torch.tensor([[[1.0, 1.0], [0.25, 1.0]], [[5.0, 4.0], [0.0, 0.0]]], dtype=F64)
    # only the missing entry (0, 1) counts: (1 - 4)^2 and 0
    assert dm.test_error(E).tolist() == [9.0, 0.0]
    assert dm.test_error_scale() == 16.0  # zero filling
    # relative to zero filling, the error is (1 - eps E01)^2
    assert abs(float(dm.test_error(E[:1])[0]) / dm.test_error_scale() - (1 - 0.25 * 1.0) ** 2) < 1e-15


@pytest.mark.parametrize("kwargs, match", [
    (dict(observed=[[None, None]]), "at least one observed"),
    (dict(observed=[[1.0, float("nan")]]), r"observed\[0\]\[1\] must be a finite number or null"),
    (dict(observed=[[1.0], [1.0, 2.0]]), "rows of one length"),
    (dict(observed="1 2"), "rows of one length"),
    (dict(observed=[[1.0, None]], ground_truth=[[1.0, None]]), r"ground_truth\[0\]\[1\] must be a finite number"),
    (dict(observed=[[1.0, None]], ground_truth=[[1.0, 2.0, 3.0]]), "must have the shape of observed"),
    (dict(observed=[[1.0, None]], ground_truth=[[2.0, 2.0]]), "must agree with observed"),
    (dict(observed=[[1.0, None]], sampling="epochs"), "sampling must be one of 'replacement', 'shuffle'"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ObservedEntriesDataModule(**kwargs)


def test_test_error_needs_ground_truth():
    dm = ObservedEntriesDataModule(observed=[[1.0, None]])
    with pytest.raises(ValueError, match="needs ground_truth"):
        dm.test_error_scale()


def _sampler(n, batch_size, streams=None, seed=0):
    meas = Entries(torch.arange(n), torch.zeros(n, dtype=torch.long), (n, 1), dtype=F64)
    return MeasurementSampler(meas, torch.arange(n, dtype=F64), batch_size, seed, 1000, streams=streams,
                              sampling="shuffle")


@pytest.mark.parametrize("n, B", [(3, 1), (5, 2), (4, 4), (3, 7)])
def test_shuffle_walks_through_permutations(n, B):
    s = _sampler(n, B)
    seq = torch.cat([s.indices(t) for t in range(6 * n)])  # 6 B permutations' worth of positions
    perms = seq.reshape(-1, n)
    # every consecutive block of n positions is a permutation: each index once per epoch, never twice
    assert all(sorted(p.tolist()) == list(range(n)) for p in perms)
    assert len({tuple(p.tolist()) for p in perms}) > 1  # and the permutations change
    # the batch of a step depends on the step alone (resumable, independent of the chunking)
    assert torch.equal(s.indices(5), _sampler(n, B).indices(5))


def test_shuffle_streams_are_single_runs():
    multi = _sampler(3, 1, streams=[4, 9])
    for r, seed in enumerate([4, 9]):
        single = _sampler(3, 1, streams=[seed])
        assert all(torch.equal(multi.indices(t)[r], single.indices(t)) for t in range(12))


def test_datamodule_hands_the_model_a_shuffling_sampler():
    """Through the Trainer: the sampler the datamodule builds shuffles, with the model's replica streams, so each
    replica sees each of the 3 entries once in steps 0-2."""
    dm = ObservedEntriesDataModule(observed=[[1.0, None], [0.25, 1.0]], sampling="shuffle")
    model = DeepLinearNet([2, 3, 2], replicas=2, seed=[3, 5])
    tr, _ = trainer(3, precision="64-true")
    tr.fit(model, dm)
    loader = dm.train_dataloader()
    assert loader.sampling == "shuffle" and loader.streams == [3, 5]
    first_epoch = torch.cat([loader.indices(t) for t in range(3)], 1)  # (replicas, steps)
    assert all(sorted(row.tolist()) == [0, 1, 2] for row in first_epoch)
