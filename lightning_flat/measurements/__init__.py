r"""Linear measurement operators $\mathcal A: \mathbb R^{d_{out}\times d_{in}} \to \mathbb R^n$.

One small class family with one interface, used by the datamodules (to make targets and batches), by the
models (to predict) and by the curvature core (the exact Hessian trace):

- [`Dense`][lightning_flat.measurements.Dense]: $A_i$ given as a tensor of shape ``(n, d_out, d_in)`` (Gaussian matrix
  sensing);
- [`RankOne`][lightning_flat.measurements.RankOne]: $A_i = u_i v_i^\top$ (bilinear sensing, quadratic sensing with
  ``u = v``, univariate regression with ``d_out = 1`` and ``u_i = 1``);
- [`Entries`][lightning_flat.measurements.Entries]: $A_i = e_{r_i} e_{c_i}^\top$ (matrix completion).

Every class offers

- ``__call__(E) -> (..., n)``: predictions $\langle A_i, E\rangle$;
- ``adjoint(r) -> (..., d_out, d_in)``: $\sum_i r_i A_i$;
- ``curvature(G, K) -> (...)``: $\sum_i \operatorname{tr}(A_i G A_i^\top K)$ for ``G (..., d_in, d_in)`` and
  ``K (..., d_out, d_out)``, in the cheapest form for the structure. With $G = P^\top P$ and $K = S S^\top$
  this is $\sum_i \|S^\top A_i P^\top\|_F^2$, the building block of the exact Hessian trace of a deep linear
  network (see [`lightning_flat.functional.hessian_trace`][lightning_flat.functional.hessian_trace]);
- ``subset(index)``, ``__len__``, ``shape`` (``(d_out, d_in)``), ``.to(device/dtype)`` and ``dense()``.

``E``, ``G``, ``K`` and ``r`` may carry leading batch dimensions (replicas); results carry them too.
The measurement tensors themselves may carry leading batch dimensions as well (a per-replica minibatch made by
``subset`` with an index of shape ``(R, B)``); ``__call__`` and ``adjoint`` broadcast over them.

Measurements are immutable: the classes cache derived tensors (e.g. [`Dense`][lightning_flat.measurements.Dense]'s
fourth-moment matrix used by ``curvature``), so do not modify the tensors passed in after construction.
"""

from lightning_flat.measurements.base import MeasurementBatch, Measurements, unpack_batch
from lightning_flat.measurements.dense import MOMENT_BUDGET_BYTES, Dense
from lightning_flat.measurements.structured import Entries, RankOne

__all__ = ["Measurements", "Dense", "RankOne", "Entries", "MeasurementBatch", "unpack_batch", "MOMENT_BUDGET_BYTES"]
