r"""Ranks and norms of matrices from their singular values; all functions take ``M (..., m, n)``.

Degenerate input is fine: a zero matrix has every rank 0 and every norm 0 (finite, never NaN); a matrix with a
non-finite entry (a diverged run) gets NaN singular values, hence NaN ranks and norms, instead of a LAPACK error.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_flat._checks import check_choice, check_positive_int, check_real, check_tensor

__all__ = ["singular_values", "effective_rank", "nuclear_norm", "schatten_norm", "representation_cost"]


def singular_values(M: Tensor) -> Tensor:
    """Singular values in descending order, shape ``(..., min(m, n))``; NaN for a matrix with a non-finite entry
    (LAPACK is not called on it). Half precision is computed in float32.

    Example:
        >>> singular_values(torch.tensor([[3.0, 0.0], [0.0, float("inf")]]))
        tensor([nan, nan])
    """
    check_tensor("M", M, min_ndim=2, floating=True)
    work = M.float() if M.dtype in (torch.float16, torch.bfloat16) else M
    finite = torch.isfinite(work).flatten(-2).all(-1)
    if bool(finite.all()):
        return torch.linalg.svdvals(work)
    out = torch.full((*work.shape[:-2], min(work.shape[-2:])), float("nan"), dtype=work.dtype, device=work.device)
    if bool(finite.any()):
        out[finite] = torch.linalg.svdvals(work[finite])
    return out


def effective_rank(M: Tensor, kind: str = "entropy", tol: float | None = None) -> Tensor:
    r"""Effective rank of ``M``, shape ``(...)``, in ``M``'s dtype.

    - ``"entropy"``: :math:`\exp(-\sum_k p_k \log p_k)` with :math:`p = s / \sum_k s_k` (Roy & Vetterli 2007);
    - ``"stable"``: :math:`\|M\|_F^2 / \|M\|_2^2`;
    - ``"numerical"``: :math:`\#\{k : s_k > \mathrm{tol}\cdot s_1\}`, ``tol`` defaulting to
      :math:`\max(m, n)\,\varepsilon` of the dtype (as ``torch.linalg.matrix_rank``).

    Each is 0 for the zero matrix.

    Example:
        >>> effective_rank(torch.diag(torch.tensor([1.0, 1.0, 0.0])))
        tensor(2.)
    """
    check_choice("kind", kind, ("entropy", "stable", "numerical"))
    s = singular_values(M)
    total = s.sum(-1, keepdim=True)
    top = s[..., :1]
    zero = total[..., 0] <= 0  # False for NaN: a non-finite matrix stays NaN
    if kind == "entropy":
        p = s / torch.where(total > 0, total, torch.ones_like(total))
        plogp = torch.where(p > 0, p * torch.log(torch.where(p > 0, p, torch.ones_like(p))), torch.zeros_like(p))
        out = torch.exp(-plogp.sum(-1))
    elif kind == "stable":
        out = s.square().sum(-1) / torch.where(top > 0, top, torch.ones_like(top))[..., 0].square()
    else:
        if tol is None:
            tol = max(M.shape[-2:]) * torch.finfo(s.dtype).eps
        tol = check_real("tol", tol, low=0.0)
        out = (s > tol * top).sum(-1).to(s.dtype)
        out = torch.where(torch.isnan(top[..., 0]), torch.full_like(out, float("nan")), out)
    return torch.where(zero, torch.zeros_like(out), out)


def nuclear_norm(M: Tensor) -> Tensor:
    r"""Nuclear norm :math:`\|M\|_* = \sum_k s_k`, shape ``(...)``."""
    return singular_values(M).sum(-1)


def schatten_norm(M: Tensor, p: float) -> Tensor:
    r"""Schatten-p (quasi-)norm :math:`(\sum_k s_k^p)^{1/p}` for ``p > 0`` (``p = 1`` nuclear, ``p = 2`` Frobenius)."""
    p = check_real("p", p, low=0.0, low_open=True)
    s = singular_values(M)
    return s.pow(p).sum(-1).pow(1.0 / p)


def representation_cost(M: Tensor, depth: int) -> Tensor:
    r"""L2 representation cost of ``M`` for a depth-``L`` linear network, shape ``(...)``:

    .. math:: \min_{W_L\cdots W_1 = M} \sum_j \|W_j\|_F^2 = L \sum_k s_k^{2/L} = L\,\|M\|_{S_{2/L}}^{2/L}

    (attained by balanced factors when every width is at least ``rank M``).
    """
    depth = check_positive_int("depth", depth)
    return depth * singular_values(M).pow(2.0 / depth).sum(-1)
