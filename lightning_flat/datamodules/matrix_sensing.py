"""Gaussian matrix sensing (Gatmiry et al. 2023, Sec. 7)."""

from __future__ import annotations

import torch

from lightning_flat._checks import check_bool, check_positive_int, check_real
from lightning_flat.datamodules.base import MeasurementDataModule
from lightning_flat.measurements import Dense

__all__ = ["MatrixSensingDataModule"]


class MatrixSensingDataModule(MeasurementDataModule):
    r"""Gaussian matrix sensing: $b_i = \langle A_i, M^*\rangle + \sigma\varepsilon_i$.

    $A_i \in \mathbb R^{d_{out}\times d_{in}}$ with i.i.d. $N(0,1)$ entries (so
    $\frac1n\sum_i\langle A_i, X\rangle^2 \approx \|X\|_F^2$), and $M^* = M_1M_2/d_{in}$ with
    $M_1 (d_{out}\times r)$, $M_2 (r\times d_{in})$ i.i.d. $N(0,1)$ (Gatmiry et al.;
    $\|M^*\|_F^2 \approx r$). Everything is drawn in float64 from ``seed`` (A, then M1, M2, then the noise).
    ``test_error(E)`` is the exact population loss $\|E - M^*\|_F^2$.

    Args:
        n: number of measurements.
        d_out: rows of the matrices.
        d_in: columns of the matrices.
        rank: rank ``r`` of the ground truth, ``1 <= r <= min(d_out, d_in)``.
        batch_size: SGD minibatch size (i.i.d. with replacement), ``None`` for full batch.
        noise_std: std of the additive label noise stored in the targets (0 for noiseless labels).
        seed: seed of the draw and of the sampler.
        steps_per_epoch: batches per (bookkeeping) epoch.
        unit_norm: scale $M^*$ to unit Frobenius norm (Ding et al.) instead of Gatmiry et al.'s $/d_{in}$.

    Examples:
        >>> dm = MatrixSensingDataModule(n=20, d_out=4, d_in=3, rank=1, seed=0)
        >>> len(dm.measurements), dm.measurements.shape, tuple(dm.ground_truth.shape)
        (20, (4, 3), (4, 3))
    """

    def __init__(self, n: int = 600, d_out: int = 60, d_in: int = 60, rank: int = 3, batch_size: int | None = 50,
                 noise_std: float = 0.0, seed: int = 0, steps_per_epoch: int = 1000, unit_norm: bool = False) -> None:
        super().__init__(batch_size=batch_size, seed=seed, steps_per_epoch=steps_per_epoch)
        self.n = check_positive_int("n", n)
        self.d_out = check_positive_int("d_out", d_out)
        self.d_in = check_positive_int("d_in", d_in)
        self.rank = check_positive_int("rank", rank)
        if self.rank > min(d_out, d_in):
            raise ValueError(f"rank must be <= min(d_out, d_in) = {min(d_out, d_in)}, got {rank}")
        self.noise_std = check_real("noise_std", noise_std, low=0.0)
        self.save_hyperparameters(logger=False)  # logged as data/... in setup(): `seed` also names the model's
        g = torch.Generator().manual_seed(seed)
        f64 = torch.float64
        A = torch.randn(n, d_out, d_in, generator=g, dtype=f64)
        M1 = torch.randn(d_out, rank, generator=g, dtype=f64)
        M2 = torch.randn(rank, d_in, generator=g, dtype=f64)
        self.ground_truth = M1 @ M2 / d_in
        if check_bool("unit_norm", unit_norm):  # Ding et al.'s normalization, ||M*||_F = 1
            self.ground_truth = self.ground_truth / torch.linalg.matrix_norm(self.ground_truth)
        self.measurements = Dense(A)
        self.targets = self.measurements(self.ground_truth)
        if self.noise_std > 0:
            self.targets = self.targets + self.noise_std * torch.randn(n, generator=g, dtype=f64)
