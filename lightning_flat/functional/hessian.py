r"""Hessian-vector products and dense Hessians of the measurement loss in the flattened weights (``torch.func``),
for one model or for every replica at once, and the sharpness (the largest algebraic Hessian eigenvalue).

The loss is $L(W) = \frac1n\sum_i(\langle A_i, E(W)\rangle - b_i)^2$ with ``E = end_to_end(weights)`` (the
product $W_L\cdots W_1$ by default, or a model's own map); the Hessian is the full one, residual term
included. Below `EXACT_MAX_PARAMS` parameters the dense Hessian is cheap enough to take every eigenvalue.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_flat._checks import check_choice, check_positive_int
from lightning_flat.functional.curvature import _check_weights, end_to_end, measurement_loss
from lightning_flat.functional.eigen import top_hessian_eigenpair
from lightning_flat.measurements import Measurements

__all__ = ["EXACT_MAX_PARAMS", "flatten_weights", "unflatten_weights", "loss_hvp", "loss_hessian",
           "replica_loss_hessians", "replica_sharpness", "sharpness"]

#: Parameter counts up to which the sharpness is the top eigenvalue of the dense Hessian (``method="auto"``).
EXACT_MAX_PARAMS = 1024


def flatten_weights(weights: Sequence[Tensor]) -> Tensor:
    """Concatenate the weights into one flat vector (the coordinates of the Hessian)."""
    return torch.cat([W.reshape(-1) for W in weights])


def unflatten_weights(flat: Tensor, shapes: Sequence[torch.Size]) -> list[Tensor]:
    """Inverse of [`flatten_weights`][lightning_flat.functional.flatten_weights] for the given shapes."""
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
    of their sum with the direction $e_k$ in every replica gives column ``k`` of all ``R`` Hessians: ``p``
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
    """Exact sharpness of every replica, shape ``(R,)``
    ([`replica_loss_hessians`][lightning_flat.functional.replica_loss_hessians], then ``eigvalsh``).

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


def sharpness(weights: Sequence[Tensor], measurements: Measurements, targets: Tensor, *, method: str = "auto",
              max_iter: int = 100, tol: float = 1e-10, seed: int = 0, v0: Tensor | None = None,
              end_to_end=None) -> Tensor:
    r"""Sharpness: the largest algebraic eigenvalue of the Hessian of the full measurement loss, shape ``(...)``.

    The full Hessian, residual term included (no label noise, no ridge). ``method``: ``"exact"`` (``eigvalsh`` of
    ``torch.func.hessian``, for models with at most a few thousand parameters), ``"lanczos"`` (restarted Lanczos over
    ``torch.func`` Hessian-vector products, see
    [`top_hessian_eigenpair`][lightning_flat.functional.top_hessian_eigenpair]) or ``"auto"`` (exact up to
    `EXACT_MAX_PARAMS` parameters). Leading replica dimensions of the weights are handled one replica at a time.
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
        if method == "exact" or (method == "auto" and size <= EXACT_MAX_PARAMS):
            H = loss_hessian(weights, measurements, targets, end_to_end)
            if not bool(torch.isfinite(H).all()):  # a diverged point: no LAPACK call on it
                return torch.tensor(float("nan"), dtype=H.dtype, device=H.device)
            return torch.linalg.eigvalsh(H)[-1]
        hvp, w0 = loss_hvp(weights, measurements, targets, end_to_end)
        theta, _, _ = top_hessian_eigenpair(hvp, size, dtype=w0.dtype, device=w0.device, v0=v0,
                                            max_iter=max_iter, tol=tol, seed=seed)
    return theta


