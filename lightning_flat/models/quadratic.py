r"""Symmetric quadratic factor model $E = U_1U_1^\top - U_2U_2^\top$ (Ding et al. 2022, Section 7)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lightning_flat._checks import check_choice, check_nonnegative_int, check_positive_int, check_real
from lightning_flat.functional.flat import quadratic_hessian_trace
from lightning_flat.functional.gradients import symmetric_vjp
from lightning_flat.measurements import Measurements
from lightning_flat.models.base import LinearNetBase

__all__ = ["QuadraticNet"]


class QuadraticNet(LinearNetBase):
    r"""Quadratic-activation network / symmetric factorization $E = U_1U_1^\top - U_2U_2^\top$,
    ``U1 (d, k1)``, ``U2 (d, k2)``.

    On quadratic sensing measurements $A_i = x_ix_i^\top$ (``RankOne(x, x)``) the prediction
    $\langle A_i, E\rangle = \sum_j (u_j^\top x_i)^2 - \sum_j (w_j^\top x_i)^2$ is a one-hidden-layer network
    with quadratic activation and output weights $(1_{k_1}, -1_{k_2})$. Each $f_i$ is quadratic in
    $U$, so its Hessian trace has a residual term: `hessian_trace` is
    `lightning_flat.functional.quadratic_hessian_trace` (exact at every point), which the callbacks use.
    ``k2 = 0`` is covariance estimation, ``k1 = 1, k2 = 0`` phase retrieval.

    Args:
        d: dimension.
        k1: width of the positive part ``U1``.
        k2: width of the negative part ``U2``.
        init_scale: std of the i.i.d. Gaussian initial entries (default $1/\sqrt d$).
        lr: as in [`DeepLinearNet`][lightning_flat.models.DeepLinearNet].
        weight_decay: as in [`DeepLinearNet`][lightning_flat.models.DeepLinearNet].
        momentum: as in [`DeepLinearNet`][lightning_flat.models.DeepLinearNet].
        replicas: as in [`DeepLinearNet`][lightning_flat.models.DeepLinearNet].
        seed: as in [`DeepLinearNet`][lightning_flat.models.DeepLinearNet].
        trace_penalty: the flatness regularizer $\lambda\operatorname{tr}\nabla^2L$.
        chunk_size: as in [`DeepLinearNet`][lightning_flat.models.DeepLinearNet].
        gradients: as in [`DeepLinearNet`][lightning_flat.models.DeepLinearNet] (analytic gradients
            $\pm(G + G^\top)U_k$).
    """

    def __init__(self, d: int, k1: int, k2: int = 0, init_scale: float | None = None, lr: float = 0.01,
                 weight_decay: float = 0.0, momentum: float = 0.0, replicas: int = 1, seed: int | list[int] = 0,
                 trace_penalty: float = 0.0, chunk_size: int = 100, gradients: str = "analytic") -> None:
        super().__init__(replicas, seed)
        d = check_positive_int("d", d)
        k1 = check_positive_int("k1", k1)
        k2 = check_nonnegative_int("k2", k2)
        scale = 1.0 / math.sqrt(d) if init_scale is None else check_real("init_scale", init_scale, low=0.0)
        self.lr = self.replicas.hyperparameter("lr", lr)
        self.weight_decay = self.replicas.hyperparameter("weight_decay", weight_decay)
        self.momentum = check_real("momentum", momentum, low=0.0, high=1.0, high_open=True)
        self.trace_penalty = check_real("trace_penalty", trace_penalty, low=0.0)
        self.chunk_size = check_positive_int("chunk_size", chunk_size)
        self.gradients = check_choice("gradients", gradients, ("analytic", "autograd"))
        self.save_hyperparameters()
        self.d, self.k1, self.k2 = d, k1, k2
        factors = self.replicas.initial(
            lambda r, g: [torch.randn(d, k, generator=g, dtype=torch.float64) * scale for k in (k1, k2)])
        dtype = torch.get_default_dtype()
        self.factors = nn.ParameterList([nn.Parameter(U.to(dtype)) for U in factors])
        self._check_init_finite("init_scale", init_scale)

    def weights(self) -> list[Tensor]:
        """``[U1, U2]`` (shapes ``(d, k1)``, ``(d, k2)``; a leading ``R`` with replicas)."""
        return list(self.factors)

    def end_to_end_from(self, weights: list[Tensor]) -> Tensor:
        U1, U2 = weights
        return U1 @ U1.transpose(-1, -2) - U2 @ U2.transpose(-1, -2)

    def end_to_end_and_cache(self, weights: list[Tensor]) -> tuple[Tensor, None]:
        return self.end_to_end_from(weights), None

    def end_to_end_vjp(self, weights: list[Tensor], cache: None, G: Tensor) -> list[Tensor]:
        return symmetric_vjp(weights, G)

    def hessian_trace(self, measurements: Measurements, targets: Tensor | None = None) -> Tensor:
        return self.hessian_trace_from(self.weights(), measurements, targets)

    def hessian_trace_terms(self, measurements: Measurements, targets: Tensor | None = None) -> None:
        """No per-factor closed form (the residual term couples the factors): ``None``, so per-layer traces come
        from the dense Hessian's diagonal."""
        return None

    def hessian_trace_from(self, weights: list[Tensor], measurements: Measurements, targets: Tensor | None) -> Tensor:
        if targets is None:
            raise ValueError("QuadraticNet's Hessian trace has a residual term: it needs the targets")
        return quadratic_hessian_trace(weights[0], weights[1], measurements, targets)
