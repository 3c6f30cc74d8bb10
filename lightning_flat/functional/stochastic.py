r"""Randomized estimators over block products ``V -> H V``: Hutch++ traces and stochastic Lanczos quadrature.

Both draw their Rademacher probes exactly as hessian-eigenthings' ``hutch_plus_plus`` and ``spectral_density`` do
(the same generator, seed and order), so for one seed the two libraries estimate from the same probes; here every
phase multiplies a whole block of probes at once (``matmat``), which batched Hessian-vector products make cheaper
than one product at a time, and the Lanczos runs of all probes advance together.

References:
    Meyer, Musco, Musco, Woodruff (2021), "Hutch++: optimal stochastic trace estimation". Ubaru, Chen, Saad (2017),
    "Fast estimation of tr(f(A)) via stochastic Lanczos quadrature".
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lightning_flat._checks import check_positive_int

__all__ = ["hutchpp", "slq"]

MatMat = Callable[[Tensor], Tensor]


def _rademacher(n: int, k: int, g: torch.Generator, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``k`` Rademacher columns ``(n, k)``, drawn as ``k`` consecutive length-``n`` draws from ``g``."""
    bits = torch.stack([torch.randint(0, 2, (n,), dtype=torch.int64, generator=g) for _ in range(k)], dim=1)
    return (bits.to(dtype) * 2.0 - 1.0).to(device)


def hutchpp(matmat: MatMat, size: int, num_matvecs: int, *, dtype: torch.dtype, device: torch.device,
            seed: int = 0) -> tuple[float, float]:
    r"""Hutch++ estimate of $\operatorname{tr}H$ with ``num_matvecs`` products, ``(estimate, stderr)``.

    A third of the budget sketches the range ($Q = \operatorname{qr}(HS)$), a third takes
    $\operatorname{tr}(Q^\top HQ)$ exactly, a third runs Hutchinson on the complement,
    $\frac1m\sum_i g_i^\top(I - QQ^\top)H(I - QQ^\top)g_i$, whose standard error is returned (unbiased for
    any symmetric ``H``; exact once the sketch spans the range, e.g. ``num_matvecs >= 3 size``).

    Examples:
        >>> H = torch.diag(torch.arange(1.0, 7.0, dtype=torch.float64))
        >>> round(hutchpp(lambda V: H @ V, 6, 30, dtype=H.dtype, device=H.device)[0], 6)
        21.0
    """
    m = max(1, check_positive_int("num_matvecs", num_matvecs) // 3)
    g = torch.Generator(device="cpu").manual_seed(seed)
    S = _rademacher(size, m, g, dtype, device)
    Q, _ = torch.linalg.qr(matmat(S), mode="reduced")
    low = float((Q * matmat(Q)).sum())
    G = _rademacher(size, m, g, dtype, device)
    G = G - Q @ (Q.T @ G)
    samples = (G * matmat(G)).sum(0)
    stderr = float(samples.std(unbiased=True) / m ** 0.5) if m > 1 else float("nan")
    return low + float(samples.mean()), stderr


def slq(matmat: MatMat, size: int, num_probes: int, steps: int, *, dtype: torch.dtype, device: torch.device,
        seed: int = 0) -> tuple[Tensor, Tensor]:
    r"""Stochastic Lanczos quadrature of the spectral density of ``H``: ``(nodes, weights)`` with the weights summing
    to 1, so that $\sum_k w_k\theta_k^j \approx \operatorname{tr}(H^j)/p$ (exactly in expectation for
    ``j < 2 steps``).

    ``num_probes`` Lanczos runs of ``steps`` steps with full reorthogonalization advance together (one block product
    per step), each from a Rademacher vector (probe ``l`` seeded by ``seed + l``); the nodes are the eigenvalues of
    each run's tridiagonal matrix and the weights the squared first components of its eigenvectors over
    ``num_probes``. A run that breaks down (an invariant subspace) keeps its converged nodes.

    Examples:
        >>> H = torch.diag(torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64))
        >>> nodes, weights = slq(lambda V: H @ V, 3, 4, 3, dtype=H.dtype, device=H.device)
        >>> round(float((weights * nodes).sum()), 6), round(float(weights.sum()), 6)  # tr(H)/3 and 1 (exact here)
        (2.333333, 1.0)
    """
    k = check_positive_int("num_probes", num_probes)
    m = min(check_positive_int("steps", steps), size)
    V0 = torch.stack([_rademacher(size, 1, torch.Generator(device="cpu").manual_seed(seed + i), dtype, device)[:, 0]
                      for i in range(k)], dim=1)
    Qs = [V0 / V0.norm(dim=0)]
    alphas, betas = [], []
    alive = torch.ones(k, dtype=torch.bool, device=device)
    for j in range(m):
        W = matmat(Qs[j])
        a = (Qs[j] * W).sum(0)
        alphas.append(a)
        Qm = torch.stack(Qs)  # (j+1, size, k)
        for _ in range(2):  # full reorthogonalization of every run against its own basis, twice
            W = W - torch.einsum("jnk,jk->nk", Qm, torch.einsum("jnk,nk->jk", Qm, W))
        b = W.norm(dim=0)
        alive = alive & (b > 1e-10 * a.abs().clamp(min=1.0))
        if j == m - 1:
            break
        betas.append(torch.where(alive, b, torch.zeros_like(b)))
        Qs.append(torch.where(alive, W / b.clamp(min=torch.finfo(dtype).tiny), torch.zeros_like(W)))
    A = torch.stack(alphas, dim=1)  # (k, m)
    T = torch.diag_embed(A)
    if betas:
        B = torch.stack(betas, dim=1)
        T = T + torch.diag_embed(B, 1) + torch.diag_embed(B, -1)
    nodes, weights = [], []
    for i in range(k):
        n_i = len(alphas)
        if betas:  # a run that broke down after step j keeps its first j + 1 steps
            zero = (B[i] == 0).nonzero()
            n_i = int(zero[0, 0]) + 1 if zero.numel() else n_i
        theta, y = torch.linalg.eigh(T[i, :n_i, :n_i])
        nodes.append(theta)
        weights.append(y[0].square() / k)
    return torch.cat(nodes), torch.cat(weights)
