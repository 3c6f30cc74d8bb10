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

from lightning_flat.measurements.base import MeasurementBatch, Measurements, unpack_batch
from lightning_flat.measurements.dense import MOMENT_BUDGET_BYTES, Dense
from lightning_flat.measurements.structured import Entries, RankOne

__all__ = ["Measurements", "Dense", "RankOne", "Entries", "MeasurementBatch", "unpack_batch", "MOMENT_BUDGET_BYTES"]
