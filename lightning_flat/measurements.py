r"""Linear measurement operators :math:`\mathcal A: \mathbb R^{d_{out}\times d_{in}} \to \mathbb R^n`.

One small class family with one interface, used by the datamodules (to make targets and batches), by the
models (to predict) and by the curvature core (the exact Hessian trace):

- :class:`Dense`: :math:`A_i` given as a tensor of shape ``(n, d_out, d_in)`` (Gaussian matrix sensing);
- :class:`RankOne`: :math:`A_i = u_i v_i^\top` (bilinear sensing, quadratic sensing with ``u = v``, univariate
  regression with ``d_out = 1`` and ``u_i = 1``);
- :class:`Entries`: :math:`A_i = e_{r_i} e_{c_i}^\top` (matrix completion).

Every class offers

- ``__call__(E) -> (..., n)``: predictions :math:`\langle A_i, E\rangle`;
- ``adjoint(r) -> (..., d_out, d_in)``: :math:`\sum_i r_i A_i`;
- ``curvature(G, K) -> (...)``: :math:`\sum_i \operatorname{tr}(A_i G A_i^\top K)` for ``G (..., d_in, d_in)`` and
  ``K (..., d_out, d_out)``, in the cheapest form for the structure. With :math:`G = P^\top P` and :math:`K = S S^\top`
  this is :math:`\sum_i \|S^\top A_i P^\top\|_F^2`, the building block of the exact Hessian trace of a deep linear
  network (see :func:`lightning_flat.functional.hessian_trace`);
- ``subset(index)``, ``__len__``, ``shape`` (``(d_out, d_in)``), ``.to(device/dtype)`` and ``dense()``.

``E``, ``G``, ``K`` and ``r`` may carry leading batch dimensions (replicas); results carry them too.
The measurement tensors themselves may carry leading batch dimensions as well (a per-replica minibatch made by
``subset`` with an index of shape ``(R, B)``); ``__call__`` and ``adjoint`` broadcast over them.

Measurements are immutable: the classes cache derived tensors (e.g. :class:`Dense`'s fourth-moment matrix used by
``curvature``), so do not modify the tensors passed in after construction.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from lightning_flat._checks import check_choice, check_tensor

__all__ = ["Measurements", "Dense", "RankOne", "Entries", "MeasurementBatch", "unpack_batch", "MOMENT_BUDGET_BYTES"]

#: Largest fourth-moment matrix (in bytes) that :meth:`Dense.curvature` caches for the ``"moment"`` method.
MOMENT_BUDGET_BYTES = 512 * 2**20


def _parse_to(args: tuple, kwargs: dict) -> tuple[torch.device | None, torch.dtype | None]:
    """Read ``device`` and ``dtype`` from arguments in the forms ``Tensor.to`` accepts."""
    device, dtype = kwargs.get("device"), kwargs.get("dtype")
    for a in args:
        if isinstance(a, torch.dtype):
            dtype = a
        elif isinstance(a, (str, torch.device, int)):
            device = a
        elif isinstance(a, Tensor):
            device, dtype = a.device, a.dtype
        else:
            raise TypeError(f"to() got an argument it does not understand: {a!r}")
    if dtype is not None and not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating point dtype, got {dtype}")
    return (torch.device(device) if device is not None else None), dtype


class Measurements:
    """Base class: a linear map from ``(d_out, d_in)`` matrices to ``R^n``."""

    shape: tuple[int, int]

    def __call__(self, E: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def adjoint(self, r: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def curvature(self, G: Tensor, K: Tensor, symmetric: bool = False) -> Tensor:  # pragma: no cover - abstract
        """``sum_i tr(A_i G A_i^T K)``; ``symmetric=True`` promises symmetric ``G`` and ``K`` (a faster path may use it)."""
        raise NotImplementedError

    def subset(self, index: Tensor | slice, out: dict[str, Tensor] | None = None) -> Measurements:  # pragma: no cover
        """The measurements ``index`` (a 1-D index, or ``(R, B)`` for one minibatch per replica, giving leading
        dimensions). ``out``, a dict the caller keeps between calls, lets a subset reuse its memory from the last
        call (the previous subset is then overwritten): the engine's chunks do this, so a large gathered batch stays
        in the CPU caches instead of being allocated afresh at every step."""
        raise NotImplementedError

    def dense(self) -> Tensor:  # pragma: no cover - abstract
        """The measurement matrices as one tensor of shape ``(n, d_out, d_in)``."""
        raise NotImplementedError

    def fields(self) -> dict[str, Tensor]:  # pragma: no cover - abstract
        """The tensors with one row per measurement (for splitting a batch into chunks, e.g. under ``vmap``)."""
        raise NotImplementedError

    def traces(self) -> Tensor:  # pragma: no cover - abstract
        """:math:`\operatorname{tr}(A_i)` for every measurement, shape ``(n,)`` (square measurements only)."""
        raise NotImplementedError

    def second_moments(self) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        """:math:`(\sum_i A_iA_i^\top, \sum_i A_i^\top A_i)`, shapes ``(d_out, d_out)`` and ``(d_in, d_in)``."""
        raise NotImplementedError

    def _check_square_measurements(self) -> None:
        if self.shape[0] != self.shape[1]:
            raise ValueError(f"traces need square measurements, got shape {self.shape}")

    def with_fields(self, fields: dict[str, Tensor]) -> Measurements:  # pragma: no cover - abstract
        """The same kind of measurements over other rows (the inverse of :meth:`fields`)."""
        raise NotImplementedError

    def to(self, *args: Any, **kwargs: Any) -> Measurements:  # pragma: no cover - abstract
        raise NotImplementedError

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def dtype(self) -> torch.dtype:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def device(self) -> torch.device:  # pragma: no cover - abstract
        raise NotImplementedError

    # ----------------------------------------------------------------- shared input checks
    def _check_matrix(self, name: str, E: Tensor) -> None:
        if not isinstance(E, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(E).__name__}")
        if E.ndim < 2 or tuple(E.shape[-2:]) != tuple(self.shape):
            raise ValueError(f"{name} must have shape (..., {self.shape[0]}, {self.shape[1]}), got {tuple(E.shape)}")
        self.check_dtype(name, E)

    _strict_dtype = True  # contractions with the stored fields need one dtype (Entries only gathers: any dtype)

    def check_dtype(self, name: str, x: Tensor) -> None:
        """Refuse a tensor whose dtype these measurements cannot contract with, naming it and both dtypes."""
        if self._strict_dtype and x.dtype != self.dtype:
            raise TypeError(f"{name} is {x.dtype} but these {type(self).__name__} measurements are {self.dtype}: "
                            f"convert one (measurements.to(dtype={x.dtype}) or {name}.to({self.dtype}))")

    def _check_square(self, name: str, M: Tensor, d: int) -> None:
        if not isinstance(M, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(M).__name__}")
        if M.ndim < 2 or tuple(M.shape[-2:]) != (d, d):
            raise ValueError(f"{name} must have shape (..., {d}, {d}), got {tuple(M.shape)}")
        self.check_dtype(name, M)

    def _check_residual(self, r: Tensor) -> None:
        if not isinstance(r, Tensor):
            raise TypeError(f"r must be a torch.Tensor, got {type(r).__name__}")
        if r.ndim < 1 or r.shape[-1] != len(self):
            raise ValueError(f"r must have shape (..., {len(self)}), got {tuple(r.shape)}")
        self.check_dtype("r", r)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={len(self)}, shape={self.shape}, dtype={self.dtype}, device={self.device})"


class Dense(Measurements):
    r"""Dense measurement matrices ``A`` of shape ``(n, d_out, d_in)``; :math:`f_i(E) = \langle A_i, E\rangle`.

    ``curvature`` has two exact methods:

    - ``"direct"``: :math:`\sum_i \langle A_i G, K^\top A_i\rangle` with two batched matmuls,
      :math:`O(n\, d_{out} d_{in} (d_{in} + d_{out}))` per pair ``(G, K)``;
    - ``"moment"``: :math:`\operatorname{vec}(K^\top)^\top\, \Sigma\, \operatorname{vec}(G)` with the fourth-moment
      matrix :math:`\Sigma_{(a,e),(b,c)} = \sum_i (A_i)_{ab} (A_i)_{ec}` of shape ``(d_out^2, d_in^2)``, built once
      (cost :math:`n\, d_{out}^2 d_{in}^2`) and cached; each call then costs :math:`O(d_{out}^2 d_{in}^2)`,
      independent of ``n``.

    ``"auto"`` (default) takes ``"moment"`` when it is cheaper per call and :math:`\Sigma` fits in
    :data:`MOMENT_BUDGET_BYTES`. With ``symmetric=True`` (symmetric ``G`` and ``K``, as in the Hessian trace) only the
    :meth:`folded_moment` over upper triangles is kept: at the Gatmiry size (n=600, 60x60) 27 MB in float64 instead of
    104 MB, and a quarter of the memory traffic per call.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> A = Dense(torch.randn(5, 2, 3, generator=g, dtype=torch.float64))
        >>> E = torch.randn(2, 3, generator=g, dtype=torch.float64)
        >>> A(E).shape, A.adjoint(torch.ones(5, dtype=torch.float64)).shape
        (torch.Size([5]), torch.Size([2, 3]))
    """

    def __init__(self, A: Tensor) -> None:
        check_tensor("A", A, min_ndim=3, floating=True, finite=True)
        if A.shape[-3] < 1 or A.shape[-2] < 1 or A.shape[-1] < 1:
            raise ValueError(f"A must have shape (n, d_out, d_in) with positive sizes, got {tuple(A.shape)}")
        self.A = A
        self.shape = (int(A.shape[-2]), int(A.shape[-1]))
        self._A2 = A.reshape(*A.shape[:-2], -1)
        self._moment: Tensor | None = None
        self._folded: Tensor | None = None

    def __len__(self) -> int:
        return int(self.A.shape[-3])

    @property
    def dtype(self) -> torch.dtype:
        return self.A.dtype

    @property
    def device(self) -> torch.device:
        return self.A.device

    def __call__(self, E: Tensor) -> Tensor:
        self._check_matrix("E", E)
        if math.prod(E.shape[:-2]) == 1 and math.prod(self._A2.shape[:-2]) == 1:  # one model: one gemv
            y = torch.mv(self._A2.reshape(self._A2.shape[-2:]), E.reshape(-1))
            lead = max(E.ndim, self._A2.ndim) - 2  # the broadcast leading dims, all of size 1
            return y.reshape((1,) * lead + y.shape) if lead else y
        # (..., 1, D) @ (..., D, n), not (..., n, D) @ (..., D, 1): torch's CPU batched matmul with one output column
        # takes a slow path (forward, and again in the backward for E): 3.7x slower at R = 2, batch 50, 60 x 60 and
        # 4.5x at R = 32 (benchmarks/measurements.py)
        e = E.reshape(*E.shape[:-2], 1, -1)
        return torch.matmul(e, self._A2.transpose(-1, -2)).squeeze(-2)

    def adjoint(self, r: Tensor) -> Tensor:
        self._check_residual(r)
        if r.ndim == 1 and self._A2.ndim == 2:  # one model: one gemv (a 1-row gemm packs all of A first)
            return torch.mv(self._A2.t(), r).reshape(self.shape)
        out = torch.matmul(r.unsqueeze(-2), self._A2).squeeze(-2)
        return out.reshape(*out.shape[:-1], *self.shape)

    def dense(self) -> Tensor:
        return self.A

    def fields(self) -> dict[str, Tensor]:
        """The tensors with one row per measurement (for splitting a batch into chunks, e.g. under ``vmap``)."""
        return {"A": self.A}

    def traces(self) -> Tensor:
        self._check_square_measurements()
        return self.A.diagonal(dim1=-2, dim2=-1).sum(-1)

    def second_moments(self) -> tuple[Tensor, Tensor]:
        self._check_unbatched("second_moments()")
        return torch.einsum("iab,icb->ac", self.A, self.A), torch.einsum("iab,iac->bc", self.A, self.A)

    def with_fields(self, fields: dict[str, Tensor]) -> Dense:
        """The same kind of measurements over other rows (the inverse of :meth:`fields`)."""
        return Dense._trusted(fields["A"])

    def subset(self, index: Tensor | slice, out: dict[str, Tensor] | None = None) -> Dense:
        A = self.A
        if not (isinstance(index, Tensor) and A.ndim == 3 and index.dtype != torch.bool):
            return Dense._trusted(A[index])
        # one gather (faster than advanced indexing), into the caller's buffer when it keeps one
        flat = index.reshape(-1)
        rows = (flat.numel(), *A.shape[1:])
        buf = None if out is None else out.get("A")
        if out is not None and (buf is None or tuple(buf.shape) != rows or buf.dtype != A.dtype
                                or buf.device != A.device):
            buf = out["A"] = torch.empty(rows, dtype=A.dtype, device=A.device)
        gathered = torch.index_select(A, 0, flat) if buf is None else torch.index_select(A, 0, flat, out=buf)
        return Dense._trusted(gathered.view(*index.shape, *A.shape[1:]))

    @classmethod
    def _trusted(cls, A: Tensor) -> Dense:
        """A ``Dense`` over ``A`` made from already checked measurements (a subset), without the checks."""
        out = object.__new__(cls)
        out.A = A
        out.shape = (int(A.shape[-2]), int(A.shape[-1]))
        out._A2 = A.reshape(*A.shape[:-2], -1)
        out._moment = out._folded = None
        return out

    def to(self, *args: Any, **kwargs: Any) -> Dense:
        device, dtype = _parse_to(args, kwargs)
        A = self.A.to(device=device, dtype=dtype)
        if A is self.A:
            return self
        out = Dense(A)
        if self._moment is not None:
            out._moment = self._moment.to(device=device, dtype=dtype)
        if self._folded is not None:
            out._folded = self._folded.to(device=device, dtype=dtype)
        return out

    # ---------------------------------------------------------------------------- curvature
    def _build_moment(self) -> Tensor:
        d_out, d_in = self.shape
        with torch.no_grad():
            S = self._A2.detach().T @ self._A2.detach()  # [(a,b), (e,c)]
            return S.reshape(d_out, d_in, d_out, d_in).permute(0, 2, 1, 3).reshape(d_out * d_out, d_in * d_in)

    def _check_unbatched(self, what: str) -> None:
        if self.A.ndim != 3:
            raise ValueError(f"{what} needs unbatched measurements of shape (n, d_out, d_in), got {tuple(self.A.shape)}")

    def moment(self) -> Tensor:
        r"""The cached fourth-moment matrix :math:`\Sigma` of shape ``(d_out^2, d_in^2)`` (built on first use)."""
        self._check_unbatched("moment()")
        if self._moment is None:
            self._moment = self._build_moment().contiguous()
        return self._moment

    def folded_moment(self) -> Tensor:
        r"""The fourth moment restricted to symmetric ``G`` and ``K``: :math:`\tilde\Sigma_{(a\le e),(b\le c)} =
        \frac12(\Sigma_{(a,e),(b,c)} + \Sigma_{(a,e),(c,b)})`, shape ``(d_out(d_out+1)/2, d_in(d_in+1)/2)``: about a
        quarter of :meth:`moment`'s size, so a quarter of the memory traffic per call (cached; built on first use)."""
        self._check_unbatched("folded_moment()")
        if self._folded is None:
            d_out, d_in = self.shape
            S = self._moment if self._moment is not None else self._build_moment()
            a, e = self._triu(d_out)
            b, c = self._triu(d_in)
            rows = a * d_out + e
            S = S.index_select(0, rows)
            self._folded = (0.5 * (S.index_select(1, b * d_in + c) + S.index_select(1, c * d_in + b))).contiguous()
        return self._folded

    def _triu(self, d: int) -> tuple[Tensor, Tensor]:
        i, j = torch.triu_indices(d, d, device=self.A.device)
        return i, j

    def _fold(self, M: Tensor) -> Tensor:
        """Upper triangle of symmetric ``M (..., d, d)`` with off-diagonal entries doubled, shape ``(..., d(d+1)/2)``."""
        d = M.shape[-1]
        i, j = self._triu(d)
        return M[..., i, j] * torch.where(i == j, 1.0, 2.0).to(M.dtype)

    def _moment_pays(self) -> bool:
        d_out, d_in = self.shape
        n = len(self)
        fits = (d_out * d_in) ** 2 * self.A.element_size() <= MOMENT_BUDGET_BYTES
        return fits and self.A.ndim == 3 and n * (d_in + d_out) > d_out * d_in

    def curvature(self, G: Tensor, K: Tensor, method: str = "auto", symmetric: bool = False) -> Tensor:
        r""":math:`\sum_i \operatorname{tr}(A_i G A_i^\top K)`; ``method`` is ``"auto"``, ``"moment"`` or ``"direct"``.

        ``symmetric=True`` promises that ``G`` and ``K`` are symmetric (as in the Hessian trace, ``G = P^T P`` and
        ``K = S S^T``), which lets the moment method use :meth:`folded_moment`.
        """
        d_out, d_in = self.shape
        self._check_square("G", G, d_in)
        self._check_square("K", K, d_out)
        check_choice("method", method, ("auto", "moment", "direct"))
        self._check_unbatched("curvature")
        if method == "moment" or (method == "auto" and self._moment_pays()):
            batch = torch.broadcast_shapes(G.shape[:-2], K.shape[:-2])
            if symmetric:
                return ((self._fold(K) @ self.folded_moment()) * self._fold(G)).sum(-1).expand(batch)
            S = self.moment()
            kt = K.transpose(-1, -2).reshape(*K.shape[:-2], d_out * d_out)
            g = G.reshape(*G.shape[:-2], d_in * d_in)
            return ((kt @ S) * g).sum(-1).expand(batch)
        AG = torch.matmul(self.A, G.unsqueeze(-3))  # (..., n, d_out, d_in)
        KA = torch.matmul(K.transpose(-1, -2).unsqueeze(-3), self.A)  # (..., n, d_out, d_in)
        return (AG * KA).sum(dim=(-3, -2, -1))


