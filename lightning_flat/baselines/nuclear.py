r"""Minimum nuclear norm interpolant $X = \arg\min \|X\|_*$ s.t. $\mathcal A(X) = b$, with cvxpy.

The solver works on the dual problem

$$
\max_{y \in \mathbb R^n} b^\top y \quad\text{s.t.}\quad \Big\|\sum_i y_i A_i\Big\|_{op} \le 1
\iff \begin{bmatrix} I & Z(y) \\ Z(y)^\top & I \end{bmatrix} \succeq 0,\quad Z(y) = \mathcal A^*(y),
$$

whose optimal value is $\min \|X\|_*$. The primal solution is read off the multiplier
$S = \begin{bmatrix} S_{11} & S_{12} \\ S_{12}^\top & S_{22} \end{bmatrix} \succeq 0$ of the matrix
inequality: stationarity in $y$ gives $\mathcal A(-2 S_{12}) = b$, and
$\operatorname{tr} S = \|{-2 S_{12}}\|_*$ at the optimum, so $X = -2 S_{12}$. That ``X`` satisfies the
constraints only to the solver's accuracy; it is then projected orthogonally onto $\{X : \mathcal A(X) = b\}$,
so the returned interpolant is feasible to rounding.

Before solving, the constraints are replaced by an equivalent system with orthonormal rows (the distinct observed
entries for [`Entries`][lightning_flat.measurements.Entries], $\Lambda^{-1/2} V^\top \mathcal A$ from the Gram
matrix otherwise). This drops redundant measurements, detects inconsistent targets, and keeps SCS from stalling.

Why this form (``benchmarks/nuclear_norm.py``). The test problem is Gaussian sensing with
$M^* = M_1 M_2 / d$. Times are end to end on 2 shared CPU cores; the error is relative, in Frobenius norm,
against Clarabel on this dual at tolerance 1e-12:

| form / solver                        | d = 20, n = 200, r = 2 | d = 60, n = 600, r = 3 |
| ------------------------------------ | ---------------------- | ---------------------- |
| dual / SCS (``"auto"``, eps 1e-8)    | 0.15 s, 3e-10          | 8-10 s, 3e-8           |
| dual / Clarabel (tol 1e-12)          | 1.4 s, 5e-15 from M*   | ~430 s (reference)     |
| dual / Clarabel (tol 1e-8)           | 0.9 s, 3e-9            | ~255 s, 4e-6           |
| primal ``normNuc`` / SCS (eps 1e-8)  | 0.19 s, 1e-7           | 19 s, 6e-7             |
| primal ``normNuc`` / Clarabel (1e-8) | 0.9 s, 6e-8            | ~95 s, 1.5e-5          |

SCS is an ADMM method: each iteration costs one eigendecomposition of order ``d_out + d_in``. Clarabel is an
interior-point method, and each of its iterations factors a dense KKT block of order
$(d_{out} + d_{in})^2 / 2$ in either form. On degenerate instances, such as d = 60 with n = 600 (just below
exact recovery, where ``X`` has rank 15), Clarabel's error in ``X`` behaves like the square root of its duality gap,
so its ``"clarabel"`` tolerances are set to ``eps**2``.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

from lightning_flat._checks import check_choice, check_real, check_tensor
from lightning_flat.io import atomic_path
from lightning_flat.measurements import Entries, Measurements

__all__ = ["min_nuclear_norm", "SOLVERS"]

#: Accepted values of ``solver``; ``"auto"`` is SCS.
SOLVERS = ("auto", "scs", "clarabel")


#: SCS settings besides the tolerances. ``rho_x`` (SCS's default is 1e-6) is raised because the dual's optimal set is
#: not a point (``y`` may move along a face); with the default SCS stalls at a residual of ~5e-9 and runs to
#: ``max_iters`` when ``n`` is near ``d_out * d_in``. Typical runs take 75-400 iterations.
_SCS_OPTIONS = dict(rho_x=1e-3, max_iters=5_000)


def _load_cached(path: Path, op, b: np.ndarray, shape: tuple[int, int], eps: float) -> np.ndarray | None:
    """A cached solution, or ``None`` (with a warning naming the file, which is then recomputed and replaced) when
    the file cannot be read, has the wrong shape, holds a non-finite entry or does not interpolate the data to the
    accuracy a fresh solve is held to (relative residual <= sqrt(eps))."""
    try:
        X = np.load(path, allow_pickle=False)
    except Exception as err:  # truncated or not an .npy file
        problem = f"cannot be read ({type(err).__name__}: {err})"
    else:
        if X.shape != tuple(shape) or X.dtype != np.float64:
            problem = f"holds a {X.dtype} array of shape {X.shape}, not float64 {tuple(shape)}"
        elif not np.isfinite(X).all():
            problem = "holds non-finite entries"
        else:
            residual = np.linalg.norm(op @ X.ravel() - b) / max(np.linalg.norm(b), np.finfo(np.float64).tiny)
            if residual <= eps ** 0.5:
                return X
            problem = f"does not interpolate the data (relative residual {residual:.3g} > {eps ** 0.5:.3g})"
    warnings.warn(f"min_nuclear_norm: the cache file {path} {problem}; solving again and replacing it", stacklevel=3)
    return None


def _operator(measurements: Measurements) -> np.ndarray | sp.csr_matrix:
    r"""The map $\operatorname{vec}(X) \mapsto \mathcal A(X)$ as a float64 ``(n, d_out * d_in)`` matrix
    (row-major ``vec``); a sparse selection for [`Entries`][lightning_flat.measurements.Entries]."""
    n, (d_out, d_in) = len(measurements), measurements.shape
    if isinstance(measurements, Entries):
        if measurements.rows.ndim != 1:
            raise ValueError(f"measurements must be unbatched, got rows of shape {tuple(measurements.rows.shape)}")
        flat = (measurements.rows * d_in + measurements.cols).cpu().numpy()
        return sp.csr_matrix((np.ones(n), (np.arange(n), flat)), shape=(n, d_out * d_in))
    A = measurements.dense()
    if A.ndim != 3:
        raise ValueError(f"measurements must be unbatched (n, d_out, d_in), got dense() of shape {tuple(A.shape)}")
    return A.detach().to("cpu", torch.float64).reshape(n, d_out * d_in).numpy()


def _orthonormalize(op: np.ndarray | sp.csr_matrix, b: np.ndarray,
                    rtol: float) -> tuple[np.ndarray | sp.csr_matrix, np.ndarray]:
    r"""An equivalent system $Q \operatorname{vec}(X) = c$ whose ``(k, d_out * d_in)`` matrix ``Q`` has
    orthonormal rows (``k = rank``): $Q = \Lambda_k^{-1/2} V_k^\top \mathcal A$ from the eigenpairs of the
    Gram matrix $\mathcal A \mathcal A^\top$, or the distinct entries for a selection. Redundant measurements
    make SCS's dual unbounded in some directions and stall it; raises ``RuntimeError`` if ``b`` is inconsistent beyond
    ``rtol * ||b||``."""
    if sp.issparse(op):  # Entries: keep each observed entry once.
        flat, inverse = np.unique(op.indices, return_inverse=True)
        c = np.zeros(len(flat))
        c[inverse] = b
        Q = sp.csr_matrix((np.ones(len(flat)), (np.arange(len(flat)), flat)), shape=(len(flat), op.shape[1]))
        residual = b - c[inverse]
    else:
        lam, V = np.linalg.eigh(op @ op.T)
        keep = lam > lam[-1] * max(op.shape) * np.finfo(np.float64).eps
        scale = lam[keep] ** -0.5
        Q, c, residual = scale[:, None] * (V[:, keep].T @ op), scale * (V[:, keep].T @ b), V[:, ~keep].T @ b
    off, norm = np.linalg.norm(residual), np.linalg.norm(b)
    if off > rtol * norm:
        raise RuntimeError(f"min_nuclear_norm: the targets are inconsistent (no X satisfies A(X) = b): the part of b "
                           f"outside the range of A has norm {off:.3g}, ||b|| = {norm:.3g}")
    return Q, c


def _cache_key(op: np.ndarray | sp.csr_matrix, b: np.ndarray, shape: tuple[int, int], solver: str, eps: float) -> str:
    h = hashlib.sha256(f"min_nuclear_norm/dual/v2/{shape}/{solver}/{eps!r}".encode())
    for part in (op.indptr, op.indices, op.data) if sp.issparse(op) else (op,):
        h.update(np.ascontiguousarray(part).tobytes())
    h.update(b.tobytes())
    return h.hexdigest()[:32]


def _solve_dual(op: np.ndarray | sp.csr_matrix, b: np.ndarray, shape: tuple[int, int], solver: str, eps: float,
                verbose: bool) -> np.ndarray:
    import cvxpy as cp

    d_out, d_in = shape
    if len(b) == 0:  # no measurement: X = 0
        return np.zeros(shape)
    if len(b) == d_out * d_in:  # A is injective: the only feasible X
        return (op.T @ b).reshape(shape)
    y = cp.Variable(len(b))
    Z = cp.reshape(op.T @ y, (d_out, d_in), order="C")
    lmi = cp.bmat([[np.eye(d_out), Z], [Z.T, np.eye(d_in)]]) >> 0
    problem = cp.Problem(cp.Maximize(b @ y), [lmi])
    if solver == "clarabel":  # an interior point's error in X is ~ sqrt(gap) on degenerate problems: ask for eps^2
        tol = max(eps * eps, 1e-12)
        options = dict(solver=cp.CLARABEL, tol_gap_abs=tol, tol_gap_rel=tol, tol_feas=tol)
    else:
        options = dict(solver=cp.SCS, eps_abs=eps, eps_rel=eps, **_SCS_OPTIONS)
    try:
        with warnings.catch_warnings():
            if solver == "clarabel":  # at 1e-12 it often ends "AlmostSolved": accepted after the residual check below
                warnings.filterwarnings("ignore", "Solution may be inaccurate")
            problem.solve(verbose=verbose, canon_backend=cp.SCIPY_CANON_BACKEND, **options)  # 2x faster to compile
    except cp.SolverError as err:
        raise RuntimeError(f"min_nuclear_norm: {solver} failed ({err}); try solver='scs' or a larger eps") from err
    if problem.status not in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE):
        raise RuntimeError(f"min_nuclear_norm: {solver} ended with status {problem.status!r}")
    S = lmi.dual_value
    X = -(S[:d_out, d_out:] + S[d_out:, :d_out].T)
    # An iteration-capped SCS run also reports optimal_inaccurate and may return a far-off iterate: check feasibility.
    x = X.ravel()
    r = op @ x - b
    residual = np.linalg.norm(r) / max(np.linalg.norm(b), np.finfo(np.float64).tiny)
    if residual > eps ** 0.5:
        raise RuntimeError(f"min_nuclear_norm: {solver} ended with status {problem.status!r} and relative residual "
                           f"||A(X) - b|| / ||b|| = {residual:.3g} > sqrt(eps) = {eps ** 0.5:.3g}; try a larger eps")
    # The X read off the dual is feasible only to the solver's accuracy (SCS: up to ~1e-4 relative on hard, unrecovered
    # completion instances). Q has orthonormal rows, so one orthogonal projection onto {X : Q vec(X) = c} makes it
    # feasible to rounding; it moves X by the residual's norm, which changes ||X||_* by at most
    # sqrt(min(d_out, d_in)) times that.
    return (x - op.T @ r).reshape(shape)


def min_nuclear_norm(measurements: Measurements, targets: Tensor, *, solver: str = "auto", eps: float | None = None,
                     verbose: bool = False, cache_dir: str | os.PathLike | None = None) -> Tensor:
    r"""Minimum nuclear norm matrix consistent with the measurements.

    $$
    X = \arg\min_{X \in \mathbb R^{d_{out} \times d_{in}}} \|X\|_*
    \quad\text{s.t.}\quad \langle A_i, X\rangle = b_i,\ i = 1, \dots, n,
    $$

    solved in float64 through the dual $\max b^\top y$ s.t. $\|\sum_i y_i A_i\|_{op} \le 1$ (see the
    module docstring); [`Entries`][lightning_flat.measurements.Entries] enter as a sparse selection, never as dense
    ``A_i``.

    Args:
        measurements: the operator $\mathcal A$ (``Dense``, ``RankOne`` or ``Entries``; unbatched), ``n`` of
            them, acting on ``(d_out, d_in)`` matrices.
        targets: ``b`` of shape ``(n,)``, floating point.
        solver: ``"auto"`` (= ``"scs"``, fast and accurate to ~1e-8 at the default ``eps``) or ``"clarabel"``
            (interior point; an independent check, minutes when ``d_out + d_in`` exceeds ~100).
        eps: SCS's absolute and relative tolerance (Clarabel's gap and feasibility tolerances are
            ``max(eps**2, 1e-12)``). ``None``: 1e-8 for float64 targets, 1e-6 otherwise (below that, data rounded
            to float32 makes SCS stall).
        verbose: print the solver's log.
        cache_dir: if given, the solution is stored there under a hash of the measurements, targets, solver and
            ``eps`` and reloaded by later calls (written to a temporary file, then renamed: safe across processes).

    Returns:
        ``X`` of shape ``(d_out, d_in)`` in the dtype and on the device of ``targets``.

    Raises:
        RuntimeError: the targets are inconsistent (no ``X`` satisfies $\mathcal A(X) = b$), or the solver
            failed, ended with a status other than optimal / optimal_inaccurate, or returned an ``X`` with
            $\|\mathcal A(X) - b\| > \sqrt{eps}\, \|b\|$.

    Examples:
        >>> from lightning_flat.measurements import Dense
        >>> g = torch.Generator().manual_seed(0)
        >>> u, v = torch.randn(2, 6, 1, generator=g, dtype=torch.float64)
        >>> M = u @ v.T  # rank 1, 11 degrees of freedom
        >>> A = Dense(torch.randn(30, 6, 6, generator=g, dtype=torch.float64))
        >>> X = min_nuclear_norm(A, A(M))
        >>> bool(torch.allclose(X, M, atol=1e-6))
        True

    References:
        Recht, Fazel, Parrilo (2010), "Guaranteed minimum-rank solutions of linear matrix equations via nuclear norm
        minimization", SIAM Review 52(3).
    """
    if not isinstance(measurements, Measurements):
        raise TypeError(f"measurements must be a lightning_flat.measurements.Measurements (Dense, RankOne, Entries), "
                        f"got {type(measurements).__name__}")
    check_tensor("targets", targets, ndim=1, floating=True)
    if targets.shape[0] != len(measurements):
        raise ValueError(f"targets must have shape ({len(measurements)},) to match the measurements, "
                         f"got {tuple(targets.shape)}")
    if not bool(torch.isfinite(targets).all()):
        raise ValueError("targets must be finite, got NaN or inf entries")
    check_choice("solver", solver, SOLVERS)
    if eps is None:
        eps = 1e-8 if targets.dtype == torch.float64 else 1e-6
    eps = check_real("eps", eps, low=0.0, low_open=True)
    if not isinstance(verbose, bool):
        raise TypeError(f"verbose must be a bool, got {verbose!r} of type {type(verbose).__name__}")
    if cache_dir is not None and not isinstance(cache_dir, (str, os.PathLike)):
        raise TypeError(f"cache_dir must be a path (str or os.PathLike) or None, got {type(cache_dir).__name__}")
    solver = "scs" if solver == "auto" else solver

    op = _operator(measurements)
    b = targets.detach().to("cpu", torch.float64).numpy()
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"min_nuclear_norm-{_cache_key(op, b, measurements.shape, solver, eps)}.npy"
        if path.is_file():
            X = _load_cached(path, op, b, measurements.shape, eps)
            if X is not None:
                return torch.from_numpy(X).to(device=targets.device, dtype=targets.dtype)
    Q, c = _orthonormalize(op, b, rtol=torch.finfo(targets.dtype).eps ** 0.5)
    X = _solve_dual(Q, c, measurements.shape, solver, eps, verbose)
    if path is not None:
        with atomic_path(path, ".npy.tmp") as tmp:
            with open(tmp, "wb") as f:
                np.save(f, X)
    return torch.from_numpy(X).to(device=targets.device, dtype=targets.dtype)
