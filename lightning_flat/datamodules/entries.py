"""A matrix with some entries observed: the completion problem written out by hand (e.g. a 2 x 2 matrix with one
missing entry), usable from YAML."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_flat.datamodules.base import MeasurementDataModule
from lightning_flat.measurements import Entries

__all__ = ["ObservedEntriesDataModule"]

F64 = torch.float64


def _matrix(name: str, value, allow_missing: bool) -> list[list[float | None]]:
    if isinstance(value, Tensor):
        value = value.tolist()
    ok = (isinstance(value, Sequence) and not isinstance(value, str) and len(value) > 0
          and all(isinstance(row, Sequence) and not isinstance(row, str) for row in value))
    if not ok or len({len(row) for row in value}) != 1 or len(value[0]) == 0:
        raise ValueError(f"{name} must be a non-empty list of rows of one length, got {value!r}")
    out = []
    for i, row in enumerate(value):
        out.append([])
        for j, x in enumerate(row):
            if x is None and allow_missing:
                out[-1].append(None)
                continue
            if isinstance(x, bool) or not isinstance(x, numbers.Real) or not math.isfinite(float(x)):
                what = "a finite number or null (missing)" if allow_missing else "a finite number"
                raise ValueError(f"{name}[{i}][{j}] must be {what}, got {x!r}")
            out[-1].append(float(x))
    return out


class ObservedEntriesDataModule(MeasurementDataModule):
    r"""Matrix completion of a given partially observed matrix: ``observed`` lists the rows of the matrix with
    ``None`` (YAML ``null``) at the missing entries; the measurements are
    [`Entries`][lightning_flat.measurements.Entries] over the observed cells (row-major order) and the targets their
    values.

    Example, two of three entries fixed and one missing (the 2 x 2 problem of rank-jump studies):

        ObservedEntriesDataModule(observed=[[1.0, None], [0.25, 1.0]], ground_truth=[[1.0, 4.0], [0.25, 1.0]],
                                  batch_size=1)

    With ``ground_truth`` (the full matrix, agreeing with ``observed`` where observed), ``test_error(E)`` is the
    squared error on the **missing** entries, $\|P_{\Omega^c}(E - M)\|_F^2$, and ``test_error_scale()`` that of
    the zero-filled matrix, $\|P_{\Omega^c}M\|_F^2$, so the model's ``test/relative_error`` is the error
    relative to zero filling.

    Args:
        observed: rows of the matrix, ``None`` where an entry is missing (at least one entry observed).
        ground_truth: the full matrix, or ``None``.
        batch_size: see [`MeasurementDataModule`][lightning_flat.datamodules.MeasurementDataModule] (``batch_size=None``
            is full-batch gradient descent).
        seed: see [`MeasurementDataModule`][lightning_flat.datamodules.MeasurementDataModule].
        steps_per_epoch: see [`MeasurementDataModule`][lightning_flat.datamodules.MeasurementDataModule].
        sampling: see [`MeasurementDataModule`][lightning_flat.datamodules.MeasurementDataModule].
    """

    def __init__(self, observed: list[list[float | None]], ground_truth: list[list[float]] | None = None,
                 batch_size: int | None = 1, seed: int = 0, steps_per_epoch: int = 1000,
                 sampling: str = "replacement") -> None:
        super().__init__(batch_size=batch_size, seed=seed, steps_per_epoch=steps_per_epoch, sampling=sampling)
        rows = _matrix("observed", observed, allow_missing=True)
        shape = (len(rows), len(rows[0]))
        cells = [(i, j, x) for i, row in enumerate(rows) for j, x in enumerate(row) if x is not None]
        if not cells:
            raise ValueError("observed must have at least one observed (non-null) entry")
        self.save_hyperparameters(logger=False)
        self.mask = torch.tensor([[x is not None for x in row] for row in rows])
        r, c, v = zip(*cells)
        self.measurements = Entries(torch.tensor(r), torch.tensor(c), shape, dtype=F64)
        self.targets = torch.tensor(v, dtype=F64)
        self.n = len(cells)
        if ground_truth is not None:
            truth = torch.tensor(_matrix("ground_truth", ground_truth, allow_missing=False), dtype=F64)
            if tuple(truth.shape) != shape:
                raise ValueError(f"ground_truth must have the shape of observed, {shape}, got {tuple(truth.shape)}")
            if not torch.equal(truth[self.mask], self.targets):
                raise ValueError(f"ground_truth must agree with observed on the observed entries: observed "
                                 f"{self.targets.tolist()}, ground_truth has {truth[self.mask].tolist()}")
            self.ground_truth = truth

    def test_error(self, E: Tensor) -> Tensor:
        """Squared error on the missing entries, shape ``(...)`` for ``E (..., d_out, d_in)``."""
        if self.ground_truth is None:
            raise ValueError("test_error needs ground_truth= (the full matrix)")
        missing = (~self.mask).to(device=E.device, dtype=E.dtype)
        return ((E - self.ground_truth.to(E)) * missing).square().sum((-2, -1))

    def test_error_scale(self) -> float:
        r"""The test error of the zero-filled matrix, $\|P_{\Omega^c}M\|_F^2$."""
        if self.ground_truth is None:
            raise ValueError("test_error_scale needs ground_truth= (the full matrix)")
        return float(self.test_error(torch.zeros_like(self.ground_truth)))