class RankOne(Measurements):
    r"""Rank-one measurements :math:`A_i = u_i v_i^\top`, ``u (n, d_out)``, ``v (n, d_in)``.

    :math:`f_i(E) = u_i^\top E v_i`, and ``curvature`` is
    :math:`\sum_i (v_i^\top G v_i)(u_i^\top K u_i)` in :math:`O(n (d_{in}^2 + d_{out}^2))`.
    Univariate regression is ``RankOne(torch.ones(n, 1), X)``; quadratic sensing is ``RankOne(x, x)``.
    """

    def __init__(self, u: Tensor, v: Tensor) -> None:
        check_tensor("u", u, min_ndim=2, floating=True, finite=True)
        check_tensor("v", v, min_ndim=2, floating=True, finite=True)
        if u.shape[:-1] != v.shape[:-1]:
            raise ValueError(f"u and v must have the same number of measurements, got u {tuple(u.shape)} and v {tuple(v.shape)}")
        if u.dtype != v.dtype or u.device != v.device:
            raise ValueError(f"u and v must share dtype and device, got {u.dtype}/{u.device} and {v.dtype}/{v.device}")
        if u.shape[-2] < 1 or u.shape[-1] < 1 or v.shape[-1] < 1:
            raise ValueError(f"u (n, d_out) and v (n, d_in) need positive sizes, got {tuple(u.shape)} and {tuple(v.shape)}")
        self.u, self.v = u, v
        self.shape = (int(u.shape[-1]), int(v.shape[-1]))

    def __len__(self) -> int:
        return int(self.u.shape[-2])

    @property
    def dtype(self) -> torch.dtype:
        return self.u.dtype

    @property
    def device(self) -> torch.device:
        return self.u.device

    def __call__(self, E: Tensor) -> Tensor:
        self._check_matrix("E", E)
        # (E v_i) for every i: (..., n, d_out); then the dot product with u_i.
        Ev = torch.matmul(self.v, E.transpose(-1, -2))
        return (Ev * self.u).sum(-1)

    def adjoint(self, r: Tensor) -> Tensor:
        self._check_residual(r)
        return torch.matmul((self.u * r.unsqueeze(-1)).transpose(-1, -2), self.v)

    def dense(self) -> Tensor:
        return self.u.unsqueeze(-1) * self.v.unsqueeze(-2)

    def fields(self) -> dict[str, Tensor]:
        return {"u": self.u, "v": self.v}

    def traces(self) -> Tensor:
        self._check_square_measurements()
        return (self.u * self.v).sum(-1)

    def second_moments(self) -> tuple[Tensor, Tensor]:
        # A_i A_i^T = ||v_i||^2 u_i u_i^T and A_i^T A_i = ||u_i||^2 v_i v_i^T
        vv, uu = self.v.square().sum(-1), self.u.square().sum(-1)
        return (self.u * vv.unsqueeze(-1)).transpose(-1, -2) @ self.u, (self.v * uu.unsqueeze(-1)).transpose(-1, -2) @ self.v

    def with_fields(self, fields: dict[str, Tensor]) -> RankOne:
        return RankOne._trusted(fields["u"], fields["v"])

    def subset(self, index: Tensor | slice, out: dict[str, Tensor] | None = None) -> RankOne:
        if isinstance(index, Tensor) and index.ndim == 1 and self.u.ndim == 2 and not index.dtype == torch.bool:
            return RankOne._trusted(torch.index_select(self.u, 0, index), torch.index_select(self.v, 0, index))
        return RankOne._trusted(self.u[index], self.v[index])

    @classmethod
    def _trusted(cls, u: Tensor, v: Tensor) -> RankOne:
        """A ``RankOne`` made from already checked measurements (a subset, fields), without the checks."""
        out = object.__new__(cls)
        out.u, out.v = u, v
        out.shape = (int(u.shape[-1]), int(v.shape[-1]))
        return out

    def to(self, *args: Any, **kwargs: Any) -> RankOne:
        device, dtype = _parse_to(args, kwargs)
        u, v = self.u.to(device=device, dtype=dtype), self.v.to(device=device, dtype=dtype)
        return self if (u is self.u and v is self.v) else RankOne(u, v)

    def curvature(self, G: Tensor, K: Tensor, symmetric: bool = False) -> Tensor:
        d_out, d_in = self.shape
        self._check_square("G", G, d_in)
        self._check_square("K", K, d_out)
        vGv = (torch.matmul(self.v, G) * self.v).sum(-1)  # (..., n)
        uKu = (torch.matmul(self.u, K) * self.u).sum(-1)
        return (vGv * uKu).sum(-1)


