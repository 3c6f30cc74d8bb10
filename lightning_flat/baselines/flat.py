r"""The flat relaxation of low-rank recovery (Ding, Drusvyatskiy, Fazel 2022, eq. 5), solved in its Y-form (eq. 21).

$$
\hat X = \arg\min_X \|D_1XD_2\|_* \ \text{s.t.}\ \langle A_i, X\rangle = b_i
\iff \hat Y = \arg\min_Y \|Y\|_* \ \text{s.t.}\ \langle D_1^{-1}A_iD_2^{-1}, Y\rangle = b_i,\
\hat X = D_1^{-1}\hat YD_2^{-1},
$$

with the rescaling matrices of `lightning_flat.functional.rescaling_matrices`. The Y-form is a plain nuclear
norm problem ([`min_nuclear_norm`][lightning_flat.baselines.min_nuclear_norm]); solvers fail on the direct form
``normNuc(D1 @ X @ D2)``. Measurement structure is kept: ``RankOne`` and ``Entries`` become ``RankOne`` measurements
with rescaled vectors.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from lightning_flat.baselines.nuclear import min_nuclear_norm
from lightning_flat.functional.flat import is_singular, rescaling_matrices
from lightning_flat.measurements import Dense, Entries, Measurements, RankOne

__all__ = ["flat_relaxation", "SingularRescalingError"]


class SingularRescalingError(ValueError):
    """D1 or D2 is singular (an empty row or column in completion, fewer rank-one measurements than the dimension):
    the flat relaxation is not defined."""


def _rescaled(measurements: Measurements, D1inv: Tensor, D2inv: Tensor) -> Measurements:
    if isinstance(measurements, Dense):
        return Dense(D1inv @ measurements.A @ D2inv)
    if isinstance(measurements, RankOne):
        return RankOne(measurements.u @ D1inv, measurements.v @ D2inv)  # D^-1 symmetric
    if isinstance(measurements, Entries):
        return RankOne(D1inv[measurements.rows], D2inv[measurements.cols])
    return Dense(D1inv @ measurements.dense() @ D2inv)


def flat_relaxation(measurements: Measurements, targets: Tensor, *, return_parts: bool = False,
                    cache_dir: str | os.PathLike | None = None, **solver_kwargs) -> Tensor | dict[str, Tensor]:
    r"""Solve the flat relaxation $\min\|D_1XD_2\|_*$ s.t. $\mathcal A(X) = b$ through its Y-form.

    Returns ``X`` (``(d_out, d_in)``, dtype and device of ``targets``), or with ``return_parts`` a dict with ``X``,
    ``Y = D1 X D2``, ``D1``, ``D2``. Raises [`SingularRescalingError`][lightning_flat.baselines.SingularRescalingError]
    when D1 or D2 is singular. ``solver_kwargs`` go to [`min_nuclear_norm`][lightning_flat.baselines.min_nuclear_norm]
    (``solver``, ``eps``, ``verbose``).

    References:
        Ding, Drusvyatskiy, Fazel (2022), eqs. 4, 5 and 21, Thm 3.2.
    """
    if not isinstance(measurements, Measurements):
        raise TypeError(f"measurements must be a lightning_flat Measurements, got {type(measurements).__name__}")
    f64 = torch.float64
    meas = measurements.to(device="cpu", dtype=f64)
    D1, D2 = rescaling_matrices(meas)
    for name, D in (("D1", D1), ("D2", D2)):
        if is_singular(D):
            raise SingularRescalingError(f"{name} is singular (lambda_min(D^2) <= 1e-12 lambda_max(D^2)): the flat "
                                         "relaxation is not defined for these measurements")
    D1inv, D2inv = torch.linalg.inv(D1), torch.linalg.inv(D2)
    D1inv, D2inv = (D1inv + D1inv.T) / 2, (D2inv + D2inv.T) / 2
    Y = min_nuclear_norm(_rescaled(meas, D1inv, D2inv), targets.detach().to("cpu", f64), cache_dir=cache_dir,
                         **solver_kwargs)
    X = D1inv @ Y @ D2inv
    out = X.to(dtype=targets.dtype, device=targets.device)
    if return_parts:
        return {"X": out, "Y": Y, "D1": D1, "D2": D2}
    return out
