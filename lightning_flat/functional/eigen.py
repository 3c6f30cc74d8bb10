r"""Eigenvalues of symmetric operators given as products ``v -> H v`` (Hessian-vector products), and spectra.

- [`top_hessian_eigenpair`][lightning_flat.functional.top_hessian_eigenpair]: the largest algebraic eigenpair by
  warm-started Lanczos with an error bound;
- [`top_eigenpairs`][lightning_flat.functional.top_eigenpairs]: the ``k`` largest by LOBPCG, warm-started by a block;
  [`eigenvalues_above`][lightning_flat.functional.eigenvalues_above]: every eigenvalue above a level (the block grown
  until one converged eigenvalue falls below it);
- [`block_operator`][lightning_flat.functional.block_operator]: the operator of one diagonal block (one layer's
  coordinates);
- [`preconditioned_operator`][lightning_flat.functional.preconditioned_operator]: $v \mapsto s \odot H(s \odot v)$, the
  curvature an optimizer with the diagonal preconditioner $P = \mathrm{diag}(s)^{-2}$ sees;
- [`exact_density`][lightning_flat.functional.exact_density] and
  [`density_moments`][lightning_flat.functional.density_moments]: a spectral density as quadrature nodes and weights,
  and what the measuring callbacks log of it.

Operators are plain callables ``hvp(v)`` on flat vectors of length ``size``; nothing here depends on where they
come from (a closed form, ``torch.func``, hessian-eigenthings).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from lightning_flat._checks import check_positive_int

__all__ = ["top_hessian_eigenpair", "top_eigenpairs", "eigenvalues_above", "block_operator",
           "preconditioned_operator", "dense_top_eigenvalues", "exact_density", "density_moments"]

HVP = Callable[[Tensor], Tensor]


def top_hessian_eigenpair(hvp: HVP, size: int, *, dtype: torch.dtype, device: torch.device, v0: Tensor | None = None,
                          max_iter: int = 100, tol: float = 1e-10, max_restarts: int = 10,
                          seed: int = 0) -> tuple[Tensor, Tensor, int]:
    r"""Largest algebraic eigenpair of a symmetric operator ``hvp`` by Lanczos with early stopping and warm start.

    Lanczos with full reorthogonalization from ``v0`` (or a seeded random start, drawn from its own generator so
    global random state is untouched), stopping as soon as the bound on the eigenvalue's error,
    $\min(r, r^2/\delta)$ with the Ritz residual $r = \beta_j |s_j|$ and the Ritz gap
    $\delta = \theta_1 - \theta_2$ (Kato-Temple; used once $\delta > r$), is at most
    $\mathrm{tol}\cdot\max(|\theta|, 1)$; if ``max_iter`` steps do not reach it, it restarts from the Ritz
    vector (up to ``max_restarts`` times). ``tol`` is thus the relative accuracy of the eigenvalue. Started from the
    previous top eigenvector, a read during training converges in a few products. (hessian-eigenthings' ``lanczos``
    always runs its full Krylov dimension and takes no start vector, hence this small loop.)

    Returns ``(eigenvalue, eigenvector, number_of_hvps)``; the eigenvalue is NaN when a product is not finite (a
    diverged point), without calling the eigen-solver on it.
    """
    if v0 is None:
        g = torch.Generator().manual_seed(seed)
        v0 = torch.randn(size, generator=g, dtype=torch.float64)
    v = v0.to(device=device, dtype=dtype).reshape(-1)
    if v.numel() != size:
        raise ValueError(f"v0 must have {size} entries, got {v.numel()}")
    m = min(max_iter, size)
    hvps = 0
    theta = torch.tensor(float("nan"), dtype=dtype, device=device)
    for _ in range(max_restarts + 1):
        nrm = v.norm()
        if float(nrm) == 0.0:
            raise ValueError("the Lanczos start vector is zero")
        Q = [v / nrm]
        alphas: list[float] = []
        betas: list[float] = []
        converged = False
        for j in range(m):
            w = hvp(Q[j]).reshape(-1)
            hvps += 1
            if not bool(torch.isfinite(w).all()):  # a diverged point: no eigen-solver call on it
                return torch.tensor(float("nan"), dtype=dtype, device=device), v, hvps
            alphas.append(float(Q[j] @ w))
            Qm = torch.stack(Q)
            for _ in range(2):  # full reorthogonalization, twice is enough
                w = w - Qm.T @ (Qm @ w)
            beta = float(w.norm())
            T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
            if j > 0:
                off = torch.tensor(betas, dtype=torch.float64)
                T = T + torch.diag(off, 1) + torch.diag(off, -1)
            evals, evecs = torch.linalg.eigh(T)
            theta_f, s = float(evals[-1]), evecs[:, -1]
            residual = beta * abs(float(s[-1]))  # ||H y - theta y|| of the Ritz pair
            # eigenvalue error bound: the residual, or residual^2 / gap once the Ritz values show a gap
            error = residual
            if j > 0 and float(evals[-1] - evals[-2]) > residual:
                error = min(residual, residual * residual / float(evals[-1] - evals[-2]))
            if error <= tol * max(abs(theta_f), 1.0) or beta <= 1e-300 or j == size - 1:
                converged = True
                break
            if j < m - 1:
                betas.append(beta)
                Q.append(w / beta)
        v = torch.stack(Q).T @ s.to(dtype=dtype, device=device)
        v = v / v.norm()
        theta = torch.tensor(theta_f, dtype=dtype, device=device)
        if converged:
            break
    return theta, v, hvps


def _orthonormal(S: Tensor, rtol: float = 1e-10) -> Tensor:
    """An orthonormal basis of the columns of ``S`` (QR, dropping directions below ``rtol`` of the largest)."""
    Q, Rm = torch.linalg.qr(S)
    d = Rm.diagonal().abs()
    keep = d > rtol * (float(d.max()) if d.numel() else 1.0)
    return Q[:, keep]


def top_eigenpairs(hvp: HVP, size: int, k: int, *, dtype: torch.dtype, device: torch.device, X0: Tensor | None = None,
                   tol: float = 1e-8, max_iter: int = 300, seed: int = 0, nconv: int | None = None,
                   above: float | None = None, blocks: bool = False) -> tuple[Tensor, Tensor, int]:
    r"""The ``k`` largest algebraic eigenpairs of a symmetric operator ``hvp`` by LOBPCG (Knyazev 2001): Rayleigh-Ritz
    on the block $[X, R, P]$ of the current vectors, their residuals and the previous step's directions, until
    the residuals of the leading ``nconv`` (default ``k``) satisfy $\|Hx - \theta x\| \le
    \mathrm{tol}\cdot\max(|\theta|, 1)$ (the eigenvalue's error is about the residual squared over the gap; the
    trailing vectors are guards that speed up convergence); with ``above``, only those above that level and the
    first one below it. ``X0`` (e.g. the previous read's eigenvectors)
    warm-starts it, so a read during training converges in a few blocks. With ``blocks``, ``hvp`` multiplies a block
    ``(size, m)`` at once (batched products). Returns
    ``(eigenvalues (k,) descending, eigenvectors (size, k), hvps)``."""
    k = min(check_positive_int("k", k), size)
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(size, k, generator=g, dtype=dtype).to(device)
    if X0 is not None and X0.numel():
        m = min(k, X0.shape[1])
        X[:, :m] = X0[:, :m].to(dtype=dtype, device=device)
    hvps = 0

    def apply(V: Tensor) -> Tensor:
        nonlocal hvps
        hvps += V.shape[1]
        return hvp(V) if blocks else torch.stack([hvp(V[:, j]) for j in range(V.shape[1])], dim=1)

    X = _orthonormal(X)
    AX = apply(X)
    P = None
    theta = torch.zeros(k, dtype=dtype, device=device)
    for _ in range(max_iter):
        T = X.T @ AX
        theta, Q = torch.linalg.eigh(0.5 * (T + T.T))
        theta, Q = theta.flip(0)[:k], Q.flip(1)[:, :k]
        X, AX = X @ Q, AX @ Q
        R = AX - X * theta
        n = k if nconv is None else min(nconv, k)
        if above is not None:  # only the pairs above the level, and the first one below it, must converge
            n = min(n, int((theta > above).sum()) + 1)
        if X.shape[1] == k and bool((R.norm(dim=0) <= tol * theta.abs().clamp(min=1.0))[:n].all()):
            break
        # unit columns before the QR: converged residuals are tiny, and unscaled they would lose the basis accuracy
        unit = lambda B: B / B.norm(dim=0).clamp(min=torch.finfo(B.dtype).tiny)  # noqa: E731
        blocks = [X, unit(R)] + ([unit(P)] if P is not None else [])
        S = _orthonormal(torch.cat(blocks, dim=1), rtol=1e-8)
        AS = apply(S)
        T = S.T @ AS
        vals, Q = torch.linalg.eigh(0.5 * (T + T.T))
        Q = Q.flip(1)[:, :k]
        Xn, AXn = S @ Q, AS @ Q
        P = Xn - X @ (X.T @ Xn)
        X, AX = Xn, AXn
    return theta, X, hvps


def eigenvalues_above(hvp: HVP, size: int, level: float, *, dtype: torch.dtype, device: torch.device,
                      X0: Tensor | None = None, tol: float = 1e-8, seed: int = 0,
                      blocks: bool = False) -> tuple[list[float], Tensor, int]:
    r"""Every eigenvalue of ``hvp`` above ``level`` (descending), by
    [`top_eigenpairs`][lightning_flat.functional.top_eigenpairs] on a block of ``k`` vectors (at least 3, or the columns
    of ``X0``, e.g. the previous read's vectors), doubled while all ``k - 2`` leading converged eigenvalues are above
    the level (the last two vectors are guards that speed up convergence). The residual bound is $\sqrt{\mathrm{tol}}$,
    which gives eigenvalues to about ``tol`` (the error is about the squared residual over the gap). ``blocks``: ``hvp``
    multiplies blocks ``(size, m)``.

    Returns ``(eigenvalues above level, vectors (size, found + 2) to warm-start the next read, hvps)``.
    """
    k = min(size, max(3, X0.shape[1] if X0 is not None else 0))
    hvps = 0
    while True:
        theta, X, n = top_eigenpairs(hvp, size, k, dtype=dtype, device=device, X0=X0, tol=tol ** 0.5, seed=seed,
                                     nconv=max(1, k - 2), above=level, blocks=blocks)
        hvps += n
        if float(theta[max(0, k - 3)]) <= level or k >= size:  # a converged one is below: all found
            break
        X0, k = X, min(size, 2 * k)  # all k above: look further, from what was found
    above = [float(t) for t in theta if float(t) > level]
    return above, X[:, :len(above) + 2].detach(), hvps


def block_operator(hvp: HVP, sizes: Sequence[int], j: int) -> HVP:
    """``v_j -> (H [0, .., v_j, .., 0])_j``: the operator of the ``j``-th diagonal block of ``hvp``, whose flat
    coordinates are the blocks of ``sizes`` in order."""
    start = sum(sizes[:j])
    total = sum(sizes)

    def block(v: Tensor) -> Tensor:
        full = v.new_zeros(total)
        full[start:start + sizes[j]] = v
        return hvp(full)[start:start + sizes[j]]

    return block


def preconditioned_operator(hvp: HVP, scales: Tensor) -> HVP:
    r"""$v \mapsto s \odot H(s \odot v)$ for ``scales`` $s = P^{-1/2}$ (a flat vector): the operator
    $P^{-1/2}HP^{-1/2}$ whose top eigenvalue is the sharpness that a step preconditioned by ``P`` sees (Adam:
    $P = \sqrt{\hat v} + \epsilon$)."""
    return lambda v: scales * hvp(scales * v)


def dense_top_eigenvalues(H: Tensor, k: int = 1) -> Tensor:
    """The ``k`` largest eigenvalues (descending) of symmetric ``H (..., p, p)``, shape ``(..., k)``; NaN for a matrix
    that is not finite (a diverged point), without calling the eigen-solver on it.

    Examples:
        >>> dense_top_eigenvalues(torch.diag(torch.tensor([1.0, 3.0, 2.0])), k=2)
        tensor([3., 2.])
    """
    k = min(check_positive_int("k", k), H.shape[-1])
    flat = H.reshape(-1, *H.shape[-2:])
    out = torch.full((flat.shape[0], k), float("nan"), dtype=H.dtype, device=H.device)
    ok = torch.isfinite(flat).flatten(1).all(1)
    if bool(ok.any()):
        out[ok] = torch.linalg.eigvalsh(flat[ok])[:, -k:].flip(-1)
    return out.reshape(*H.shape[:-2], k)


def exact_density(H: Tensor) -> tuple[Tensor, Tensor]:
    """The spectral density of a dense symmetric ``H (p, p)``: its eigenvalues, each with weight ``1/p``. A
    non-finite ``H`` gives one NaN node (no eigen-solver call on it)."""
    if not bool(torch.isfinite(H).all()):
        return torch.full((1,), float("nan"), dtype=H.dtype, device=H.device), torch.ones(1, dtype=H.dtype)
    nodes = torch.linalg.eigvalsh(0.5 * (H + H.transpose(-1, -2)))
    return nodes, torch.full_like(nodes, 1.0 / nodes.numel())


def density_moments(nodes: Tensor, weights: Tensor) -> dict[str, float]:
    r"""Summary of a density given by quadrature ``nodes`` and ``weights`` (summing to 1): ``max`` and ``min`` (the
    extreme nodes), ``mean`` ($\sum_k w_k\theta_k$, $\operatorname{tr}H/p$ for a Hessian's density),
    ``second_moment`` ($\sum_k w_k\theta_k^2$, $\operatorname{tr}H^2/p$) and ``negative_mass`` (the weight
    of the negative nodes).

    Examples:
        >>> density_moments(torch.tensor([-1.0, 1.0, 3.0]), torch.tensor([0.25, 0.25, 0.5]))["mean"]
        1.5
    """
    return {"max": float(nodes.max()), "min": float(nodes.min()), "mean": float((weights * nodes).sum()),
            "second_moment": float((weights * nodes.square()).sum()),
            "negative_mass": float(weights[nodes < 0].sum())}
