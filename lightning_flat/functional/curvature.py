r"""Curvature of the measurement loss of a deep linear network: exact Hessian trace, sharpness.

The model is :math:`E(W) = W_L \cdots W_1` with ``W_j (..., d_j, d_{j-1})`` and the loss
:math:`L(W) = \frac1n \sum_i (\langle A_i, E(W)\rangle - b_i)^2` (mean squared error, no 1/2).
Leading dimensions ``...`` are replicas; every function here broadcasts over them.

Notation: :math:`P_j = W_{j-1}\cdots W_1` (``P_1 = I``) and :math:`S_j = W_L \cdots W_{j+1}` (``S_L = I``), so
:math:`\nabla_{W_j} f_i = S_j^\top A_i P_j^\top`. Since :math:`f_i` is linear in each :math:`W_j` separately, the
diagonal Hessian blocks of :math:`f_i` vanish and, at every :math:`W` (not only at interpolation),

.. math:: \operatorname{tr}\nabla^2 L(W) = \frac2n \sum_i \|\nabla f_i(W)\|^2
          = \frac2n \sum_j \mathrm{curvature}(P_j^\top P_j,\; S_j S_j^\top).

References:
    Gatmiry, Li, Chuang, Reddi, Ma, Jegelka (2023), Lemma 2 (from their Sec. 4 on, constants are for a loss with
    1/(2n), half of ours, so their traces are half of these).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_flat._checks import check_choice, check_positive_int
from lightning_flat.measurements import Measurements

__all__ = [
    "end_to_end",
    "partial_products",
    "measurement_loss",
    "hessian_trace",
    "trace_surrogate",
    "flatten_weights",
    "unflatten_weights",
    "loss_hvp",
    "loss_hessian",
    "replica_loss_hessians",
    "replica_sharpness",
    "sharpness",
    "top_eigenpairs",
    "top_hessian_eigenpair",
]


def _check_weights(weights: Sequence[Tensor]) -> list[Tensor]:
    if isinstance(weights, Tensor) or not isinstance(weights, (list, tuple)):
        raise TypeError(f"weights must be a list of tensors [W_1, ..., W_L], got {type(weights).__name__}")
    if len(weights) == 0:
        raise ValueError("weights must hold at least one layer, got an empty list")
    for j, W in enumerate(weights):
        if not isinstance(W, Tensor) or W.ndim < 2:
            raise ValueError(f"weights[{j}] must be a tensor of shape (..., d_{j + 1}, d_{j}), got {getattr(W, 'shape', W)}")
    for j in range(1, len(weights)):
        if weights[j].dtype != weights[0].dtype:
            raise TypeError(f"weights must share one dtype, got weights[0] {weights[0].dtype} and weights[{j}] "
                            f"{weights[j].dtype}")
        if weights[j].shape[-1] != weights[j - 1].shape[-2]:
            raise ValueError(
                f"weights[{j}] has shape {tuple(weights[j].shape)} but weights[{j - 1}] has shape "
                f"{tuple(weights[j - 1].shape)}: W_{j + 1} must have d_{j} = {weights[j - 1].shape[-2]} columns"
            )
    return list(weights)


def end_to_end(weights: Sequence[Tensor]) -> Tensor:
    r"""End-to-end matrix :math:`E = W_L \cdots W_1` of shape ``(..., d_L, d_0)``.

    Example:
        >>> W1, W2 = torch.eye(3, 2), 2 * torch.ones(1, 3)
        >>> end_to_end([W1, W2])
        tensor([[2., 2.]])
    """
    weights = _check_weights(weights)
    E = weights[0]
    for W in weights[1:]:
        E = torch.matmul(W, E)
    return E


def _eye_like(W: Tensor, d: int, batch: torch.Size) -> Tensor:
    return torch.eye(d, dtype=W.dtype, device=W.device).expand(*batch, d, d)


def partial_products(weights: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    r"""Prefix and suffix products ``(P, S)``: ``P[j] = W_{j-1}...W_1`` (``(..., d_{j-1}, d_0)``, ``P[0] = I``) and
    ``S[j] = W_L...W_{j+1}`` (``(..., d_L, d_j)``, ``S[L-1] = I``), indexed from 0 for layer ``j+1``."""
    weights = _check_weights(weights)
    L = len(weights)
    batch = torch.broadcast_shapes(*(W.shape[:-2] for W in weights))
    P = [_eye_like(weights[0], weights[0].shape[-1], batch)]
    for j in range(L - 1):
        P.append(torch.matmul(weights[j], P[j]))
    S: list[Tensor] = [None] * L  # type: ignore[list-item]
    S[L - 1] = _eye_like(weights[-1], weights[-1].shape[-2], batch)
    for j in range(L - 1, 0, -1):
        S[j - 1] = torch.matmul(S[j], weights[j])
    return P, S


def measurement_loss(E: Tensor, measurements: Measurements, targets: Tensor) -> Tensor:
    r""":math:`\frac1n\sum_i(\langle A_i, E\rangle - b_i)^2` (no 1/2), shape ``(...)`` for ``E (..., d_out, d_in)``."""
    return (measurements(E) - targets).square().mean(-1)


def hessian_trace(weights: Sequence[Tensor], measurements: Measurements, targets: Tensor | None = None,
                  per_layer: bool = False) -> Tensor:
    r"""Exact trace of the Hessian of the measurement loss in the weights, shape ``(...)``.

    .. math:: \operatorname{tr}\nabla^2 L(W) = \frac2n\sum_{j=1}^L\sum_i \operatorname{tr}(A_i P_j^\top P_j A_i^\top S_j S_j^\top)

    Exact at every ``W`` (the residual term has zero trace because each :math:`f_i` is linear in each layer), and
    differentiable in the weights (usable as a regulariser). ``per_layer=True`` returns the ``L`` terms (the traces of
    the diagonal Hessian blocks, one per layer), shape ``(..., L)``. ``targets`` is not used: it is accepted so that the
    exact and the generic (Hutch++) paths share one signature. All :math:`L` layer terms go to
    ``measurements.curvature`` in one batched call (for :class:`~lightning_flat.measurements.Dense` at the Gatmiry
    size this is one product with the cached fourth-moment matrix).

    Example:
        >>> from lightning_flat.measurements import Entries
        >>> rows, cols = torch.tensor([0, 1]), torch.tensor([1, 0])
        >>> hessian_trace([torch.eye(2, dtype=torch.float64)], Entries(rows, cols, (2, 2)))
        tensor(2., dtype=torch.float64)
    """
    weights = _check_weights(weights)
    if not isinstance(measurements, Measurements):
        raise TypeError(f"measurements must be a lightning_flat Measurements, got {type(measurements).__name__}")
    d_out, d_in = weights[-1].shape[-2], weights[0].shape[-1]
    if (d_out, d_in) != tuple(measurements.shape):
        raise ValueError(f"weights map R^{d_in} to R^{d_out} but measurements have shape {measurements.shape}")
    if weights[0].dtype in (torch.float16, torch.bfloat16):  # measured in float32
        weights = [W.float() for W in weights]
        measurements = measurements.to(dtype=torch.float32)
    measurements.check_dtype("weights", weights[0])
    # Each factor scaled by a power of two c_j (exact, detached: the identity below holds for every W, so gradients
    # are unchanged): term j is homogeneous of degree 2 in every other factor and 0 in W_j, so
    # term_j(W) = prod_{l != j} c_l^2 term_j(W / c), and no product overflows where the trace is representable.
    from lightning_flat.functional.balance import pow2_scale, times_pow2

    c = torch.stack([pow2_scale(W.abs().amax((-2, -1))) for W in weights])  # (L, ...), detached powers of two
    weights = [W * (1.0 / c[j])[..., None, None] for j, W in enumerate(weights)]  # (torch.ldexp has no gradient)
    P, S = partial_products(weights)
    G = torch.stack([Pj.transpose(-1, -2) @ Pj for Pj in P])  # (L, ..., d_in, d_in)
    K = torch.stack([Sj @ Sj.transpose(-1, -2) for Sj in S])  # (L, ..., d_out, d_out)
    terms = measurements.curvature(G, K, symmetric=True) * (2.0 / len(measurements))  # (L, ...)
    _, e = torch.frexp(c)  # c_j = 2^(e_j - 1): the factor prod_{l != j} c_l^2 as a power of two, never overflowing
    terms = times_pow2(terms, 2 * (e.sum(0) - e) - 2 * (len(weights) - 1))
    return terms.movedim(0, -1) if per_layer else terms.sum(0)


def trace_surrogate(weights: Sequence[Tensor]) -> Tensor:
    r"""Gatmiry et al.'s surrogate :math:`R(W) = \sum_j \|P_j\|_F^2\|S_j\|_F^2`, shape ``(...)``.

    For Gaussian measurements with N(0,1) entries, :math:`\mathbb E_A \operatorname{tr}\nabla^2 L = 2R(W)` exactly.
    """
    P, S = partial_products(weights)
    return sum(Pj.square().sum((-2, -1)) * Sj.square().sum((-2, -1)) for Pj, Sj in zip(P, S))


# ------------------------------------------------------------------------------------- Hessian-vector products
def flatten_weights(weights: Sequence[Tensor]) -> Tensor:
    """Concatenate the weights into one flat vector (the coordinates of the Hessian)."""
    return torch.cat([W.reshape(-1) for W in weights])


def unflatten_weights(flat: Tensor, shapes: Sequence[torch.Size]) -> list[Tensor]:
    """Inverse of :func:`flatten_weights` for the given shapes."""
    out, offset = [], 0
    for shape in shapes:
        size = 1
        for s in shape:
            size *= int(s)
        out.append(flat[offset:offset + size].reshape(shape))
        offset += size
    return out


def _flat_loss(shapes, measurements, targets, e2e=None):
    e2e = e2e or end_to_end

    def f(w: Tensor) -> Tensor:
        return measurement_loss(e2e(unflatten_weights(w, shapes)), measurements, targets)
    return f


def loss_hvp(weights: Sequence[Tensor], measurements: Measurements, targets: Tensor, end_to_end=None):
    """Return ``(hvp, w0)``: a function ``v -> H v`` for the Hessian of the full measurement loss at ``weights``
    (flattened coordinates, forward-over-reverse with ``torch.func``) and the flat point ``w0``. ``end_to_end`` maps
    the factors to ``E`` (default: the product ``W_L ... W_1``; e.g. a model's ``end_to_end_from``)."""
    weights = list(weights) if end_to_end is not None else _check_weights(weights)
    shapes = [W.shape for W in weights]
    w0 = flatten_weights([W.detach() for W in weights])
    grad_f = torch.func.grad(_flat_loss(shapes, measurements, targets, end_to_end))

    def hvp(v: Tensor) -> Tensor:
        return torch.func.jvp(grad_f, (w0,), (v.to(w0.dtype),))[1]

    return hvp, w0


def loss_hessian(weights: Sequence[Tensor], measurements: Measurements, targets: Tensor,
                 end_to_end=None) -> Tensor:
    """Dense Hessian of the measurement loss in the flattened weights (``torch.func.hessian``); small models only."""
    weights = list(weights) if end_to_end is not None else _check_weights(weights)
    shapes = [W.shape for W in weights]
    w0 = flatten_weights([W.detach() for W in weights])
    return torch.func.hessian(_flat_loss(shapes, measurements, targets, end_to_end))(w0)


def replica_loss_hessians(weights: Sequence[Tensor], measurements: Measurements, targets: Tensor, end_to_end=None,
                          chunk_size: int | None = 64) -> Tensor:
    r"""Dense Hessians of the measurement loss of every replica at once, shape ``(R, p, p)``.

    ``weights`` carry a leading replica dimension ``R`` (``W_j (R, d_j, d_{j-1})``) and ``end_to_end`` maps them to
    ``E (R, d_out, d_in)`` (default: the product). The replicas' losses are independent, so one Hessian-vector product
    of their sum with the direction :math:`e_k` in every replica gives column ``k`` of all ``R`` Hessians: ``p``
    batched products (``torch.func``: forward over reverse, vmapped over the basis in chunks of ``chunk_size``)
    instead of ``R`` separate Hessians.
    """
    weights = list(weights)
    R = weights[0].shape[0]
    shapes = [W.shape[1:] for W in weights]
    sizes = [W[0].numel() for W in weights]
    e2e = end_to_end or globals()["end_to_end"]
    w0 = torch.cat([W.detach().reshape(R, -1) for W in weights], dim=1)

    def total(w: Tensor) -> Tensor:
        parts = torch.split(w, sizes, dim=1)
        ws = [x.reshape(R, *shape) for x, shape in zip(parts, shapes)]
        return measurement_loss(e2e(ws), measurements, targets).sum()

    grad_f = torch.func.grad(total)

    def column(e: Tensor) -> Tensor:
        return torch.func.jvp(grad_f, (w0,), (e.expand(R, -1),))[1]

    p = w0.shape[1]
    basis = torch.eye(p, dtype=w0.dtype, device=w0.device)
    with torch.enable_grad():
        cols = torch.func.vmap(column, chunk_size=chunk_size)(basis)  # (p, R, p): column k of every replica
    H = cols.permute(1, 2, 0)
    return 0.5 * (H + H.transpose(-1, -2))


def replica_sharpness(weights: Sequence[Tensor], measurements: Measurements, targets: Tensor, end_to_end=None,
                      active: Tensor | None = None) -> Tensor:
    """Exact sharpness of every replica, shape ``(R,)`` (:func:`replica_loss_hessians`, then ``eigvalsh``).

    Replicas with ``active[r] = False`` (frozen, e.g. diverged) are computed at zero weights, so that huge or
    non-finite weights cannot spoil the batch, and reported as NaN, as is any replica whose Hessian is not finite."""
    Ws = list(weights)
    R = Ws[0].shape[0]
    if active is not None and not bool(active.all()):
        Ws = [torch.where(active.reshape(-1, *([1] * (W.ndim - 1))), W, torch.zeros_like(W)) for W in Ws]
    H = replica_loss_hessians(Ws, measurements, targets, end_to_end=end_to_end)
    ok = torch.isfinite(H).flatten(1).all(1)
    if active is not None:
        ok &= active.to(ok.device)
    out = torch.full((R,), float("nan"), dtype=H.dtype, device=H.device)
    if bool(ok.any()):
        out[ok] = torch.linalg.eigvalsh(H[ok])[:, -1]
    return out


def top_hessian_eigenpair(hvp, size: int, *, dtype: torch.dtype, device: torch.device, v0: Tensor | None = None,
                          max_iter: int = 100, tol: float = 1e-10, max_restarts: int = 10,
                          seed: int = 0) -> tuple[Tensor, Tensor, int]:
    r"""Largest algebraic eigenpair of a symmetric operator ``hvp`` by Lanczos with early stopping and warm start.

    Lanczos with full reorthogonalization from ``v0`` (or a seeded random start, drawn from its own generator so
    global random state is untouched), stopping as soon as the bound on the eigenvalue's error,
    :math:`\min(r, r^2/\delta)` with the Ritz residual :math:`r = \beta_j |s_j|` and the Ritz gap
    :math:`\delta = \theta_1 - \theta_2` (Kato-Temple; used once :math:`\delta > r`), is at most
    :math:`\mathrm{tol}\cdot\max(|\theta|, 1)`; if ``max_iter`` steps do not reach it, it restarts from the Ritz
    vector (up to ``max_restarts`` times). ``tol`` is thus the relative accuracy of the eigenvalue. Started from the previous top eigenvector, a read
    during training converges in a few products. (hessian-eigenthings' ``lanczos`` always runs its full Krylov
    dimension and takes no start vector, hence this small loop.)

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


def sharpness(weights: Sequence[Tensor], measurements: Measurements, targets: Tensor, *, method: str = "auto",
              max_iter: int = 100, tol: float = 1e-10, seed: int = 0, v0: Tensor | None = None,
              end_to_end=None) -> Tensor:
    r"""Sharpness: the largest algebraic eigenvalue of the Hessian of the full measurement loss, shape ``(...)``.

    The full Hessian, residual term included (no label noise, no ridge). ``method``: ``"exact"`` (``eigvalsh`` of
    ``torch.func.hessian``, for models with at most a few thousand parameters), ``"lanczos"`` (restarted Lanczos over
    ``torch.func`` Hessian-vector products, see :func:`top_hessian_eigenpair`) or ``"auto"`` (exact up to 1024
    parameters). Leading replica dimensions of the weights are handled one replica at a time.
    """
    weights = list(weights) if end_to_end is not None else _check_weights(weights)
    check_choice("method", method, ("auto", "exact", "lanczos"))
    check_positive_int("max_iter", max_iter)
    batch = torch.broadcast_shapes(*(W.shape[:-2] for W in weights))
    if len(batch) > 0:
        flat_w = [W.expand(*batch, *W.shape[-2:]).reshape(-1, *W.shape[-2:]) for W in weights]
        t = targets.expand(*batch, targets.shape[-1]).reshape(-1, targets.shape[-1])
        vals = [sharpness([W[r] for W in flat_w], measurements, t[r], method=method, max_iter=max_iter, tol=tol,
                          seed=seed, end_to_end=end_to_end) for r in range(flat_w[0].shape[0])]
        return torch.stack(vals).reshape(batch)
    size = sum(W.numel() for W in weights)
    with torch.enable_grad():
        if method == "exact" or (method == "auto" and size <= 1024):
            H = loss_hessian(weights, measurements, targets, end_to_end)
            if not bool(torch.isfinite(H).all()):  # a diverged point: no LAPACK call on it
                return torch.tensor(float("nan"), dtype=H.dtype, device=H.device)
            return torch.linalg.eigvalsh(H)[-1]
        hvp, w0 = loss_hvp(weights, measurements, targets, end_to_end)
        theta, _, _ = top_hessian_eigenpair(hvp, size, dtype=w0.dtype, device=w0.device, v0=v0,
                                            max_iter=max_iter, tol=tol, seed=seed)
    return theta


def _orthonormal(S: Tensor, rtol: float = 1e-10) -> Tensor:
    """An orthonormal basis of the columns of ``S`` (QR, dropping directions below ``rtol`` of the largest)."""
    Q, Rm = torch.linalg.qr(S)
    d = Rm.diagonal().abs()
    keep = d > rtol * (float(d.max()) if d.numel() else 1.0)
    return Q[:, keep]


def top_eigenpairs(hvp, size: int, k: int, *, dtype: torch.dtype, device: torch.device, X0: Tensor | None = None,
                   tol: float = 1e-8, max_iter: int = 300, seed: int = 0,
                   nconv: int | None = None, above: float | None = None) -> tuple[Tensor, Tensor, int]:
    r"""The ``k`` largest algebraic eigenpairs of a symmetric operator ``hvp`` by LOBPCG (Knyazev 2001): Rayleigh-Ritz
    on the block :math:`[X, R, P]` of the current vectors, their residuals and the previous step's directions, until
    the residuals of the leading ``nconv`` (default ``k``) satisfy :math:`\|Hx - \theta x\| \le
    \mathrm{tol}\cdot\max(|\theta|, 1)` (the eigenvalue's error is about the residual squared over the gap; the
    trailing vectors are guards that speed up convergence); with ``above``, only those above that level and the
    first one below it. ``X0`` (e.g. the previous read's eigenvectors)
    warm-starts it, so a read during training converges in a few blocks. Returns
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
        return torch.stack([hvp(V[:, j]) for j in range(V.shape[1])], dim=1)

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
