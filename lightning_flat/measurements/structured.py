r"""Structured measurements: rank-one $A_i = u_iv_i^\top$ and single entries $A_i = e_{r_i}e_{c_i}^\top$."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_flat._checks import check_tensor
from lightning_flat.measurements.base import Measurements, _parse_to

__all__ = ["RankOne", "Entries"]


class RankOne(Measurements):
    r"""Rank-one measurements $A_i = u_i v_i^\top$, ``u (n, d_out)``, ``v (n, d_in)``.

    $f_i(E) = u_i^\top E v_i$, and ``curvature`` is
    $\sum_i (v_i^\top G v_i)(u_i^\top K u_i)$ in $O(n (d_{in}^2 + d_{out}^2))$.
    Univariate regression is ``RankOne(torch.ones(n, 1), X)``; quadratic sensing is ``RankOne(x, x)``.
    """

    def __init__(self, u: Tensor, v: Tensor) -> None:
        check_tensor("u", u, min_ndim=2, floating=True, finite=True)
        check_tensor("v", v, min_ndim=2, floating=True, finite=True)
        if u.shape[:-1] != v.shape[:-1]:
            raise ValueError(f"u and v must have the same number of measurements, got u {tuple(u.shape)} and "
                             f"v {tuple(v.shape)}")
        if u.dtype != v.dtype or u.device != v.device:
            raise ValueError(f"u and v must share dtype and device, got {u.dtype}/{u.device} and {v.dtype}/{v.device}")
        if u.shape[-2] < 1 or u.shape[-1] < 1 or v.shape[-1] < 1:
            raise ValueError(f"u (n, d_out) and v (n, d_in) need positive sizes, got {tuple(u.shape)} and "
                             f"{tuple(v.shape)}")
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
        return ((self.u * vv.unsqueeze(-1)).transpose(-1, -2) @ self.u,
                (self.v * uu.unsqueeze(-1)).transpose(-1, -2) @ self.v)

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
    r"""Entry measurements $A_i = e_{r_i} e_{c_i}^\top$ (matrix completion): $f_i(E) = E_{r_i c_i}$.

    ``curvature`` is $\sum_i G_{c_i c_i} K_{r_i r_i}$ in $O(n)$. ``dtype`` only sets what ``dense()``
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
