"""Low-rank recovery problems of Ding, Drusvyatskiy & Fazel (2022): bilinear sensing, matrix completion and
quadratic sensing, with ground truths of unit Frobenius norm."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_flat._checks import check_nonnegative_int, check_positive_int, check_real
from lightning_flat.datamodules.base import MeasurementDataModule
from lightning_flat.measurements import Entries, RankOne

__all__ = ["BilinearSensingDataModule", "MatrixCompletionDataModule", "QuadraticSensingDataModule",
           "unit_low_rank"]

F64 = torch.float64


def unit_low_rank(d_out: int, d_in: int, rank: int, generator: torch.Generator) -> Tensor:
    r"""$M = G_1G_2^\top / \|G_1G_2^\top\|_F$ with $G_1 (d_{out}\times r)$, $G_2 (d_{in}\times r)$
    i.i.d. $N(0,1)$ (Ding et al.'s ground truth: rank ``r``, unit Frobenius norm), in float64."""
    M = torch.randn(d_out, rank, generator=generator, dtype=F64) @ torch.randn(rank, d_in, generator=generator,
                                                                               dtype=F64)
    return M / torch.linalg.matrix_norm(M)


def _check_rank(rank: int, d_out: int, d_in: int) -> int:
    rank = check_positive_int("rank", rank)
    if rank > min(d_out, d_in):
        raise ValueError(f"rank must be <= min(d_out, d_in) = {min(d_out, d_in)}, got {rank}")
    return rank


class BilinearSensingDataModule(MeasurementDataModule):
    r"""Bilinear sensing $b_i = a_i^\top M b_i'$ with $a_i \sim N(0, I_{d_{out}})$,
    $b_i' \sim N(0, I_{d_{in}})$, i.e. ``RankOne(a, b')``; ``M`` of rank ``rank`` and unit Frobenius norm.
    ``test_error(E)`` is the exact population loss $\mathbb E\langle ab^\top, E - M\rangle^2 = \|E - M\|_F^2$.
    Drawn in float64 from ``seed`` (M, then the measurements)."""

    def __init__(self, n: int = 100, d_out: int = 10, d_in: int = 10, rank: int = 2, batch_size: int | None = None,
                 seed: int = 0, steps_per_epoch: int = 1000) -> None:
        super().__init__(batch_size=batch_size, seed=seed, steps_per_epoch=steps_per_epoch)
        self.n, self.d_out, self.d_in = (check_positive_int(k, v) for k, v in (("n", n), ("d_out", d_out),
                                                                                ("d_in", d_in)))
        self.rank = _check_rank(rank, d_out, d_in)
        self.save_hyperparameters(logger=False)
        g = torch.Generator().manual_seed(seed)
        self.ground_truth = unit_low_rank(d_out, d_in, rank, g)
        self.measurements = RankOne(torch.randn(n, d_out, generator=g, dtype=F64),
                                    torch.randn(n, d_in, generator=g, dtype=F64))
        self.targets = self.measurements(self.ground_truth)


class MatrixCompletionDataModule(MeasurementDataModule):
    r"""Matrix completion: each entry of ``M`` is observed independently with probability ``p`` (a Bernoulli mask,
    no duplicates); ``Entries`` over the observed cells. ``M`` has rank ``rank`` and unit Frobenius norm.
    ``test_error(E)`` is the squared error on the **unobserved** entries, $\|P_{\Omega^c}(E - M)\|_F^2$.
    An empty row or column is allowed (it makes the flat relaxation's rescaling singular)."""

    def __init__(self, d_out: int = 10, d_in: int = 10, rank: int = 2, p: float = 0.5, batch_size: int | None = None,
                 seed: int = 0, steps_per_epoch: int = 1000) -> None:
        super().__init__(batch_size=batch_size, seed=seed, steps_per_epoch=steps_per_epoch)
        self.d_out, self.d_in = check_positive_int("d_out", d_out), check_positive_int("d_in", d_in)
        self.rank = _check_rank(rank, d_out, d_in)
        self.p = check_real("p", p, low=0.0, high=1.0, low_open=True)
        self.save_hyperparameters(logger=False)
        g = torch.Generator().manual_seed(seed)
        self.ground_truth = unit_low_rank(d_out, d_in, rank, g)
        self.mask = torch.rand(d_out, d_in, generator=g, dtype=F64) < self.p
        if not bool(self.mask.any()):
            raise ValueError(f"no entry observed with p={p} at shape ({d_out}, {d_in}) and seed {seed}")
        rows, cols = self.mask.nonzero(as_tuple=True)
        self.n = int(rows.numel())
        self.measurements = Entries(rows, cols, (d_out, d_in), dtype=F64)
        self.targets = self.measurements(self.ground_truth)

    def test_error(self, E: Tensor) -> Tensor:
        unobserved = (~self.mask).to(device=E.device, dtype=E.dtype)
        return ((E - self.ground_truth.to(E)) * unobserved).square().sum((-2, -1))


class QuadraticSensingDataModule(MeasurementDataModule):
    r"""Quadratic sensing $b_i = x_i^\top M x_i$, $x_i \sim N(0, I_d)$ (``RankOne(x, x)``), the
    measurements of a quadratic-activation network. $M = U\,\mathrm{diag}(1_{r_1}, -1_{r_2})U^\top/\|\cdot\|_F$
    with $U (d \times (r_1 + r_2))$ i.i.d. $N(0,1)$. ``test_error(E)`` is the exact population loss
    $\mathbb E(x^\top\Delta x)^2 = 2\|\Delta_s\|_F^2 + \operatorname{tr}(\Delta)^2$, $\Delta = E - M$,
    $\Delta_s$ its symmetric part."""

    def __init__(self, n: int = 100, d: int = 10, rank_pos: int = 2, rank_neg: int = 1, batch_size: int | None = None,
                 seed: int = 0, steps_per_epoch: int = 1000) -> None:
        super().__init__(batch_size=batch_size, seed=seed, steps_per_epoch=steps_per_epoch)
        self.n, self.d = check_positive_int("n", n), check_positive_int("d", d)
        self.rank_pos = check_nonnegative_int("rank_pos", rank_pos)
        self.rank_neg = check_nonnegative_int("rank_neg", rank_neg)
        if not 1 <= self.rank_pos + self.rank_neg <= d:
            raise ValueError(f"rank_pos + rank_neg must be in [1, d={d}], got {rank_pos} + {rank_neg}")
        self.save_hyperparameters(logger=False)
        g = torch.Generator().manual_seed(seed)
        U = torch.randn(d, self.rank_pos + self.rank_neg, generator=g, dtype=F64)
        signs = torch.cat([torch.ones(self.rank_pos, dtype=F64), -torch.ones(self.rank_neg, dtype=F64)])
        M = (U * signs) @ U.T
        self.ground_truth = M / torch.linalg.matrix_norm(M)
        x = torch.randn(n, d, generator=g, dtype=F64)
        self.measurements = RankOne(x, x)
        self.targets = self.measurements(self.ground_truth)

    def test_error(self, E: Tensor) -> Tensor:
        D = E - self.ground_truth.to(E)
        Ds = 0.5 * (D + D.transpose(-1, -2))
        return 2.0 * Ds.square().sum((-2, -1)) + Ds.diagonal(dim1=-2, dim2=-1).sum(-1).square()
