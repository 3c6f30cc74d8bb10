import pytest
import torch

from conftest import F64, rel
from lightning_flat.datamodules import (BilinearSensingDataModule, MatrixCompletionDataModule,
                                        QuadraticSensingDataModule)


def test_bilinear():
    dm = BilinearSensingDataModule(n=50, d_out=5, d_in=4, rank=2, seed=0)
    assert rel(torch.linalg.matrix_norm(dm.ground_truth), 1.0) < 1e-14
    assert torch.linalg.matrix_rank(dm.ground_truth) == 2
    A = dm.measurements.dense()
    assert rel(dm.targets, torch.einsum("nij,ij->n", A, dm.ground_truth)) < 1e-13
    assert dm.test_error(dm.ground_truth) == 0


def test_completion_mask_and_unobserved_error():
    dm = MatrixCompletionDataModule(d_out=20, d_in=30, rank=2, p=0.3, seed=0)
    assert dm.n == int(dm.mask.sum()) and 0.2 < dm.n / 600 < 0.4
    flat = dm.measurements.rows * 30 + dm.measurements.cols
    assert len(set(flat.tolist())) == dm.n  # a Bernoulli mask: no duplicate entries
    E = dm.ground_truth.clone()
    E[dm.mask] += 1.0  # errors on observed entries do not count
    assert dm.test_error(E) == 0
    E[~dm.mask] += 1.0
    assert rel(dm.test_error(E), float((~dm.mask).sum())) < 1e-12


def test_quadratic_population_error_is_exact():
    dm = QuadraticSensingDataModule(n=10, d=4, rank_pos=2, rank_neg=1, seed=0)
    M = dm.ground_truth
    # M = U diag(1, 1, -1) U^T / |.|_F with U (4 x 3) N(0, 1), the datamodule's first draw: gemm need not sum
    # entries (i, j) and (j, i) in one order, each a 3-term dot product, so they differ by at most
    # 2 (3 + 1) eps |U_i||U_j| / |U diag U^T|_F (the dot products and the division)
    U = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    eps = torch.finfo(F64).eps
    norm = torch.linalg.matrix_norm(U * torch.tensor([1.0, 1.0, -1.0], dtype=F64) @ U.T)
    bound = 2 * 4 * eps * float(U.square().sum(1).max()) / float(norm)
    assert float((M - M.T).abs().max()) <= bound and rel(torch.linalg.matrix_norm(M), 1.0) < 1e-14
    evals = torch.linalg.eigvalsh(M)
    assert int((evals > 1e-10).sum()) == 2 and int((evals < -1e-10).sum()) == 1
    g = torch.Generator().manual_seed(1)
    x = torch.randn(400000, 4, generator=g, dtype=F64)
    D = torch.randn(4, 4, generator=g, dtype=F64)
    mc = ((x @ D * x).sum(-1) ** 2).mean()
    # a Monte Carlo mean of 400000 draws: its relative standard error is std / (mean sqrt(400000)) ~ 0.005, so 0.02
    # is 4 standard errors
    assert rel(dm.test_error(M + D), mc) < 0.02


@pytest.mark.parametrize("cls, kwargs, match", [
    (BilinearSensingDataModule, dict(rank=5, d_out=4, d_in=6), r"rank must be <= min\(d_out, d_in\) = 4"),
    (MatrixCompletionDataModule, dict(p=0.0), "p must be > 0"),
    (MatrixCompletionDataModule, dict(p=1.5), "p must be <= 1"),
    (QuadraticSensingDataModule, dict(d=3, rank_pos=3, rank_neg=1), r"rank_pos \+ rank_neg must be in \[1, d=3\]"),
    (QuadraticSensingDataModule, dict(n=0), "n must be a positive int"),
], ids=["bilinear-rank", "p-zero", "p-big", "quadratic-rank", "quadratic-n"])
def test_bad_arguments(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)
