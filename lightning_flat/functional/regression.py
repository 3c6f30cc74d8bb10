r"""Closed forms for deep linear networks on univariate regression (Marion & Chizat 2024).

The model is $f(x) = w^\top W_L\cdots W_1 x$ (``w`` a fixed vector; for a
[`DeepLinearNet`][lightning_flat.models.DeepLinearNet] with dims ``(d, ..., d, 1)`` take ``w = 1`` and the last factor
``(1, d)``), the loss $R(W) = \frac1n\|y - Xw_{prod}\|^2$ with $w_{prod} = W_1^\top\cdots W_L^\top w$ (the library's
measurement loss: no 1/2, so every closed form below compares directly with the Hessian of the library's loss). With
$\hat\Sigma = X^\top X/n$, $\lambda$/$\Lambda$ its extreme eigenvalues, $w^*$ the
least-squares solution and $a = w^{*\top}\hat\Sigma w^*/\|w^*\|^2$:

- [`sharpness_lower_bound`][lightning_flat.functional.sharpness_lower_bound]: any global minimiser has sharpness
  $S \ge S_{min} = 2L\lambda\|w^*\|^{2-2/L}$ (Thm 1), and the same proof gives
  $S \ge S_{min}^a = 2La\|w^*\|^{2-2/L}$;
- [`sharpness_upper_bound`][lightning_flat.functional.sharpness_upper_bound]: $UB = 8L\Lambda\|w^*\|^{2-2/L}$, the bound
  of gradient flow from a small initialisation (Cor. 3: $S \le 4\frac\Lambda\lambda S_{min}$);
- [`minimizer_sharpness`][lightning_flat.functional.minimizer_sharpness]: at a minimiser the residual term vanishes and
  $S = 2\lambda_{max}(\hat\Sigma^{1/2}G\hat\Sigma^{1/2})$,
  $G = \sum_k\|w^\top W_L\cdots W_{k+1}\|^2 (W_{k-1}\cdots W_1)^\top(W_{k-1}\cdots W_1)$;
- [`ideal_minimizer`][lightning_flat.functional.ideal_minimizer]: $W_k = \|w^*\|^{1/L}u_ku_{k-1}^\top$ with
  $u_0 = w^*/\|w^*\|$, whose sharpness is
  $2\|w^*\|^{2-2/L}\lambda_{max}(\hat\Sigma + (L-1)\hat\Sigma^{1/2}u_0u_0^\top\hat\Sigma^{1/2})$
  ([`ideal_minimizer_sharpness`][lightning_flat.functional.ideal_minimizer_sharpness]), within
  $2\|w^*\|^{2-2/L}(\Lambda - a)$ of $S_{min}^a$;
- [`conserved_gaps`][lightning_flat.functional.conserved_gaps] and [`epsilon_gd`][lightning_flat.functional.epsilon_gd]:
  $D_k = W_{k+1}^\top W_{k+1} - W_kW_k^\top$, conserved by gradient flow, and the bound $\varepsilon$ of Lemma 1 with
  gradient descent's drift of $D_k$ added.

References:
    Marion, Chizat (2024), "Deep linear networks for regression are implicitly regularized towards flat minima".
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_flat._checks import check_choice, check_positive_int
from lightning_flat.functional.theory import psd_sqrt

__all__ = ["least_squares", "sharpness_lower_bound", "sharpness_upper_bound", "minimizer_sharpness",
           "ideal_minimizer", "ideal_minimizer_sharpness", "conserved_gaps", "epsilon_gd"]


def _check_xy(X: Tensor, y: Tensor) -> None:
    if not isinstance(X, Tensor) or X.ndim != 2 or X.shape[0] <= X.shape[1]:
        raise ValueError(f"X must be a tensor of shape (n, d) with n > d, got {getattr(X, 'shape', X)}")
    if not isinstance(y, Tensor) or y.shape != X.shape[:1]:
        raise ValueError(f"y must be a tensor of shape ({X.shape[0]},), got {getattr(y, 'shape', y)}")


def least_squares(X: Tensor, y: Tensor) -> dict[str, Tensor]:
    r"""``w_star`` $(X^\top X)^{-1}X^\top y$, ``sigma_hat`` $X^\top X/n$, ``lambda_min``,
    ``lambda_max``, ``a`` and ``r_min`` $\frac1n\|y - Xw^*\|^2$."""
    _check_xy(X, y)
    w = torch.linalg.lstsq(X, y.unsqueeze(-1)).solution.squeeze(-1)
    sigma = X.T @ X / X.shape[0]
    eig = torch.linalg.eigvalsh(sigma)
    return dict(w_star=w, sigma_hat=sigma, lambda_min=eig[0], lambda_max=eig[-1],
                a=w @ sigma @ w / w.square().sum(), r_min=(y - X @ w).square().mean())


def sharpness_lower_bound(X: Tensor, y: Tensor, depth: int, kind: str = "lambda") -> Tensor:
    r"""$2Lc\|w^*\|^{2-2/L}$ with $c = \lambda_{min}(\hat\Sigma)$ (``kind="lambda"``, Thm 1's
    $S_{min}$) or $c = a$ (``kind="a"``, the tighter $S_{min}^a$).

    Examples:
        >>> X = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]], dtype=torch.float64)
        >>> y = X @ torch.tensor([1.0, 0.0], dtype=torch.float64)
        >>> round(float(sharpness_lower_bound(X, y, 1, "a")), 6)  # L = 1: the Hessian is 2 Sigma, along w* = e_1
        1.333333
    """
    L = check_positive_int("depth", depth)
    check_choice("kind", kind, ("lambda", "a"))
    ls = least_squares(X, y)
    c = ls["lambda_min"] if kind == "lambda" else ls["a"]
    return 2 * L * c * ls["w_star"].norm() ** (2 - 2 / L)


def sharpness_upper_bound(X: Tensor, y: Tensor, depth: int) -> Tensor:
    r"""$UB = 8L\Lambda\|w^*\|^{2-2/L}$ (gradient flow from a small initialisation, Cor. 3)."""
    L = check_positive_int("depth", depth)
    ls = least_squares(X, y)
    return 8 * L * ls["lambda_max"] * ls["w_star"].norm() ** (2 - 2 / L)


def minimizer_sharpness(weights: Sequence[Tensor], X: Tensor, w: Tensor | None = None) -> Tensor:
    r"""Sharpness of $R$ at a global minimiser ($X^\top(Xw_{prod} - y) = 0$): the top eigenvalue of the
    Gauss-Newton part, $2\lambda_{max}(\hat\Sigma^{1/2}G\hat\Sigma^{1/2})$. ``weights`` are ``[W_1, ..., W_L]``
    (``W_1`` has ``d`` columns), ``w`` the fixed output vector (default: none, ``W_L`` has one row)."""
    Ws = list(weights)
    d = Ws[0].shape[-1]
    top = torch.ones(1, 1, dtype=Ws[0].dtype) if w is None else w.reshape(1, -1).to(Ws[0].dtype)
    suffix = [top]  # w^T W_L ... W_{k+1}, from k = L down
    for W in reversed(Ws[1:]):
        suffix.append(suffix[-1] @ W)
    suffix = suffix[::-1]  # suffix[k] = w^T W_L ... W_{k+2} (0-based layer k+1)
    prefix = torch.eye(d, dtype=Ws[0].dtype)
    G = torch.zeros(d, d, dtype=Ws[0].dtype)
    for k, W in enumerate(Ws):
        G = G + suffix[k].square().sum() * (prefix.T @ prefix)
        prefix = W @ prefix
    root = psd_sqrt(X.T @ X / X.shape[0])
    return 2 * torch.linalg.eigvalsh(root @ G @ root)[-1]


def ideal_minimizer(w_star: Tensor, depth: int, width: int | None = None, w: Tensor | None = None) -> list[Tensor]:
    r"""The minimiser $W_k = \|w^*\|^{1/L}u_ku_{k-1}^\top$, $u_0 = w^*/\|w^*\|$: square layers
    ``(width = d)`` use $u_k = u_0$, and the top factor ends on the fixed output ``w`` (the residual network's:
    $W_L = \|w^*\|^{1/L}\,w u_0^\top/\|w\|^2$, so that $w^\top W_L\cdots W_1 = w^{*\top}$ exactly);
    default ``None``: a ``(1, d)`` last layer with $u_L = 1$."""
    L = check_positive_int("depth", depth)
    d = w_star.shape[-1]
    width = d if width is None else check_positive_int("width", width)
    if width != d:
        raise ValueError(f"ideal_minimizer builds square hidden layers of width d = {d}, got width={width}")
    nrm = w_star.norm()
    u0 = w_star / nrm
    c = nrm ** (1.0 / L)
    Ws = [c * torch.outer(u0, u0) for _ in range(L - 1)]
    if w is None:
        Ws.append(c * u0.reshape(1, -1))
    else:
        Ws.append(c * torch.outer(w / w.square().sum(), u0))
    return Ws


def ideal_minimizer_sharpness(X: Tensor, y: Tensor, depth: int) -> Tensor:
    r"""$2\|w^*\|^{2-2/L}\lambda_{max}(\hat\Sigma + (L-1)\hat\Sigma^{1/2}u_0u_0^\top\hat\Sigma^{1/2})$."""
    L = check_positive_int("depth", depth)
    ls = least_squares(X, y)
    nrm = ls["w_star"].norm()
    root = psd_sqrt(ls["sigma_hat"])
    v = root @ (ls["w_star"] / nrm)
    return 2 * nrm ** (2 - 2 / L) * torch.linalg.eigvalsh(ls["sigma_hat"] + (L - 1) * torch.outer(v, v))[-1]


def conserved_gaps(weights: Sequence[Tensor], w: Tensor | None = None) -> list[Tensor]:
    r"""$D_k = W_{k+1}^\top W_{k+1} - W_kW_k^\top$ for ``k = 1..L-1`` (and, with the fixed output ``w``,
    $D_L = ww^\top - W_LW_L^\top$), conserved by gradient flow."""
    Ws = list(weights)
    out = [Ws[k + 1].transpose(-1, -2) @ Ws[k + 1] - Ws[k] @ Ws[k].transpose(-1, -2) for k in range(len(Ws) - 1)]
    if w is not None:
        out.append(torch.outer(w, w) - Ws[-1] @ Ws[-1].transpose(-1, -2))
    return out


def epsilon_gd(initial: Sequence[Tensor], final: Sequence[Tensor], w: Tensor | None = None) -> Tensor:
    r"""$\varepsilon_{GD} = 3\max_k\|W_k(0)\|_F^2 + 2\sum_k\|D_k(0)\|_2 + 2\sum_k\|D_k(T) - D_k(0)\|_*$: Lemma 1's
    $\varepsilon$ plus gradient descent's drift of the conserved quantities (gradient flow has none)."""
    D0, DT = conserved_gaps(initial, w), conserved_gaps(final, w)
    eps = 3 * max(W.square().sum() for W in initial)
    eps = eps + 2 * sum(torch.linalg.matrix_norm(D, ord=2) for D in D0)
    return eps + 2 * sum(torch.linalg.matrix_norm(b - a, ord="nuc") for a, b in zip(D0, DT))
