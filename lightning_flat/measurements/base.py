"""The interface of the measurement operators ([`Measurements`][lightning_flat.measurements.Measurements]) and the
batches the datamodules yield."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["Measurements", "MeasurementBatch", "unpack_batch"]


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
        """``sum_i tr(A_i G A_i^T K)``; ``symmetric=True`` promises symmetric ``G`` and ``K`` (a faster path may use
        it)."""
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
        r"""$\operatorname{tr}(A_i)$ for every measurement, shape ``(n,)`` (square measurements only)."""
        raise NotImplementedError

    def second_moments(self) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        r"""$(\sum_i A_iA_i^\top, \sum_i A_i^\top A_i)$, shapes ``(d_out, d_out)`` and ``(d_in, d_in)``."""
        raise NotImplementedError

    def _check_square_measurements(self) -> None:
        if self.shape[0] != self.shape[1]:
            raise ValueError(f"traces need square measurements, got shape {self.shape}")

    def with_fields(self, fields: dict[str, Tensor]) -> Measurements:  # pragma: no cover - abstract
        """The same kind of measurements over other rows (the inverse of
        [`fields`][lightning_flat.measurements.Measurements.fields])."""
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


class MeasurementBatch:
    r"""One training batch: a measurement operator (usually a ``subset``) and its targets.

    This is what the datamodules yield and what the models' ``loss(batch)`` reads. It moves with
    ``.to(device)`` (so Lightning's batch transfer handles it) and is mutable, so that a callback such as
    [`LabelNoise`][lightning_flat.callbacks.LabelNoise] can replace ``targets`` for one step without touching the stored
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
        """The batch as a dict of tensors with the examples along dim 0 (see
        [`with_fields`][lightning_flat.measurements.MeasurementBatch.with_fields])."""
        return {**self.measurements.fields(), "targets": self.targets}

    def with_fields(self, fields: dict[str, Tensor]) -> MeasurementBatch:
        """A batch of the same kind over other rows, e.g. one chunk of ``fields()`` split along dim 0."""
        rest = {k: v for k, v in fields.items() if k != "targets"}
        return MeasurementBatch(self.measurements.with_fields(rest), fields["targets"])

    def __repr__(self) -> str:
        return f"MeasurementBatch({self.measurements!r}, targets={tuple(self.targets.shape)})"


def unpack_batch(batch: Any) -> tuple[Measurements, Tensor]:
    """``(measurements, targets)`` from a [`MeasurementBatch`][lightning_flat.measurements.MeasurementBatch], a dict
    with those keys or a pair."""
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
