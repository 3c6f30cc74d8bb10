r"""Ranks and norms of matrices from their singular values; all functions take ``M (..., m, n)``.

Degenerate input is fine: a zero matrix has every rank 0 and every norm 0 (finite, never NaN); a matrix with a
non-finite entry (a diverged run) gets NaN singular values, hence NaN ranks and norms, instead of a LAPACK error.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_flat._checks import check_choice, check_positive_int, check_real, check_tensor

__all__ = ["singular_values", "effective_rank", "nuclear_norm", "schatten_norm", "representation_cost", "soft_rank",
           "approximate_rank", "jump_time"]


def singular_values(M: Tensor) -> Tensor:
    """Singular values in descending order, shape ``(..., min(m, n))``; NaN for a matrix with a non-finite entry
    (LAPACK is not called on it). Half precision is computed in float32.

    Examples:
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

    - ``"entropy"``: $\exp(-\sum_k p_k \log p_k)$ with $p = s / \sum_k s_k$ (Roy & Vetterli 2007);
    - ``"stable"``: $\|M\|_F^2 / \|M\|_2^2$;
    - ``"numerical"``: $\#\{k : s_k > \mathrm{tol}\cdot s_1\}$, ``tol`` defaulting to
      $\max(m, n)\,\varepsilon$ of the dtype (as ``torch.linalg.matrix_rank``).

    Each is 0 for the zero matrix.

    Examples:
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
    elif kind == "stable":  # sum (s_k / s_1)^2: finite whenever the singular values are, never s^2 overflowing
        out = (s / torch.where(top > 0, top, torch.ones_like(top))).square().sum(-1)
    else:
        if tol is None:
            tol = max(M.shape[-2:]) * torch.finfo(s.dtype).eps
        tol = check_real("tol", tol, low=0.0)
        out = (s > tol * top).sum(-1).to(s.dtype)
        out = torch.where(torch.isnan(top[..., 0]), torch.full_like(out, float("nan")), out)
    return torch.where(zero, torch.zeros_like(out), out)


def nuclear_norm(M: Tensor) -> Tensor:
    r"""Nuclear norm $\|M\|_* = \sum_k s_k$, shape ``(...)``."""
    return singular_values(M).sum(-1)


def schatten_norm(M: Tensor, p: float) -> Tensor:
    r"""Schatten-p (quasi-)norm $(\sum_k s_k^p)^{1/p}$ for ``p > 0`` (``p = 1`` nuclear, ``p = 2`` Frobenius)."""
    p = check_real("p", p, low=0.0, low_open=True)
    s = singular_values(M)
    return _scaled_schatten(s, p)


def _scaled_schatten(s: Tensor, p: float) -> Tensor:
    r"""$(\sum_k s_k^p)^{1/p}$ as $s_1 (\sum_k (s_k/s_1)^p)^{1/p}$, so that it is finite whenever the
    result is representable (``s^p`` itself may overflow or underflow)."""
    top = s[..., :1]
    safe = torch.where(top > 0, top, torch.ones_like(top))
    return top[..., 0] * (s / safe).pow(p).sum(-1).pow(1.0 / p)


def representation_cost(M: Tensor, depth: int) -> Tensor:
    r"""L2 representation cost of ``M`` for a depth-``L`` linear network, shape ``(...)``:

    $$
    \min_{W_L\cdots W_1 = M} \sum_j \|W_j\|_F^2 = L \sum_k s_k^{2/L} = L\,\|M\|_{S_{2/L}}^{2/L}
    $$

    (attained by balanced factors when every width is at least ``rank M``).
    """
    depth = check_positive_int("depth", depth)
    return depth * singular_values(M).pow(2.0 / depth).sum(-1)


def soft_rank(M: Tensor, alpha: float = 1e-3) -> Tensor:
    r"""A continuous rank of ``M``, shape ``(...)``: $\sum_i f_\alpha(\lambda_i(M^\top M))$ with

    $$
    f_\alpha(x) = x(2\alpha - x)/\alpha^2 \ (x \le \alpha), \qquad 1 \ (x > \alpha),
    $$

    which rises smoothly from 0 at $x = 0$ to 1 at $x = \alpha$ (flat there): each squared singular
    value above ``alpha`` counts 1, smaller ones count less. NaN for a non-finite ``M``.

    Examples:
        >>> soft_rank(torch.diag(torch.tensor([1.0, 0.1, 0.0])), alpha=0.005)
        tensor(2.)
    """
    alpha = check_real("alpha", alpha, low=0.0, low_open=True)
    x = singular_values(M).square()
    f = torch.where(x <= alpha, x * (2 * alpha - x) / alpha ** 2, torch.ones_like(x))
    return torch.where(torch.isnan(x), x, f).sum(-1)


def approximate_rank(weights: list[Tensor], alpha: float = 1e-3) -> Tensor:
    r"""The approximate rank of a deep network's parameters, $\max_j$ [`soft_rank`][lightning_flat.functional.soft_rank]
    $(W_j, \alpha)$, shape ``(...)`` for factors ``W_j (..., d_j, d_{j-1})``. Under SGD with weight decay, directions
    that the data do not feed shrink geometrically, so this counts the directions that carry the solution: it reads the
    hidden width at a random init, and the rank of the end-to-end map once training has shed the rest."""
    if len(weights) == 0:
        raise ValueError("weights must list at least one factor")
    return torch.stack([soft_rank(W, alpha) for W in weights]).amax(0)


def jump_time(steps: Tensor, values: Tensor, threshold: float = 1e-3, after: int = 0) -> Tensor:
    r"""The first step ``>= after`` at which ``values`` is below ``threshold``: ``steps (T,)``, ``values (T, ...)``
    (e.g. a singular value ratio $s_2/s_1$ measured at ``steps``), result ``(...)`` in float64, NaN where it
    never happens (NaN values never count).

    Examples:
        >>> jump_time(torch.tensor([0, 10, 20]), torch.tensor([[0.3, 0.2], [1e-4, 0.2], [1e-6, 0.1]]))
        tensor([10., nan], dtype=torch.float64)
    """
    check_tensor("steps", steps, ndim=1)
    check_tensor("values", values, min_ndim=1)
    if values.shape[0] != steps.shape[0]:
        raise ValueError(f"values must have one row per step ({steps.shape[0]}), got shape {tuple(values.shape)}")
    threshold = check_real("threshold", threshold)
    s = steps.to(torch.float64).reshape(-1, *([1] * (values.ndim - 1))).expand(values.shape)
    hit = (values < threshold) & (s >= after)
    nan = torch.full_like(s, float("nan"))
    first = torch.where(hit, s, torch.full_like(s, float("inf"))).amin(0) if steps.numel() else nan.sum(0)
    return torch.where(torch.isinf(first), torch.full_like(first, float("nan")), first)
