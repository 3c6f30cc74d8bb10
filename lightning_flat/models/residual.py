r"""Deep residual linear network for univariate regression, $f(x) = w^\top W_L\cdots W_1 x$."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_flat import functional as F
from lightning_flat._checks import check_choice, check_positive_int, check_real
from lightning_flat.functional.gradients import chain_prefixes, chain_vjp
from lightning_flat.measurements import Measurements
from lightning_flat.models.base import LinearNetBase

__all__ = ["ResidualLinearNet"]


class ResidualLinearNet(LinearNetBase):
    r"""Residual linear network $f(x) = w^\top W_L \cdots W_1 x$ with square ``W_k (d, d)``, trained directly
    from $W_k(0) = I + \frac{s}{\sqrt{Ld}}N_k$, $N_k$ i.i.d. $N(0, 1)$ (Marion & Chizat 2024,
    eq. 2).

    ``w`` is a fixed unit vector (a buffer, never trained): given, or drawn uniformly on the sphere from the seed.
    ``end_to_end()`` is $w^\top W_L\cdots W_1$, shape ``(1, d)``, so the model reads univariate data as
    [`RankOne`][lightning_flat.measurements.RankOne] measurements with ``u_i = 1``, ``v_i = x_i`` (what
    [`UnivariateRegressionDataModule`][lightning_flat.datamodules.UnivariateRegressionDataModule] yields), exactly as a
    [`DeepLinearNet`][lightning_flat.models.DeepLinearNet] with dims ``(d, ..., d, 1)``. ``w`` acts as an untrained last
    factor: the Hessian trace and the sharpness are over the trained ``W_k`` only, in the coordinates the optimizer
    updates (the theory's $\theta_k = L(W_k - W_k(0))$ has $\nabla_\theta = \nabla_W / L$;
    [`theta`][lightning_flat.models.ResidualLinearNet.theta] returns it).

    Args:
        d: width (input dimension).
        depth: number ``L`` of trained matrices.
        scale: ``s`` of the initialisation.
        w: the fixed output vector ``(d,)`` (normalised to unit norm); ``None`` draws it from the seed (with
            replicas each replica draws its own from its seed, so replica ``r`` equals the single run with its seed;
            pass ``w`` to share one vector across replicas).
        lr: as in [`DeepLinearNet`][lightning_flat.models.DeepLinearNet].
        weight_decay: as in [`DeepLinearNet`][lightning_flat.models.DeepLinearNet].
        momentum: as in [`DeepLinearNet`][lightning_flat.models.DeepLinearNet].
        replicas: as in [`DeepLinearNet`][lightning_flat.models.DeepLinearNet].
        seed: as in [`DeepLinearNet`][lightning_flat.models.DeepLinearNet].
        chunk_size: as in [`DeepLinearNet`][lightning_flat.models.DeepLinearNet].
        gradients: as in [`DeepLinearNet`][lightning_flat.models.DeepLinearNet].

    Examples:
        >>> net = ResidualLinearNet(4, depth=3, scale=0.0, w=torch.tensor([1.0, 0.0, 0.0, 0.0]))
        >>> net.end_to_end().detach()  # identity layers: f(x) = x_1
        tensor([[1., 0., 0., 0.]])
    """

    def __init__(self, d: int, depth: int, scale: float = 0.0, w: Sequence[float] | Tensor | None = None,
                 lr: float | list[float] = 0.01, weight_decay: float | list[float] = 0.0, momentum: float = 0.0,
                 replicas: int = 1, seed: int | list[int] = 0, chunk_size: int = 100,
                 gradients: str = "analytic") -> None:
        super().__init__(replicas, seed)
        d = check_positive_int("d", d)
        depth = check_positive_int("depth", depth)
        reps = self.replicas
        scale = reps.hyperparameter("scale", scale)
        self.lr = reps.hyperparameter("lr", lr)
        self.weight_decay = reps.hyperparameter("weight_decay", weight_decay)
        self.momentum = check_real("momentum", momentum, low=0.0, high=1.0, high_open=True)
        self.chunk_size = check_positive_int("chunk_size", chunk_size)
        self.gradients = check_choice("gradients", gradients, ("analytic", "autograd"))
        if w is not None:
            w = torch.as_tensor(w, dtype=torch.float64)
            if w.shape != (d,) or not bool(torch.isfinite(w).all()) or float(w.norm()) == 0.0:
                raise ValueError(f"w must be a finite non-zero vector of shape ({d},), got {tuple(w.shape)}")
            w = w / w.norm()
        self.save_hyperparameters(ignore=["w"])
        self.d, self.depth = d, depth
        dtype = torch.get_default_dtype()

        def draw(r: int, g: torch.Generator) -> list[Tensor]:
            v = torch.randn(d, generator=g, dtype=torch.float64)  # drawn first, so w=None or not, N_k are the same
            std = reps.pick(scale, r) / math.sqrt(depth * d)
            return [v / v.norm() if w is None else w] + [
                torch.eye(d, dtype=torch.float64) + std * torch.randn(d, d, generator=g, dtype=torch.float64)
                for _ in range(depth)]

        w_buf, *factors = reps.initial(draw)
        self.layers = nn.ParameterList([nn.Parameter(W.to(dtype)) for W in factors])
        self._check_init_finite("scale", scale)
        self.register_buffer("w", w_buf.to(dtype))
        self.register_buffer("initial", torch.stack(factors).to(dtype))  # W_k(0), (L, [R,] d, d)

    def weights(self) -> list[Tensor]:
        """The trained ``[W_1, ..., W_L]`` (``(R, d, d)`` with replicas)."""
        return list(self.layers)

    def _w_row(self) -> Tensor:
        return self.w.unsqueeze(-2)  # (..., 1, d)

    def end_to_end_from(self, weights: list[Tensor]) -> Tensor:
        return torch.matmul(self._w_row(), F.end_to_end(weights))

    def replica_end_to_end(self, replica: int | None = None) -> Any:
        if replica is None or self.w.ndim == 1:
            return self.end_to_end_from
        w_row = self.w[replica].unsqueeze(-2)
        return lambda weights: torch.matmul(w_row, F.end_to_end(weights))

    def end_to_end_and_cache(self, weights: list[Tensor]) -> tuple[Tensor, Any]:
        prefixes = chain_prefixes(weights)
        return torch.matmul(self._w_row(), prefixes[-1]), prefixes

    def end_to_end_vjp(self, weights: list[Tensor], cache: Any, G: Tensor) -> list[Tensor]:
        # d<G, w^T P>/dP = w G: the chain's gradient at the top of the trained product
        return chain_vjp(weights, cache, torch.matmul(self.w.unsqueeze(-1), G))

    def hessian_trace(self, measurements: Measurements, targets: Tensor | None = None) -> Tensor:
        return self.hessian_trace_from(self.weights(), measurements, targets)

    def hessian_trace_from(self, weights: list[Tensor], measurements: Measurements, targets: Tensor | None) -> Tensor:
        """The exact trace over the trained ``W_k`` (the sum of `hessian_trace_terms`)."""
        return self._trace_terms(weights, measurements).sum(-1)

    def hessian_trace_terms(self, measurements: Measurements, targets: Tensor | None = None) -> Tensor:
        return self._trace_terms(self.weights(), measurements)

    def _trace_terms(self, weights: list[Tensor], measurements: Measurements) -> Tensor:
        """The chain ``[W_1, ..., W_L, w^T]``'s layer terms without the last (the fixed ``w`` is no coordinate)."""
        w_row = self._w_row()
        chain = list(weights) + [w_row.expand(*weights[0].shape[:-2], *w_row.shape[-2:])]
        return F.hessian_trace(chain, measurements, per_layer=True)[..., :-1]

    def theta(self) -> list[Tensor]:
        r"""The theory's coordinates $\theta_k = L(W_k - W_k(0))$."""
        return [self.depth * (W - W0) for W, W0 in zip(self.weights(), self.initial)]