class Entries(Measurements):
    r"""Entry measurements :math:`A_i = e_{r_i} e_{c_i}^\top` (matrix completion): :math:`f_i(E) = E_{r_i c_i}`.

    ``curvature`` is :math:`\sum_i G_{c_i c_i} K_{r_i r_i}` in :math:`O(n)`. ``dtype`` only sets what ``dense()``
    returns; predictions take the dtype of ``E``.
    """

    _strict_dtype = False

    def __init__(self, rows: Tensor, cols: Tensor, shape: tuple[int, int], dtype: torch.dtype = torch.float32) -> None:
        check_tensor("rows", rows, min_ndim=1, integer=True)
        check_tensor("cols", cols, min_ndim=1, integer=True)
        if rows.shape != cols.shape:
            raise ValueError(f"rows and cols must have the same shape, got {tuple(rows.shape)} and {tuple(cols.shape)}")
        if rows.device != cols.device:
            raise ValueError(f"rows and cols must be on one device, got {rows.device} and {cols.device}")
        if (not isinstance(shape, (tuple, list)) or len(shape) != 2
                or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)):
            raise ValueError(f"shape must be a pair of positive ints (d_out, d_in), got {shape!r}")
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= shape[0]):
            raise ValueError(f"rows must lie in [0, {shape[0]}), got values in [{int(rows.min())}, {int(rows.max())}]")
        if cols.numel() and (int(cols.min()) < 0 or int(cols.max()) >= shape[1]):
            raise ValueError(f"cols must lie in [0, {shape[1]}), got values in [{int(cols.min())}, {int(cols.max())}]")
        if not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating point dtype, got {dtype}")
        self.rows, self.cols = rows.long(), cols.long()
        self.shape = (int(shape[0]), int(shape[1]))
        self._dtype = dtype
        self._flat = self.rows * self.shape[1] + self.cols

    def __len__(self) -> int:
        return int(self.rows.shape[-1])

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self.rows.device

    def __call__(self, E: Tensor) -> Tensor:
        self._check_matrix("E", E)
        flat = E.reshape(*E.shape[:-2], -1)
        if flat.ndim == 1 or self._flat.ndim == 1:
            return flat[..., self._flat]
        batch = torch.broadcast_shapes(flat.shape[:-1], self._flat.shape[:-1])
        return torch.gather(flat.expand(*batch, -1), -1, self._flat.expand(*batch, -1))

    def adjoint(self, r: Tensor) -> Tensor:
        self._check_residual(r)
        d_out, d_in = self.shape
        batch = torch.broadcast_shapes(r.shape[:-1], self._flat.shape[:-1])
        out = r.new_zeros(*batch, d_out * d_in)
        out.scatter_add_(-1, self._flat.expand(*batch, -1), r.expand(*batch, -1))
        return out.reshape(*batch, d_out, d_in)

    def dense(self) -> Tensor:
        d_out, d_in = self.shape
        out = torch.zeros(*self._flat.shape, d_out * d_in, dtype=self._dtype, device=self.device)
        out.scatter_(-1, self._flat.unsqueeze(-1), 1.0)
        return out.reshape(*self._flat.shape, d_out, d_in)

    def subset(self, index: Tensor | slice, out: dict[str, Tensor] | None = None) -> Entries:
        return self.with_fields({"rows": self.rows[index], "cols": self.cols[index]})

    def fields(self) -> dict[str, Tensor]:
        return {"rows": self.rows, "cols": self.cols}

    def traces(self) -> Tensor:
        self._check_square_measurements()
        return (self.rows == self.cols).to(self._dtype)

    def second_moments(self) -> tuple[Tensor, Tensor]:
        # e_r e_c^T (e_r e_c^T)^T = e_r e_r^T: the diagonal row and column counts
        d_out, d_in = self.shape
        rows = torch.bincount(self.rows.reshape(-1), minlength=d_out).to(self._dtype)
        cols = torch.bincount(self.cols.reshape(-1), minlength=d_in).to(self._dtype)
        return torch.diag(rows), torch.diag(cols)

    def with_fields(self, fields: dict[str, Tensor]) -> Entries:
        # Rows of already checked entries: skip the range checks (they sync with the device and fail under vmap).
        out = object.__new__(Entries)
        out.rows, out.cols, out.shape, out._dtype = fields["rows"], fields["cols"], self.shape, self._dtype
        out._flat = out.rows * self.shape[1] + out.cols
        return out

    def to(self, *args: Any, **kwargs: Any) -> Entries:
        device, dtype = _parse_to(args, kwargs)
        rows = self.rows.to(device=device)
        if rows is self.rows and (dtype is None or dtype == self._dtype):
            return self
        return Entries(rows, self.cols.to(device=device), self.shape, dtype=dtype or self._dtype)

    def curvature(self, G: Tensor, K: Tensor, symmetric: bool = False) -> Tensor:
        d_out, d_in = self.shape
        self._check_square("G", G, d_in)
        self._check_square("K", K, d_out)
        g = G.diagonal(dim1=-2, dim2=-1)[..., self.cols]
        k = K.diagonal(dim1=-2, dim2=-1)[..., self.rows]
        return (g * k).sum(-1)


