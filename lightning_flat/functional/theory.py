r"""Closed forms from the theory of flat minima of deep matrix factorization (library normalization).

Every constant here is for the library loss $L = \frac1n\sum_i(\langle A_i,E\rangle - b_i)^2$ (no 1/2) and the
library trace $\operatorname{tr}_{lib} = \operatorname{tr}\nabla^2 L$. From their Sec. 4 on, Gatmiry et al.
write constants for a loss with $\frac1{2n}$, which is half of ours: ``F_lib = 2 F_paper``.

References:
    Gatmiry, Li, Chuang, Reddi, Ma, Jegelka (2023), "What is the inductive bias of flatness regularization? A study
    of deep matrix factorization models", Lemma 3, Lemma 4, Thm 1, Thm 4, Thm 5, Thm 7, eq. 35.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_flat._checks import check_positive_int, check_tensor
from lightning_flat.functional.spectral import nuclear_norm
from lightning_flat.measurements import Measurements

__all__ = [
    "predicted_min_trace",
    "min_trace_surrogate",
    "flattest_factorization",
    "psd_sqrt",
    "measurement_covariances",
    "depth2_min_trace",
    "depth2_flattest_factorization",
    "min_frobenius_interpolant",
    "lemma3_ratio",
    "n1_min_trace",
    "fiber_stationarity_residual",
    "min_trace_on_fiber",
]


def predicted_min_trace(M: Tensor, depth: int) -> Tensor:
    r"""Predicted minimum Hessian trace over factorizations of ``M (..., d_L, d_0)`` (Gatmiry et al. Thm 1, Lemma 4):

    $$
    \hat F_L(M) = 2L\,(d_0 d_L)^{1/L}\,\|M\|_*^{2 - 2/L}
    $$

    Exact for an isometric design ($\frac1n\sum_i\langle A_i,X\rangle^2 = \|X\|_F^2$ scaled so that
    $\operatorname{tr}_{lib} = 2R$), and within $1\pm\delta$ under RIP. Equals ``2 * min_trace_surrogate``.
    """
    return 2.0 * min_trace_surrogate(M, depth)


def min_trace_surrogate(M: Tensor, depth: int) -> Tensor:
    r"""$\min_{E(W)=M} R(W) = L\,(d_0 d_L)^{1/L}\,\|M\|_*^{2(L-1)/L}$ (Lemma 4), ``R`` the trace surrogate."""
    check_tensor("M", M, min_ndim=2, floating=True)
    L = check_positive_int("depth", depth)
    d_L, d_0 = M.shape[-2:]
    return L * (d_0 * d_L) ** (1.0 / L) * nuclear_norm(M).pow(2.0 - 2.0 / L)


def _rank(s: Tensor, tol: float | None) -> int:
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 0
    tol = s.shape[-1] * torch.finfo(s.dtype).eps if tol is None else tol
    return int((s > tol * s[0]).sum())


def _orthonormal_columns(d: int, k: int, generator: torch.Generator | None, like: Tensor) -> Tensor:
    if generator is None:
        return torch.eye(d, k, dtype=like.dtype, device=like.device)
    Z = torch.randn(d, k, generator=generator, dtype=torch.float64)
    return torch.linalg.qr(Z).Q.to(dtype=like.dtype, device=like.device)


def flattest_factorization(M: Tensor, dims: Sequence[int], *, generator: torch.Generator | None = None,
                           tol: float | None = None) -> list[Tensor]:
    r"""A minimizer of the trace surrogate $R(W)$ over factorizations $W_L\cdots W_1 = M$ (Lemma 4).

    ``M`` has shape ``(d_L, d_0)`` and ``dims = [d_0, ..., d_L]``; every hidden width must be at least ``rank M``.
    With the compact SVD $M = U\Lambda V^\top$ (rank k), ``Q_i (d_i, k)`` with orthonormal columns
    (the first k unit vectors, or random ones from ``generator``), $\alpha' = (d_L/d_0)^{1/4}$ and
    $\alpha = (\|M\|_*/\sqrt{d_0 d_L})^{1/L}$:

    $$
    W_1 = \alpha'^{-1}\alpha^{-(L-2)/2} Q_1\Lambda^{1/2}V^\top,\quad W_i = \alpha Q_i Q_{i-1}^\top,\quad
    W_L = \alpha'\alpha^{-(L-2)/2} U\Lambda^{1/2}Q_{L-1}^\top.
    $$

    These are the *corrected* constants: the printed $(d_L/d_0)^{1/2}$ and $(\|M\|_*/(d_0d_L))^{1/L}$ do
    not attain the bound unless ``L = 2`` and ``d_0 = d_L``. At the minimizer all ``L`` terms
    $\|P_j\|_F^2\|S_j\|_F^2$ are equal.
    """
    check_tensor("M", M, ndim=2, floating=True)
    dims = [check_positive_int(f"dims[{i}]", d) for i, d in enumerate(dims)]
    L = len(dims) - 1
    if L < 1:
        raise ValueError(f"dims must list at least [d_0, d_1], got {dims}")
    if (dims[-1], dims[0]) != tuple(M.shape):
        raise ValueError(f"M has shape {tuple(M.shape)} but dims give (d_L, d_0) = ({dims[-1]}, {dims[0]})")
    if L == 1:
        return [M.clone()]
    U, s, Vh = torch.linalg.svd(M, full_matrices=False)
    k = _rank(s, tol)
    if k == 0:
        return [M.new_zeros(dims[j + 1], dims[j]) for j in range(L)]
    if min(dims[1:-1]) < k:
        raise ValueError(f"every hidden width must be >= rank M = {k}, got dims {dims}")
    U, s, Vh = U[:, :k], s[:k], Vh[:k]
    d_0, d_L = dims[0], dims[-1]
    a_prime = (d_L / d_0) ** 0.25
    alpha = (float(s.sum()) / (d_0 * d_L) ** 0.5) ** (1.0 / L)
    Q = [_orthonormal_columns(dims[i], k, generator, M) for i in range(1, L)]
    root = s.sqrt()
    end = alpha ** (-(L - 2) / 2)
    W = [(end / a_prime) * (Q[0] * root) @ Vh]
    for i in range(1, L - 1):
        W.append(alpha * Q[i] @ Q[i - 1].T)
    W.append((a_prime * end) * (U * root) @ Q[-1].T)
    return W


def psd_sqrt(C: Tensor, inverse: bool = False) -> Tensor:
    """Symmetric square root (or inverse square root) of a symmetric PSD matrix, by ``eigh``."""
    evals, evecs = torch.linalg.eigh(C)
    evals = evals.clamp(min=0.0)
    root = evals.rsqrt() if inverse else evals.sqrt()
    return (evecs * root) @ evecs.transpose(-1, -2)


def measurement_covariances(measurements: Measurements) -> tuple[Tensor, Tensor]:
    r"""``(C1, C2)`` with $C_1 = \frac1n\sum_i A_iA_i^\top$ (``d_out x d_out``) and
    $C_2 = \frac1n\sum_i A_i^\top A_i$ (``d_in x d_in``)."""
    S1, S2 = measurements.second_moments()
    n = len(measurements)
    return S1 / n, S2 / n


def depth2_min_trace(M: Tensor, measurements: Measurements) -> Tensor:
    r"""Minimum Hessian trace over depth-2 factorizations $W_2W_1 = M$ for any measurements (Thm 5):

    $$
    F_{lib}(M) = 4\,\|B_1 M B_2\|_*,\quad B_1 = (\tfrac1n\textstyle\sum_i A_iA_i^\top)^{1/2},\;
    B_2 = (\tfrac1n\textstyle\sum_i A_i^\top A_i)^{1/2}
    $$

    (the paper's $2\|B_1MB_2\|_*$ is for a loss with 1/(2n)).
    """
    C1, C2 = measurement_covariances(measurements)
    return 4.0 * nuclear_norm(psd_sqrt(C1) @ M @ psd_sqrt(C2))


def depth2_flattest_factorization(M: Tensor, measurements: Measurements, width: int) -> list[Tensor]:
    r"""The depth-2 minimizer of Thm 5: with $B_1MB_2 = U\Lambda V^\top$ and ``Q (width, k)`` orthonormal,
    $W_2 = B_1^{-1}U\Lambda^{1/2}Q^\top$, $W_1 = Q\Lambda^{1/2}V^\top B_2^{-1}$ (``B_1``, ``B_2`` invertible)."""
    width = check_positive_int("width", width)
    C1, C2 = measurement_covariances(measurements)
    B1, B2 = psd_sqrt(C1), psd_sqrt(C2)
    U, s, Vh = torch.linalg.svd(B1 @ M @ B2, full_matrices=False)
    k = _rank(s, None)
    if width < k:
        raise ValueError(f"width must be >= rank M = {k}, got {width}")
    U, s, Vh = U[:, :k], s[:k], Vh[:k]
    Q = torch.eye(width, k, dtype=M.dtype, device=M.device)
    root = s.sqrt()
    W2 = psd_sqrt(C1, inverse=True) @ (U * root) @ Q.T
    W1 = (Q * root) @ Vh @ psd_sqrt(C2, inverse=True)
    return [W1, W2]


def min_frobenius_interpolant(measurements: Measurements, targets: Tensor) -> Tensor:
    r"""Minimum Frobenius-norm solution of $\langle A_i, X\rangle = b_i$, shape ``(d_out, d_in)``.

    $\tilde M = \sum_i c_iA_i$ with $c = K^{+}b$, $K_{ij} = \langle A_i, A_j\rangle$. For Gaussian
    measurements, $\mathbb E\|\tilde M - M^*\|_F^2 = (1 - \min(n, d_0d_L)/(d_0d_L))\|M^*\|_F^2$ (Thm 4).
    """
    check_tensor("targets", targets, ndim=1, floating=True)
    if targets.shape[0] != len(measurements):
        raise ValueError(f"targets must have length {len(measurements)}, got {targets.shape[0]}")
    A2 = measurements.dense().reshape(len(measurements), -1).to(torch.float64).cpu()
    x = torch.linalg.lstsq(A2, targets.to(torch.float64).cpu().unsqueeze(-1), driver="gelsd").solution.squeeze(-1)
    return x.reshape(measurements.shape).to(dtype=targets.dtype, device=targets.device)




def lemma3_ratio(weights: Sequence[Tensor], measurements: Measurements) -> Tensor:
    r"""Gatmiry et al.'s Lemma 3 ratio $\operatorname{tr}_{lib}(W) / (2R(W))$: within $1\pm\delta$ for
    measurements with RIP constant $\delta$, exactly 1 in expectation for Gaussian ones."""
    from lightning_flat.functional.curvature import hessian_trace, trace_surrogate

    return hessian_trace(weights, measurements) / (2.0 * trace_surrogate(weights))


def n1_min_trace(A: Tensor, M: Tensor, depth: int) -> Tensor:
    r"""Minimum Hessian trace over depth-``L`` factorizations of ``M`` for one measurement ``A`` (Thm 7, n = 1):

    $$
    F_{lib}(M) = 2L\,\|(A^\top M)^{L-1}A^\top\|_{S_{2/L}}^{2/L}
    $$

    with ``A``, ``M`` of shape ``(d_L, d_0)``; $(A^\top M)^{L-1}A^\top$ is ``d_0 x d_L`` (not the PSD-only form
    of their eq. 38). For ``A = I`` and symmetric ``M``: $2L\sum_k|\lambda_k|^{2(L-1)/L}$.
    """
    check_tensor("A", A, ndim=2, floating=True)
    check_tensor("M", M, ndim=2, floating=True)
    if A.shape != M.shape:
        raise ValueError(f"A and M must have the same shape (d_L, d_0), got {tuple(A.shape)} and {tuple(M.shape)}")
    L = check_positive_int("depth", depth)
    B = torch.linalg.matrix_power(A.T @ M, L - 1) @ A.T
    return 2.0 * L * torch.linalg.svdvals(B).pow(2.0 / L).sum()


def fiber_stationarity_residual(weights: Sequence[Tensor], measurements: Measurements) -> Tensor:
    r"""Relative residual of the stationarity conditions of the trace on the fiber $\{E(W) = M\}$:

    $$
    \frac{\sum_{j<L}\|\sum_i G_{ij}G_{ij}^\top - \sum_i G_{i,j+1}^\top G_{i,j+1}\|_F}
    {\sum_{j<L}\|\sum_i G_{ij}G_{ij}^\top\|_F},\qquad G_{ij} = \nabla_{W_j} f_i = S_j^\top A_i P_j^\top
    $$

    (a generalization of Gatmiry et al.'s eq. 35): 0 at a minimizer of the trace over factorizations of a fixed
    end-to-end matrix, about 1 at a generic point of the fiber. Dense measurements only (small problems).
    """
    from lightning_flat.functional.curvature import partial_products

    weights = list(weights)
    if len(weights) < 2:
        return weights[0].new_zeros(())
    P, S = partial_products(weights)
    A = measurements.dense().to(weights[0].dtype)
    num = den = weights[0].new_zeros(())
    for j in range(len(weights) - 1):
        Gj = S[j].T @ A @ P[j].T  # (n, d_j, d_{j-1})
        Gk = S[j + 1].T @ A @ P[j + 1].T  # (n, d_{j+1}, d_j)
        X = torch.einsum("nab,ncb->ac", Gj, Gj)
        Y = torch.einsum("nba,nbc->ac", Gk, Gk)
        num = num + torch.linalg.matrix_norm(X - Y)
        den = den + torch.linalg.matrix_norm(X)
    return num / den


def min_trace_on_fiber(weights: Sequence[Tensor], measurements: Measurements, *, restarts: int = 5,
                       scale: float = 0.3, seed: int = 0, gtol: float = 1e-10) -> tuple[Tensor, list[Tensor]]:
    r"""Numerically minimize the Hessian trace over the GL fiber of ``weights`` (square hidden widths):
    $W_j \mapsto C_j W_j C_{j-1}^{-1}$ with $C_0 = C_L = I$, which keeps $E(W)$ fixed.

    BFGS (scipy) over the hidden $C_j$, gradients by torch autograd in float64, from $C_j = I$ and
    ``restarts - 1`` random starts $I + \mathrm{scale}\cdot N$. Returns ``(min trace, minimizing weights)``;
    the check of Thm 7 ([`n1_min_trace`][lightning_flat.functional.n1_min_trace]) and of fiber stationarity.
    """
    import numpy as np
    from scipy.optimize import minimize

    from lightning_flat.functional.curvature import hessian_trace

    W0 = [w.detach().to(torch.float64) for w in weights]
    hidden = [w.shape[0] for w in W0[:-1]]
    sizes = [h * h for h in hidden]
    meas = measurements.to(torch.float64)

    def unpack(x):
        C, k = [], 0
        for h, size in zip(hidden, sizes):
            C.append(x[k:k + size].reshape(h, h))
            k += size
        return C

    def moved(C):
        out = []
        for j, W in enumerate(W0):
            V = W
            if j < len(C):
                V = C[j] @ V
            if j > 0:
                V = torch.linalg.solve(C[j - 1].T, V.T).T  # V @ C_{j-1}^{-1}
            out.append(V)
        return out

    def f(x):
        t = torch.tensor(x, dtype=torch.float64, requires_grad=True)
        value = hessian_trace(moved(unpack(t)), meas)
        (g,) = torch.autograd.grad(value, t)
        return float(value.detach()), g.numpy()

    rng = np.random.default_rng(seed)
    eye = np.concatenate([np.eye(h).ravel() for h in hidden])
    best = None
    for r in range(restarts):
        x0 = eye if r == 0 else np.concatenate([(np.eye(h) + scale * rng.standard_normal((h, h))).ravel()
                                                for h in hidden])
        res = minimize(f, x0, jac=True, method="BFGS", options={"gtol": gtol, "maxiter": 5000})
        if best is None or res.fun < best.fun:
            best = res
    Wopt = moved(unpack(torch.tensor(best.x, dtype=torch.float64)))
    return torch.tensor(best.fun, dtype=torch.float64), Wopt
