"""Univariate linear regression with a non-zero optimal residual (Marion & Chizat 2024, App. C)."""

from __future__ import annotations

import torch

from lightning_flat._checks import check_positive_int, check_real
from lightning_flat.datamodules.base import MeasurementDataModule
from lightning_flat.measurements import RankOne

__all__ = ["UnivariateRegressionDataModule"]


class UnivariateRegressionDataModule(MeasurementDataModule):
    r"""Regression data $y = Xw_{true} + \zeta$ read by a network $f(x) = Ex$ with ``E (1, d)``.

    $X_{ij}\sim N(0,1)$ (``n x d``, ``n > d``), $w_{true}\sim N(0, I_d)$, $\zeta\sim N(0,
    \mathrm{noise\_std}^2 I_n)$; $w^* = (X^\top X)^{-1}X^\top y$ is the least-squares solution. With
    ``normalize_w_star`` the targets are divided by $\|w^*\|$, so that $\|w^*\| = 1$. The optimal
    residual $R_{min} = \frac1n\|y - Xw^*\|^2$ is positive: the loss does not vanish at its minimisers.

    Measurements are ``RankOne(ones(n, 1), X)`` (``<A_i, E> = E x_i``), targets ``y``; the ground truth is
    $w^{*\top}$ (``(1, d)``), so ``test_error(E)`` is $\|w_{prod} - w^*\|^2$ (logged as ``test/error``).

    Attributes:
        X: ``(n, d)``.
        y: ``(n,)``.
        w_star: ``(d,)``.
        sigma_hat: $\hat\Sigma = X^\top X/n$, ``(d, d)``.
        r_min: $R_{min}$.
        lambda_min: the smallest eigenvalue of $\hat\Sigma$.
        lambda_max: the largest eigenvalue of $\hat\Sigma$.
        a: $w^{*\top}\hat\Sigma w^*/\|w^*\|^2$.

    Examples:
        >>> dm = UnivariateRegressionDataModule(n=50, d=5, seed=0)
        >>> round(float(dm.w_star.norm()), 12), dm.r_min > 0, tuple(dm.ground_truth.shape)
        (1.0, True, (1, 5))
    """

    def __init__(self, n: int = 50, d: int = 5, noise_std: float = 1.0, normalize_w_star: bool = True, seed: int = 0,
                 batch_size: int | None = None, steps_per_epoch: int = 1000) -> None:
        super().__init__(batch_size=batch_size, seed=seed, steps_per_epoch=steps_per_epoch)
        n = check_positive_int("n", n)
        d = check_positive_int("d", d)
        if n <= d:
            raise ValueError(f"n must exceed d (X^T X must be invertible), got n={n}, d={d}")
        noise_std = check_real("noise_std", noise_std, low=0.0)
        if not isinstance(normalize_w_star, bool):
            raise TypeError(f"normalize_w_star must be a bool, got {normalize_w_star!r}")
        self.save_hyperparameters(logger=False)  # logged as data/... in setup(): `seed` also names the model's
        g = torch.Generator().manual_seed(self.seed)
        f64 = torch.float64
        X = torch.randn(n, d, generator=g, dtype=f64)
        w_true = torch.randn(d, generator=g, dtype=f64)
        y = X @ w_true + noise_std * torch.randn(n, generator=g, dtype=f64)
        w_star = torch.linalg.lstsq(X, y.unsqueeze(-1)).solution.squeeze(-1)
        if normalize_w_star:
            scale = w_star.norm()
            y, w_star = y / scale, w_star / scale
        self.X, self.y, self.w_star = X, y, w_star
        self.sigma_hat = X.T @ X / n
        self.r_min = float((y - X @ w_star).square().mean())
        eig = torch.linalg.eigvalsh(self.sigma_hat)
        self.lambda_min, self.lambda_max = float(eig[0]), float(eig[-1])
        self.a = float(w_star @ self.sigma_hat @ w_star / w_star.square().sum())
        self.measurements = RankOne(torch.ones(n, 1, dtype=f64), X)
        self.targets = y
        self.ground_truth = w_star.unsqueeze(0)
