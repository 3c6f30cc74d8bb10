import pytest
import torch

from conftest import F64, rel
from lightning_flat import functional as F
from lightning_flat.baselines import SingularRescalingError, flat_relaxation, min_nuclear_norm
from lightning_flat.datamodules import (BilinearSensingDataModule, MatrixCompletionDataModule,
                                        MatrixSensingDataModule, QuadraticSensingDataModule)
from lightning_flat.functional import flat as FF
from lightning_flat.measurements import Entries


@pytest.mark.parametrize("make", [
    lambda: MatrixSensingDataModule(n=24, d_out=6, d_in=6, rank=2, unit_norm=True, seed=1),
    lambda: BilinearSensingDataModule(n=24, d_out=6, d_in=6, rank=2, seed=1),
    lambda: MatrixCompletionDataModule(d_out=6, d_in=6, rank=2, p=0.6, seed=3),
    lambda: QuadraticSensingDataModule(n=24, d=6, rank_pos=2, rank_neg=1, seed=1),
], ids=["sensing", "bilinear", "completion", "quadratic"])
def test_V2_on_an_undersampled_instance(make):
    dm = make()
    parts = flat_relaxation(dm.measurements, dm.targets, return_parts=True)
    X, Y, D1, D2 = parts["X"], parts["Y"], parts["D1"], parts["D2"]
    assert rel(dm.measurements(X), dm.targets) < 1e-6  # feasible
    assert rel(D1 @ X @ D2, Y) < 1e-12
    L, R = FF.flat_factors(Y, D1, D2)
    assert rel(L.T @ D1 @ D1 @ L, R.T @ D2 @ D2 @ R) < 1e-10  # D-balanced
    assert rel(FF.scaled_trace(L, R, D1, D2), 4 * F.nuclear_norm(Y)) < 1e-10
    # flat beats the balanced factors of the nuclear-norm solution on the scaled trace, and minimizes |D1 X D2|_*
    Xn = min_nuclear_norm(dm.measurements, dm.targets)
    U, s, Vh = torch.linalg.svd(Xn)
    assert FF.scaled_trace(L, R, D1, D2) <= FF.scaled_trace(U * s.sqrt(), Vh.T * s.sqrt(), D1, D2) * (1 + 1e-6)
    assert F.nuclear_norm(D1 @ X @ D2) <= F.nuclear_norm(D1 @ Xn @ D2) * (1 + 1e-6)


def test_identity_design_gives_the_ground_truth():
    d = 5
    M = torch.randn(d, 2, dtype=F64) @ torch.randn(2, d, dtype=F64)
    meas = Entries(torch.arange(d).repeat_interleave(d), torch.arange(d).repeat(d), (d, d), dtype=F64)
    assert rel(flat_relaxation(meas, meas(M)), M) < 1e-6


def test_singular_rescaling_is_reported():
    meas = Entries(torch.tensor([0, 1]), torch.tensor([0, 0]), (3, 3), dtype=F64)  # empty rows and columns
    with pytest.raises(SingularRescalingError, match="D1 is singular"):
        flat_relaxation(meas, torch.tensor([1.0, 2.0], dtype=F64))
    with pytest.raises(TypeError, match="measurements must be"):
        flat_relaxation(torch.zeros(3), torch.zeros(3))
