r"""Balancedness of a deep linear network's factors."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_flat.functional._scaling import pow2_scale, times_pow2
from lightning_flat.functional.curvature import _check_weights

__all__ = ["balancedness"]


def balancedness(weights: Sequence[Tensor], per_layer: bool = False) -> Tensor:
    r"""Distance from balance $\sum_{j=1}^{L-1} \|W_{j+1}^\top W_{j+1} - W_j W_j^\top\|_F$, shape ``(...)``.

    Gradient flow on any loss of $E = W_L\cdots W_1$ conserves each $W_{j+1}^\top W_{j+1} - W_j W_j^\top$
    (Arora, Cohen, Hazan 2018). With ``per_layer=True`` returns the ``L - 1`` terms, shape ``(..., L - 1)``. A
    single layer is balanced (0).

    Examples:
        >>> balancedness([torch.eye(2), torch.eye(2)])
        tensor(0.)
    """
    weights = _check_weights(weights)
    if weights[0].dtype in (torch.float16, torch.bfloat16):  # measured in float32
        weights = [W.float() for W in weights]
    # scaled by a power of two c (exact): terms(W) = c^2 terms(W / c), so no product W^T W overflows or underflows
    # where the result itself is representable
    batch = torch.broadcast_shapes(*(W.shape[:-2] for W in weights))
    c = pow2_scale(torch.stack([W.abs().amax((-2, -1)).expand(batch) for W in weights]).amax(0))
    weights = [W * (1.0 / c)[..., None, None] for W in weights]  # (torch.ldexp has no gradient)
    batch = torch.broadcast_shapes(*(W.shape[:-2] for W in weights))
    if len(weights) == 1:
        z = weights[0].new_zeros(batch)
        return z.unsqueeze(-1)[..., :0] if per_layer else z
    terms = torch.stack([
        torch.linalg.matrix_norm(weights[j + 1].transpose(-1, -2) @ weights[j + 1]
                                 - weights[j] @ weights[j].transpose(-1, -2))
        .expand(batch) for j in range(len(weights) - 1)
    ], dim=-1)
    _, e = torch.frexp(c)  # c = 2^(e - 1)
    terms = times_pow2(terms, 2 * (e - 1).unsqueeze(-1))
    return terms if per_layer else terms.sum(-1)
