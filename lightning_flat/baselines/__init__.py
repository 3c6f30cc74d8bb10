"""Convex baselines: the minimum nuclear norm interpolant and the flat relaxation (cvxpy)."""

from lightning_flat.baselines.flat import SingularRescalingError, flat_relaxation
from lightning_flat.baselines.nuclear import SOLVERS, min_nuclear_norm

__all__ = ["SOLVERS", "SingularRescalingError", "flat_relaxation", "min_nuclear_norm"]