class MeasurementBatch:
    r"""One training batch: a measurement operator (usually a ``subset``) and its targets.

    This is what the datamodules yield and what the models' ``loss(batch)`` reads. It moves with
    ``.to(device)`` (so Lightning's batch transfer handles it) and is mutable, so that a callback such as
    :class:`~lightning_flat.callbacks.LabelNoise` can replace ``targets`` for one step without touching the stored
    dataset. ``index`` holds the sampled measurement indices (``None`` for a full batch).
    """

    __slots__ = ("measurements", "targets", "index")

    def __init__(self, measurements: Measurements, targets: Tensor, index: Tensor | None = None) -> None:
        self.measurements, self.targets, self.index = measurements, targets, index

    def to(self, *args: Any, **kwargs: Any) -> MeasurementBatch:
        device, dtype = _parse_to(args, kwargs)
        m = self.measurements.to(device=device, dtype=dtype)
        t = self.targets.to(device=device, dtype=dtype)
        if m is self.measurements and t is self.targets:
            return self
        i = None if self.index is None else self.index.to(device=device)
        return MeasurementBatch(m, t, i)

    def __len__(self) -> int:
        return int(self.targets.shape[-1])

    def fields(self) -> dict[str, Tensor]:
        """The batch as a dict of tensors with the examples along dim 0 (see :meth:`with_fields`)."""
        return {**self.measurements.fields(), "targets": self.targets}

    def with_fields(self, fields: dict[str, Tensor]) -> MeasurementBatch:
        """A batch of the same kind over other rows, e.g. one chunk of ``fields()`` split along dim 0."""
        rest = {k: v for k, v in fields.items() if k != "targets"}
        return MeasurementBatch(self.measurements.with_fields(rest), fields["targets"])

    def __repr__(self) -> str:
        return f"MeasurementBatch({self.measurements!r}, targets={tuple(self.targets.shape)})"


def unpack_batch(batch: Any) -> tuple[Measurements, Tensor]:
    """``(measurements, targets)`` from a :class:`MeasurementBatch`, a dict with those keys or a pair."""
    if isinstance(batch, MeasurementBatch):
        return batch.measurements, batch.targets
    if isinstance(batch, dict) and "measurements" in batch and "targets" in batch:
        return batch["measurements"], batch["targets"]
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[0], Measurements):
        return batch[0], batch[1]
    raise TypeError(
        "batch must be a MeasurementBatch, a dict with 'measurements' and 'targets', or a pair "
        f"(Measurements, targets), got {type(batch).__name__}"
    )
