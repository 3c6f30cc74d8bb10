"""Dense measurements: every $A_i$ given as a matrix (Gaussian matrix sensing)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from lightning_flat._checks import check_choice, check_tensor
from lightning_flat.measurements.base import Measurements, _parse_to

__all__ = ["Dense", "MOMENT_BUDGET_BYTES"]

#: Largest fourth-moment matrix (in bytes) that [`Dense.curvature`][lightning_flat.measurements.Dense.curvature] caches
#: for the ``"moment"`` method.
MOMENT_BUDGET_BYTES = 512 * 2**20



class Dense(Measurements):
    r"""Dense measurement matrices ``A`` of shape ``(n, d_out, d_in)``; $f_i(E) = \langle A_i, E\rangle$.

    ``curvature`` has two exact methods:

    - ``"direct"``: $\sum_i \langle A_i G, K^\top A_i\rangle$ with two batched matmuls,
      $O(n\, d_{out} d_{in} (d_{in} + d_{out}))$ per pair ``(G, K)``;
    - ``"moment"``: $\operatorname{vec}(K^\top)^\top\, \Sigma\, \operatorname{vec}(G)$ with the fourth-moment
      matrix $\Sigma_{(a,e),(b,c)} = \sum_i (A_i)_{ab} (A_i)_{ec}$ of shape ``(d_out^2, d_in^2)``, built once
      (cost $n\, d_{out}^2 d_{in}^2$) and cached; each call then costs $O(d_{out}^2 d_{in}^2)$,
      independent of ``n``.

    ``"auto"`` (default) takes ``"moment"`` when it is cheaper per call and $\Sigma$ fits in
    `MOMENT_BUDGET_BYTES`. With ``symmetric=True`` (symmetric ``G`` and ``K``, as in the Hessian trace) only the
    [`folded_moment`][lightning_flat.measurements.Dense.folded_moment] over upper triangles is kept: at the Gatmiry size
    (n=600, 60x60) 27 MB in float64 instead of 104 MB, and a quarter of the memory traffic per call.

    Examples:
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
        """The same kind of measurements over other rows (the inverse of
        [`fields`][lightning_flat.measurements.Dense.fields])."""
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
            raise ValueError(f"{what} needs unbatched measurements of shape (n, d_out, d_in), "
                             f"got {tuple(self.A.shape)}")

    def moment(self) -> Tensor:
        r"""The cached fourth-moment matrix $\Sigma$ of shape ``(d_out^2, d_in^2)`` (built on first use)."""
        self._check_unbatched("moment()")
        if self._moment is None:
            self._moment = self._build_moment().contiguous()
        return self._moment

    def folded_moment(self) -> Tensor:
        r"""The fourth moment restricted to symmetric ``G`` and ``K``: $\tilde\Sigma_{(a\le e),(b\le c)} =
        \frac12(\Sigma_{(a,e),(b,c)} + \Sigma_{(a,e),(c,b)})$, shape ``(d_out(d_out+1)/2, d_in(d_in+1)/2)``: about a
        quarter of [`moment`][lightning_flat.measurements.Dense.moment]'s size, so a quarter of the memory traffic per
        call (cached; built on first use)."""
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
        """Upper triangle of symmetric ``M (..., d, d)`` with off-diagonal entries doubled, shape
        ``(..., d(d+1)/2)``."""
        d = M.shape[-1]
        i, j = self._triu(d)
        return M[..., i, j] * torch.where(i == j, 1.0, 2.0).to(M.dtype)

    def _moment_pays(self) -> bool:
        d_out, d_in = self.shape
        n = len(self)
        fits = (d_out * d_in) ** 2 * self.A.element_size() <= MOMENT_BUDGET_BYTES
        return fits and self.A.ndim == 3 and n * (d_in + d_out) > d_out * d_in

    def curvature(self, G: Tensor, K: Tensor, method: str = "auto", symmetric: bool = False) -> Tensor:
        r"""$\sum_i \operatorname{tr}(A_i G A_i^\top K)$; ``method`` is ``"auto"``, ``"moment"`` or ``"direct"``.

        ``symmetric=True`` promises that ``G`` and ``K`` are symmetric (as in the Hessian trace, ``G = P^T P`` and
        ``K = S S^T``), which lets the moment method use
        [`folded_moment`][lightning_flat.measurements.Dense.folded_moment].
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
