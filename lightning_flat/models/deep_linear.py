r"""Deep linear network $E = W_L \cdots W_1$ as a LightningModule."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lightning_flat._checks import check_choice, check_positive_int, check_real
from lightning_flat.models.base import LinearNetBase

__all__ = ["DeepLinearNet", "INITS"]

INITS = ("gaussian", "uniform", "orthogonal", "balanced", "identity")


def _init_weights(dims: list[int], init: str, init_scale: float | None, generator: torch.Generator) -> list[Tensor]:
    """Draw ``[W_1, ..., W_L]`` in float64 on the CPU (so float32 and float64 runs start from the same numbers)."""
    L = len(dims) - 1
    f64 = torch.float64
    out = []
    if init == "balanced":
        d_in, d_out = dims[0], dims[-1]
        k = min(dims)
        scale = init_scale if init_scale is not None else 1.0 / math.sqrt(d_in)
        E0 = torch.randn(d_out, d_in, generator=generator, dtype=f64) * scale
        U, s, Vh = torch.linalg.svd(E0, full_matrices=False)
        U, s, Vh = U[:, :k], s[:k], Vh[:k]
        root = s.pow(1.0 / L)
        Q = [torch.linalg.qr(torch.randn(dims[i], k, generator=generator, dtype=f64)).Q for i in range(1, L)]
        Q = [Vh.T] + Q + [U]  # Q_0 = V (so W_1 = Q_1 diag(root) V^T), Q_L = U
        return [(Q[j + 1] * root) @ Q[j].T for j in range(L)]
    for j in range(L):
        d_prev, d_next = dims[j], dims[j + 1]
        if init == "gaussian":
            std = init_scale if init_scale is not None else 1.0 / math.sqrt(d_prev)
            W = torch.randn(d_next, d_prev, generator=generator, dtype=f64) * std
        elif init == "uniform":
            bound = math.sqrt(3.0) * init_scale if init_scale is not None else 1.0 / math.sqrt(d_prev)
            W = (torch.rand(d_next, d_prev, generator=generator, dtype=f64) * 2.0 - 1.0) * bound
        elif init == "orthogonal":
            Z = torch.randn(max(d_next, d_prev), min(d_next, d_prev), generator=generator, dtype=f64)
            Qm, R = torch.linalg.qr(Z)
            Qm = Qm * torch.sign(torch.diagonal(R)).where(torch.diagonal(R) != 0, torch.ones(1, dtype=f64))
            W = (Qm if d_next >= d_prev else Qm.T) * (init_scale if init_scale is not None else 1.0)
        else:  # identity
            W = torch.eye(d_next, d_prev, dtype=f64) * (init_scale if init_scale is not None else 1.0)
        out.append(W)
    return out


class DeepLinearNet(LinearNetBase):
    r"""Deep linear network $E(W) = W_L\cdots W_1$, ``W_j`` of shape ``(d_j, d_{j-1})``, trained by SGD on
    measurement batches.

    Args:
        dims: ``[d_0 = d_in, d_1, ..., d_L = d_out]``.
        init: ``"gaussian"`` (i.i.d. $N(0, s^2)$ entries, ``s = init_scale``, default
            $1/\sqrt{d_{j-1}}$); ``"uniform"`` (``init_scale=None``: ``nn.Linear``'s default
            $U(\pm 1/\sqrt{d_{j-1}})$; else $U(\pm\sqrt3 s)$, entry std ``s``); ``"orthogonal"``
            (semi-orthogonal times ``init_scale``, default 1); ``"identity"`` (rectangular identity times
            ``init_scale``, default 1); ``"balanced"`` (a Gaussian end-to-end draw with entry std ``init_scale``,
            default $1/\sqrt{d_0}$, truncated to rank ``min(dims)`` and split into factors with equal singular
            values, so $W_{j+1}^\top W_{j+1} = W_jW_j^\top$).
        init_scale: see ``init``; ``None`` for the default; with replicas, a list gives one per replica.
        lr: SGD learning rate (with replicas, a list gives one per replica).
        weight_decay: ridge $\lambda$ as in ``torch.optim.SGD``: the objective is
            $L + \frac\lambda2\sum_j\|W_j\|_F^2$ (with replicas, a list gives one per replica).
        momentum: SGD momentum.
        replicas: number ``R`` of independent networks trained in one module (weights ``(R, d_j, d_{j-1})``, see
            [`LinearNetBase`][lightning_flat.models.LinearNetBase]).
        seed: seed of the initial draw (weights are drawn in float64 on the CPU, then cast); with replicas, replica
            ``r`` uses ``seed + r``, or ``seed[r]`` when a list is given, and equals a single run with that seed.
        optimizer: ``"sgd"`` (default) or ``"lbfgs"`` (full-batch L-BFGS with strong-Wolfe line search, ``lr`` its
            step scale, 1.0 typical; ridge then enters the objective as ``weight_decay/2 * sum ||W_j||^2``).
        trace_penalty: $\lambda$ of the flatness regularizer: the training loss becomes
            $L + \lambda\operatorname{tr}\nabla^2L$ (exact, differentiable; needs a lightning_flat datamodule).
        chunk_size: most SGD steps one ``training_step`` call runs (the engine's fused chunks; every step is the
            step Lightning would take, chunks only save Lightning's per-call overhead); 1 runs one step per call.
        gradients: ``"analytic"`` (default: residual, one adjoint, the chain rule; no autograd graph) or
            ``"autograd"`` (the reference the analytic path is tested against).

    The model is float32 by default; ``.double()`` or ``Trainer(precision="64-true")`` runs it in float64.

    Examples:
        >>> net = DeepLinearNet([3, 4, 2], seed=0)
        >>> [tuple(W.shape) for W in net.weights()], tuple(net.end_to_end().shape)
        ([(4, 3), (2, 4)], (2, 3))
    """

    def __init__(
        self,
        dims: Sequence[int],
        init: str = "gaussian",
        init_scale: float | list[float] | None = None,
        lr: float | list[float] = 0.01,
        weight_decay: float | list[float] = 0.0,
        momentum: float = 0.0,
        replicas: int = 1,
        seed: int | list[int] = 0,
        optimizer: str = "sgd",
        trace_penalty: float = 0.0,
        chunk_size: int = 100,
        gradients: str = "analytic",
    ) -> None:
        super().__init__(replicas, seed)
        if isinstance(dims, (str, bytes)) or not isinstance(dims, Sequence):
            raise TypeError(f"dims must be a list of positive ints [d_in, ..., d_out], got {dims!r}")
        if len(dims) < 2:
            raise ValueError(f"dims must list at least [d_in, d_out], got {list(dims)}")
        dims = [check_positive_int(f"dims[{i}]", d) for i, d in enumerate(dims)]
        check_choice("init", init, INITS)
        reps = self.replicas
        init_scale = reps.hyperparameter("init_scale", init_scale, allow_none=True)
        self.lr = reps.hyperparameter("lr", lr)
        self.weight_decay = reps.hyperparameter("weight_decay", weight_decay)
        self.momentum = check_real("momentum", momentum, low=0.0, high=1.0, high_open=True)
        self.optimizer = check_choice("optimizer", optimizer, ("sgd", "lbfgs"))
        self.trace_penalty = check_real("trace_penalty", trace_penalty, low=0.0)
        self.chunk_size = check_positive_int("chunk_size", chunk_size)
        self.gradients = check_choice("gradients", gradients, ("analytic", "autograd"))
        if self.optimizer == "lbfgs" and (reps.count > 1 or momentum):
            raise ValueError(f"optimizer='lbfgs' takes no replicas and no momentum, got replicas={reps.count}, "
                             f"momentum={momentum}")
        self.save_hyperparameters()
        self.dims = dims
        self.depth = len(dims) - 1
        dtype = torch.get_default_dtype()
        factors = reps.initial(lambda r, g: _init_weights(dims, init, reps.pick(init_scale, r), g))
        self.layers = nn.ParameterList([nn.Parameter(W.to(dtype)) for W in factors])
        self._check_init_finite("init_scale", init_scale)

    def weights(self) -> list[Tensor]:
        """The factors ``[W_1, ..., W_L]`` (the module's parameters, in that order; ``(R, d_j, d_{j-1})`` with
        replicas)."""
        return list(self.layers)
