"""Exact rescaling by powers of two: products of factors that would overflow or underflow are computed on scaled
factors and scaled back exactly (differentiable in the values)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["pow2_scale", "times_pow2"]


def pow2_scale(amax: Tensor) -> Tensor:
    r"""The power of two $2^e \ge$ ``amax`` with ``amax`` in $(2^{e-1}, 2^e]$ (1 where ``amax`` is 0 or
    not finite): dividing by it and multiplying back is exact in floating point."""
    _, e = torch.frexp(amax.detach())
    ok = torch.isfinite(amax) & (amax > 0)
    return torch.where(ok, torch.ldexp(torch.ones_like(amax), e), torch.ones_like(amax))


def times_pow2(x: Tensor, n: Tensor) -> Tensor:
    """``x * 2**n`` for integer ``n``, differentiable in ``x`` (``torch.ldexp`` has no gradient), in two exact
    half-steps so that the factor itself never overflows where the product does not."""
    half = torch.div(n, 2, rounding_mode="floor")
    one = torch.ones_like(x)
    return x * torch.ldexp(one, half) * torch.ldexp(one, n - half)
