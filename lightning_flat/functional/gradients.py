r"""Analytic gradients of the measurement loss: the residual, one adjoint and the chain rule through each
parameterization, with no autograd graph.

For predictions $f_i = \langle A_i, E(W)\rangle$ on a batch of ``B`` measurements with targets ``y`` the loss
$L = \frac1B\sum_i (f_i - y_i)^2$ has $\partial L/\partial E = G = \frac2B\mathcal A^*(r)$,
$r = f - y$ (one adjoint of the measurement operator), and the weight gradients are the vector-Jacobian
product of the parameterization $W \mapsto E$ at $G$:

- chain $E = W_L\cdots W_1$ (`chain_prefixes`, `chain_vjp`):
  $\nabla_{W_j} L = S_j^\top G P_j^\top$ with $P_j = W_{j-1}\cdots W_1$, $S_j = W_L\cdots W_{j+1}$;
  the prefixes $P_j$ are the forward pass and the suffix side is one running product
  $T_j = S_j^\top G$ (``3(L-1)`` matrix products in all, as a backward pass);
- symmetric factors $E = U_1U_1^\top - U_2U_2^\top$ (`symmetric_vjp`):
  $\nabla_{U_1} L = (G + G^\top)U_1$, $\nabla_{U_2} L = -(G + G^\top)U_2$.

Leading dimensions (replicas) broadcast. Every function here is checked against ``torch.autograd`` in the tests.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_flat.measurements import Measurements

__all__ = ["chain_prefixes", "chain_vjp", "symmetric_vjp", "residual_and_end_to_end_gradient"]


def chain_prefixes(weights: Sequence[Tensor]) -> list[Tensor]:
    r"""``[W_1, W_2W_1, ..., W_L\cdots W_1]``: entry ``j`` is $P_{j+2} = W_{j+1}\cdots W_1$; the last is ``E``.

    Examples:
        >>> W1, W2 = torch.eye(3, 2), 2 * torch.ones(1, 3)
        >>> chain_prefixes([W1, W2])[-1]
        tensor([[2., 2.]])
    """
    out = [weights[0]]
    for W in weights[1:]:
        out.append(torch.matmul(W, out[-1]))
    return out


def chain_vjp(weights: Sequence[Tensor], prefixes: Sequence[Tensor], G: Tensor) -> list[Tensor]:
    r"""Gradients $S_j^\top G P_j^\top$ of $\langle G, W_L\cdots W_1\rangle$ in every ``W_j``.

    ``prefixes`` from `chain_prefixes`; ``G (..., d_L, d_0)``.

    Examples:
        >>> W = [torch.tensor([[2.0]]), torch.tensor([[3.0]])]
        >>> chain_vjp(W, chain_prefixes(W), torch.ones(1, 1))  # d(W2 W1)/dW1 = W2, d/dW2 = W1
        [tensor([[3.]]), tensor([[2.]])]
    """
    L = len(weights)
    grads: list[Tensor] = [None] * L  # type: ignore[list-item]
    T = G  # S_j^T G, from the top layer down
    for j in range(L - 1, 0, -1):
        grads[j] = torch.matmul(T, prefixes[j - 1].transpose(-1, -2))
        T = torch.matmul(weights[j].transpose(-1, -2), T)
    grads[0] = T
    return grads


def symmetric_vjp(factors: Sequence[Tensor], G: Tensor) -> list[Tensor]:
    r"""Gradients of $\langle G, U_1U_1^\top - U_2U_2^\top\rangle$: $[(G+G^\top)U_1, -(G+G^\top)U_2]$."""
    Gs = G + G.transpose(-1, -2)
    U1, U2 = factors
    return [torch.matmul(Gs, U1), -torch.matmul(Gs, U2)]


def residual_and_end_to_end_gradient(E: Tensor, measurements: Measurements, targets: Tensor) -> tuple[Tensor, Tensor]:
    r"""``(losses, G)`` for the batch loss $\frac1B\sum_i(\langle A_i, E\rangle - y_i)^2$: the per-model
    losses ``(...)`` and $G = \partial L/\partial E = \frac2B\sum_i r_iA_i$ ``(..., d_out, d_in)``.

    Examples:
        >>> from lightning_flat.measurements import Entries
        >>> m = Entries(torch.tensor([0]), torch.tensor([1]), (2, 2), dtype=torch.float64)
        >>> losses, G = residual_and_end_to_end_gradient(torch.zeros(2, 2, dtype=torch.float64), m,
        ...                                              torch.tensor([1.0], dtype=torch.float64))
        >>> float(losses), G.tolist()
        (1.0, [[0.0, -2.0], [0.0, 0.0]])
    """
    r = measurements(E) - targets
    losses = r.square().mean(-1)
    return losses, measurements.adjoint(r * (2.0 / r.shape[-1]))
