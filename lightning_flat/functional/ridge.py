r"""Deep linear networks with an L2 ridge (weight decay): the objective seen through the end-to-end matrix.

With ridge as weight decay (``W <- W - lr (grad + ridge W)``), training minimises
$J(\theta) = L(E) + \frac{\mathrm{ridge}}2\sum_j\|W_j\|_F^2$ over the factors of $E = W_L\cdots W_1$. The
smallest $\sum_j\|W_j\|_F^2$ over the factorisations of one $E$ is its representation cost
$L\sum_i s_i(E)^{2/L}$ ([`representation_cost`][lightning_flat.functional.representation_cost], attained by the balanced
factors of [`balanced_factors`][lightning_flat.functional.balanced_factors]), so the minima of $J$ over $\theta$ are
those of

$$
J(E) = L(E) + \frac{\mathrm{ridge}}2\,L\sum_i s_i(E)^{2/L}
$$

over $E$, local minimum for local minimum. For $L > 2$ the penalty is a Schatten quasi-norm, which
pulls small singular values to zero: each rank has its own local minima.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_flat._checks import check_positive_int, check_real
from lightning_flat.functional.curvature import measurement_loss
from lightning_flat.functional.spectral import representation_cost, singular_values
from lightning_flat.measurements import Measurements

__all__ = ["ridge_objective", "balanced_factors", "ridge_critical_residuals", "ridge_local_minimum",
           "factored_second_order_check"]


def ridge_objective(E: Tensor, measurements: Measurements, targets: Tensor, ridge: float, depth: int) -> Tensor:
    r"""$J(E) = L(E) + \frac{\mathrm{ridge}}2 L\sum_i s_i(E)^{2/L}$, shape ``(...)``, with ``L(E)`` the library
    loss $\frac1n\sum_i(\langle A_i, E\rangle - b_i)^2$. The minimum of the weight-decayed training objective
    over the factorisations of ``E``."""
    ridge = check_real("ridge", ridge, low=0.0)
    return measurement_loss(E, measurements, targets) + 0.5 * ridge * representation_cost(E, depth)


def balanced_factors(E: Tensor, dims: list[int]) -> list[Tensor]:
    r"""Factors $W_j = U_j S^{1/L} U_{j-1}^\top$ of ``E (d_L, d_0)`` with $E = USV^\top$, $U_0 = V$,
    $U_L = U$ and the first ``r`` coordinate vectors as $U_j$ in between (``r`` = the number of singular
    values, every hidden width must be at least ``r``): the factorisation whose $\sum_j\|W_j\|_F^2$ equals the
    representation cost. ``dims = [d_0, ..., d_L]``."""
    if len(dims) < 2 or tuple(E.shape[-2:]) != (dims[-1], dims[0]):
        raise ValueError(f"dims must be [d_in, ..., d_out] with d_out x d_in = {tuple(E.shape[-2:])}, got {dims}")
    U, S, Vh = torch.linalg.svd(E, full_matrices=False)
    r, L = S.shape[-1], len(dims) - 1
    if any(d < r for d in dims[1:-1]):
        raise ValueError(f"every hidden width must be >= {r} (the number of singular values), got dims {dims}")
    bases = [Vh.transpose(-2, -1)] + [torch.eye(d, r, dtype=E.dtype, device=E.device) for d in dims[1:-1]] + [U]
    root = torch.diag_embed(S.pow(1.0 / L))
    return [bases[j + 1] @ root @ bases[j].transpose(-2, -1) for j in range(L)]


def ridge_critical_residuals(weights: list[Tensor], measurements: Measurements, targets: Tensor, ridge: float,
                             rank_tol: float = 1e-8) -> dict[str, float]:
    r"""How far factors ``W_1..W_L`` (no batch dimension) are from a critical point of the weight-decayed objective,
    through the conditions every critical point with ``ridge > 0`` satisfies:

    - ``balance``: $\max_j\|W_{j+1}^\top W_{j+1} - W_jW_j^\top\|_F$ (zero);
    - ``layer_singular_values``: $\max_{j,i}|s_i(W_j) - s_i(E)^{1/L}|$ over the nonzero $s_i(E)$, and the
      other singular values of each $W_j$ (zero);
    - ``cost_gap``: $\sum_j\|W_j\|_F^2 - L\sum_i s_i(E)^{2/L}$ (zero: the representation cost is attained);
    - ``stationarity``: the largest entry of $U^\top\nabla L(E)V + \mathrm{ridge}\cdot
      \mathrm{diag}(s_i^{(2-L)/L})$ on the nonzero singular values (``U``, ``V`` their singular vectors), off-diagonal
      entries included, with $\nabla L(E) = \frac2n\mathcal A^*(\mathcal A(E) - b)$.

    Singular values below ``rank_tol`` times the largest count as zero. Each value is relative to nothing (absolute).
    """
    check_real("rank_tol", rank_tol, low=0.0)
    L = len(weights)
    E = weights[0]
    for W in weights[1:]:
        E = W @ E
    U, S, Vh = torch.linalg.svd(E, full_matrices=False)
    k = int((S > rank_tol * S[0]).sum()) if S.numel() and float(S[0]) > 0 else 0
    balance = max((float(torch.linalg.matrix_norm(weights[j + 1].T @ weights[j + 1] - weights[j] @ weights[j].T))
                   for j in range(L - 1)), default=0.0)
    layer = 0.0
    for W in weights:
        s = singular_values(W)
        want = torch.zeros_like(s)
        want[:k] = S[:k].pow(1.0 / L)
        layer = max(layer, float((s - want).abs().max()))
    cost_gap = float(sum(W.square().sum() for W in weights) - L * S[:k].pow(2.0 / L).sum())
    residual = measurements(E) - targets.to(E)
    G = (2.0 / len(measurements)) * measurements.adjoint(residual)
    M = U[:, :k].T @ G @ Vh[:k].T + ridge * torch.diag(S[:k].pow((2.0 - L) / L))
    stationarity = float(M.abs().max()) if k else 0.0
    return {"balance": balance, "layer_singular_values": layer, "cost_gap": cost_gap, "stationarity": stationarity,
            "rank": k}


def _balanced_rank_factors(E: Tensor, rank: int, depth: int) -> list[Tensor]:
    r"""Balanced factors of the rank-``rank`` truncation of ``E`` through hidden layers of width ``rank``:
    $W_1 = S^{1/L}V_r^\top$, $W_j = S^{1/L}$ in between, $W_L = U_rS^{1/L}$ (``depth = 1``: ``E``)."""
    if depth == 1:
        return [E]
    U, S, Vh = torch.linalg.svd(E, full_matrices=False)
    root = S[:rank].pow(1.0 / depth)
    return ([root[:, None] * Vh[:rank]] + [torch.diag(root) for _ in range(depth - 2)]
            + [U[:, :rank] * root])


def factored_second_order_check(E: Tensor, measurements: Measurements, targets: Tensor, ridge: float, depth: int,
                                rank: int) -> tuple[float, float]:
    r"""``(gradient, lowest_eigenvalue)`` of the weight-decayed training objective
    $J(\theta) = L(W_L\cdots W_1) + \frac{\mathrm{ridge}}2\sum_j\|W_j\|_F^2$ at the balanced factors of
    ``E`` (`_balanced_rank_factors`, hidden widths ``rank``): the largest gradient entry and the lowest eigenvalue
    of the Hessian relative to its largest magnitude (``nan`` for both where they are not finite).

    $J(\theta)$ is a polynomial in the factors, so both exist at every point, unlike the derivatives of
    $J(E)$ ([`ridge_objective`][lightning_flat.functional.ridge_objective]), whose $s^{2/L}$ is not differentiable where
    a singular value is zero, and whose second derivatives through the SVD are not defined where two singular values
    meet. Since $J(\theta) \ge J(E(\theta))$ with equality at balanced factors, a local minimum of $J(E)$ among the
    matrices of rank at most ``rank`` is a local minimum of $J(\theta)$ there (gradient zero, Hessian positive
    semi-definite; the rotations of the hidden layers are flat directions), and a saddle of $J(E)$ with distinct
    singular values shows a negative eigenvalue."""
    weights = [W.detach() for W in _balanced_rank_factors(E.to(torch.float64), rank, depth)]
    shapes = [W.shape for W in weights]
    meas = measurements.to(dtype=torch.float64)
    b = targets.to(torch.float64)

    def objective(theta: Tensor) -> Tensor:
        Ws, k = [], 0
        for shape in shapes:
            n = shape[0] * shape[1]
            Ws.append(theta[k:k + n].reshape(shape))
            k += n
        out = Ws[0]
        for W in Ws[1:]:
            out = W @ out
        return measurement_loss(out, meas, b) + 0.5 * ridge * theta.square().sum()

    theta = torch.cat([W.reshape(-1) for W in weights])
    grad = torch.func.grad(objective)(theta)
    H = torch.func.hessian(objective)(theta)
    if not (bool(torch.isfinite(grad).all()) and bool(torch.isfinite(H).all())):
        return float("nan"), float("nan")
    eig = torch.linalg.eigvalsh(0.5 * (H + H.T))
    scale = float(eig.abs().max())
    return float(grad.abs().max()), float(eig[0]) / scale if scale > 0 else 0.0


def _core_penalty(A: Tensor, B: Tensor, depth: int) -> Tensor:
    r"""$\sum_i s_i(AB^\top)^{2/L}$ over the ``r`` singular values of $AB^\top$ that can be nonzero
    (``A (d_out, r)``, ``B (d_in, r)``): the eigenvalues of the ``r x r`` matrix $C^\top B^\top B C$ with
    $A^\top A = CC^\top$ (Cholesky) are the $s_i^2$. Differentiable wherever ``A`` and ``B`` have full
    column rank, whereas the SVD of the ``d_out x d_in`` product meets the zero singular values beyond ``r``, where
    $s^{2/L}$ has no derivative. NaN where ``A`` has not full column rank."""
    C, info = torch.linalg.cholesky_ex(A.T @ A)
    if int(info) != 0:
        return torch.full((), float("nan"), dtype=A.dtype)
    M = C.T @ (B.T @ B) @ C
    return torch.linalg.eigvalsh(0.5 * (M + M.T)).clamp(min=0.0).pow(1.0 / depth).sum()


def ridge_local_minimum(measurements: Measurements, targets: Tensor, ridge: float, depth: int, rank: int,
                        starts: list[Tensor] | None = None, restarts: int = 20, seed: int = 0,
                        gtol: float = 1e-12) -> tuple[Tensor, float] | None:
    r"""The lowest local minimum of rank exactly ``rank`` of $J(E)$
    ([`ridge_objective`][lightning_flat.functional.ridge_objective]) found by multi-start BFGS (scipy) in float64,
    ``(E, J)``, or ``None`` when every start ends at another rank.

    Full rank searches over ``E`` itself; a lower rank ``r`` over $E = AB^\top$ with ``A (d_out, r)``,
    ``B (d_in, r)``, its penalty computed from the ``r`` singular values that can be nonzero
    (`_core_penalty`). Starts: the given matrices (e.g. guesses near the expected minimum) and ``restarts``
    random ones.

    Where $J(E)$ is not smooth: $s^{2/L}$ has no derivative at $s = 0$ (``L >= 2``), so the search
    is smooth only while the ``r`` singular values it keeps are positive, and second derivatives through an SVD are
    not defined where two singular values meet. A start or an end point where the objective or its gradient is not
    finite is skipped (the other starts go on). A result counts as rank ``r`` when its ``r``-th singular value exceeds
    ``1e-6`` times the first and the next one does not, and as a local minimum by the first- and second-order
    conditions of the factored objective $J(\theta)$ at its balanced factors
    ([`factored_second_order_check`][lightning_flat.functional.factored_second_order_check]), which is a polynomial, so
    the verdict does not depend on where BFGS happened to stop: the gradient at most ``max(100 gtol, 1e-8) max(1, s_1)``
    and the lowest Hessian eigenvalue above ``-1e-6`` times the largest (a stall on the way to a lower rank or a saddle
    is not returned).
    """
    import numpy as np
    from scipy.optimize import minimize

    depth = check_positive_int("depth", depth)
    rank = check_positive_int("rank", rank)
    ridge = check_real("ridge", ridge, low=0.0)
    d_out, d_in = measurements.shape
    if rank > min(d_out, d_in):
        raise ValueError(f"rank must be <= {min(d_out, d_in)}, got {rank}")
    meas = measurements.to(dtype=torch.float64)
    b = targets.to(torch.float64)
    full = rank == min(d_out, d_in)
    g = torch.Generator().manual_seed(seed)
    scale = float(b.abs().max()) if b.numel() else 1.0

    def factors(x: Tensor) -> tuple[Tensor, Tensor]:
        return x[:d_out * rank].reshape(d_out, rank), x[d_out * rank:].reshape(d_in, rank)

    def to_matrix(x: Tensor) -> Tensor:
        if full:
            return x.reshape(d_out, d_in)
        A, B = factors(x)
        return A @ B.T

    def J_of(t: Tensor) -> Tensor:
        if full:
            return ridge_objective(to_matrix(t), meas, b, ridge, depth)
        A, B = factors(t)
        return measurement_loss(A @ B.T, meas, b) + 0.5 * ridge * depth * _core_penalty(A, B, depth)

    def f(x):
        t = torch.tensor(x, dtype=torch.float64, requires_grad=True)
        J = J_of(t)
        if not bool(torch.isfinite(J)):
            return float("inf"), np.zeros_like(x)  # BFGS's line search backs off from a non-finite point
        (grad,) = torch.autograd.grad(J, t)
        return float(J.detach()), grad.numpy().copy()

    x0s = []
    for E0 in starts or []:
        E0 = E0.to(torch.float64)
        if full:
            x0s.append(E0.reshape(-1))
        else:
            U, S, Vh = torch.linalg.svd(E0)
            root = S[:rank].sqrt()
            x0s.append(torch.cat([(U[:, :rank] * root).reshape(-1), (Vh[:rank].T * root).reshape(-1)]))
    n_params = d_out * d_in if full else (d_out + d_in) * rank
    x0s += [scale * torch.randn(n_params, generator=g, dtype=torch.float64) for _ in range(restarts)]
    best = None
    for x0 in x0s:
        J0, g0 = f(x0.numpy())
        if not (np.isfinite(J0) and np.isfinite(g0).all()):
            continue  # the objective is not differentiable at this start (e.g. a zero singular value)
        with np.errstate(all="ignore"):
            res = minimize(f, x0.numpy(), jac=True, method="BFGS", options={"gtol": gtol, "maxiter": 20000})
        if not (np.isfinite(res.x).all() and np.isfinite(res.fun)):
            continue
        E = to_matrix(torch.tensor(res.x, dtype=torch.float64)).detach()
        s = torch.linalg.svdvals(E)
        if float(s[0]) <= 0 or float(s[rank - 1]) <= 1e-6 * float(s[0]) or \
                (rank < len(s) and float(s[rank]) > 1e-6 * float(s[0])):
            continue
        # a local minimum, not a stall on the way to a lower rank or a saddle: first- and second-order conditions of
        # the factored objective, a polynomial (defined wherever BFGS stopped); its gradient is the E-gradient pulled
        # back through factors of size s_1^((L-1)/L) <= max(1, s_1)
        grad, lowest = factored_second_order_check(E, meas, b, ridge, depth, rank)
        if not grad <= max(100 * gtol, 1e-8) * max(1.0, float(s[0])) or not lowest >= -1e-6:
            continue
        if best is None or res.fun < best[1]:
            best = (E, float(res.fun))
    return best
