r"""Curvature of the measurement loss of a deep linear network: exact Hessian trace, sharpness.

The model is $E(W) = W_L \cdots W_1$ with ``W_j (..., d_j, d_{j-1})`` and the loss
$L(W) = \frac1n \sum_i (\langle A_i, E(W)\rangle - b_i)^2$ (mean squared error, no 1/2).
Leading dimensions ``...`` are replicas; every function here broadcasts over them.

Notation: $P_j = W_{j-1}\cdots W_1$ (``P_1 = I``) and $S_j = W_L \cdots W_{j+1}$ (``S_L = I``), so
$\nabla_{W_j} f_i = S_j^\top A_i P_j^\top$. Since $f_i$ is linear in each $W_j$ separately, the
diagonal Hessian blocks of $f_i$ vanish and, at every $W$ (not only at interpolation),

$$
\operatorname{tr}\nabla^2 L(W) = \frac2n \sum_i \|\nabla f_i(W)\|^2
= \frac2n \sum_j \mathrm{curvature}(P_j^\top P_j,\; S_j S_j^\top).
$$

References:
    Gatmiry, Li, Chuang, Reddi, Ma, Jegelka (2023), Lemma 2 (from their Sec. 4 on, constants are for a loss with
    1/(2n), half of ours, so their traces are half of these).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_flat.functional._scaling import pow2_scale, times_pow2
from lightning_flat.measurements import Measurements

__all__ = ["end_to_end", "partial_products", "measurement_loss", "hessian_trace", "trace_surrogate"]


def _check_weights(weights: Sequence[Tensor]) -> list[Tensor]:
    if isinstance(weights, Tensor) or not isinstance(weights, (list, tuple)):
        raise TypeError(f"weights must be a list of tensors [W_1, ..., W_L], got {type(weights).__name__}")
    if len(weights) == 0:
        raise ValueError("weights must hold at least one layer, got an empty list")
    for j, W in enumerate(weights):
        if not isinstance(W, Tensor) or W.ndim < 2:
            raise ValueError(f"weights[{j}] must be a tensor of shape (..., d_{j + 1}, d_{j}), "
                             f"got {getattr(W, 'shape', W)}")
    for j in range(1, len(weights)):
        if weights[j].dtype != weights[0].dtype:
            raise TypeError(f"weights must share one dtype, got weights[0] {weights[0].dtype} and weights[{j}] "
                            f"{weights[j].dtype}")
        if weights[j].shape[-1] != weights[j - 1].shape[-2]:
            raise ValueError(
                f"weights[{j}] has shape {tuple(weights[j].shape)} but weights[{j - 1}] has shape "
                f"{tuple(weights[j - 1].shape)}: W_{j + 1} must have d_{j} = {weights[j - 1].shape[-2]} columns"
            )
    return list(weights)


def end_to_end(weights: Sequence[Tensor]) -> Tensor:
    r"""End-to-end matrix $E = W_L \cdots W_1$ of shape ``(..., d_L, d_0)``.

    Examples:
        >>> W1, W2 = torch.eye(3, 2), 2 * torch.ones(1, 3)
        >>> end_to_end([W1, W2])
        tensor([[2., 2.]])
    """
    weights = _check_weights(weights)
    E = weights[0]
    for W in weights[1:]:
        E = torch.matmul(W, E)
    return E


def _eye_like(W: Tensor, d: int, batch: torch.Size) -> Tensor:
    return torch.eye(d, dtype=W.dtype, device=W.device).expand(*batch, d, d)


def partial_products(weights: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    r"""Prefix and suffix products ``(P, S)``: ``P[j] = W_{j-1}...W_1`` (``(..., d_{j-1}, d_0)``, ``P[0] = I``) and
    ``S[j] = W_L...W_{j+1}`` (``(..., d_L, d_j)``, ``S[L-1] = I``), indexed from 0 for layer ``j+1``."""
    weights = _check_weights(weights)
    L = len(weights)
    batch = torch.broadcast_shapes(*(W.shape[:-2] for W in weights))
    P = [_eye_like(weights[0], weights[0].shape[-1], batch)]
    for j in range(L - 1):
        P.append(torch.matmul(weights[j], P[j]))
    S: list[Tensor] = [None] * L  # type: ignore[list-item]
    S[L - 1] = _eye_like(weights[-1], weights[-1].shape[-2], batch)
    for j in range(L - 1, 0, -1):
        S[j - 1] = torch.matmul(S[j], weights[j])
    return P, S


def measurement_loss(E: Tensor, measurements: Measurements, targets: Tensor) -> Tensor:
    r"""$\frac1n\sum_i(\langle A_i, E\rangle - b_i)^2$ (no 1/2), shape ``(...)`` for ``E (..., d_out, d_in)``."""
    return (measurements(E) - targets).square().mean(-1)


def hessian_trace(weights: Sequence[Tensor], measurements: Measurements, targets: Tensor | None = None,
                  per_layer: bool = False) -> Tensor:
    r"""Exact trace of the Hessian of the measurement loss in the weights, shape ``(...)``.

    $$
    \operatorname{tr}\nabla^2 L(W) = \frac2n\sum_{j=1}^L\sum_i \operatorname{tr}(A_i P_j^\top P_j A_i^\top S_j S_j^\top)
    $$

    Exact at every ``W`` (the residual term has zero trace because each $f_i$ is linear in each layer), and
    differentiable in the weights (usable as a regulariser). ``per_layer=True`` returns the ``L`` terms (the traces of
    the diagonal Hessian blocks, one per layer), shape ``(..., L)``. ``targets`` is not used: it is accepted so that the
    exact and the generic (Hutch++) paths share one signature. All $L$ layer terms go to
    ``measurements.curvature`` in one batched call (for [`Dense`][lightning_flat.measurements.Dense] at the Gatmiry
    size this is one product with the cached fourth-moment matrix).

    Examples:
        >>> from lightning_flat.measurements import Entries
        >>> rows, cols = torch.tensor([0, 1]), torch.tensor([1, 0])
        >>> hessian_trace([torch.eye(2, dtype=torch.float64)], Entries(rows, cols, (2, 2)))
        tensor(2., dtype=torch.float64)
    """
    weights = _check_weights(weights)
    if not isinstance(measurements, Measurements):
        raise TypeError(f"measurements must be a lightning_flat Measurements, got {type(measurements).__name__}")
    d_out, d_in = weights[-1].shape[-2], weights[0].shape[-1]
    if (d_out, d_in) != tuple(measurements.shape):
        raise ValueError(f"weights map R^{d_in} to R^{d_out} but measurements have shape {measurements.shape}")
    if weights[0].dtype in (torch.float16, torch.bfloat16):  # measured in float32
        weights = [W.float() for W in weights]
        measurements = measurements.to(dtype=torch.float32)
    measurements.check_dtype("weights", weights[0])
    # Each factor scaled by a power of two c_j (exact, detached: the identity below holds for every W, so gradients
    # are unchanged): term j is homogeneous of degree 2 in every other factor and 0 in W_j, so
    # term_j(W) = prod_{l != j} c_l^2 term_j(W / c), and no product overflows where the trace is representable.
    c = torch.stack([pow2_scale(W.abs().amax((-2, -1))) for W in weights])  # (L, ...), detached powers of two
    weights = [W * (1.0 / c[j])[..., None, None] for j, W in enumerate(weights)]  # (torch.ldexp has no gradient)
    P, S = partial_products(weights)
    G = torch.stack([Pj.transpose(-1, -2) @ Pj for Pj in P])  # (L, ..., d_in, d_in)
    K = torch.stack([Sj @ Sj.transpose(-1, -2) for Sj in S])  # (L, ..., d_out, d_out)
    terms = measurements.curvature(G, K, symmetric=True) * (2.0 / len(measurements))  # (L, ...)
    _, e = torch.frexp(c)  # c_j = 2^(e_j - 1): the factor prod_{l != j} c_l^2 as a power of two, never overflowing
    terms = times_pow2(terms, 2 * (e.sum(0) - e) - 2 * (len(weights) - 1))
    return terms.movedim(0, -1) if per_layer else terms.sum(0)


def trace_surrogate(weights: Sequence[Tensor]) -> Tensor:
    r"""Gatmiry et al.'s surrogate $R(W) = \sum_j \|P_j\|_F^2\|S_j\|_F^2$, shape ``(...)``.

    For Gaussian measurements with N(0,1) entries, $\mathbb E_A \operatorname{tr}\nabla^2 L = 2R(W)$ exactly.
    """
    P, S = partial_products(weights)
    return sum(Pj.square().sum((-2, -1)) * Sj.square().sum((-2, -1)) for Pj, Sj in zip(P, S))
