"""Convex baselines solved with cvxpy: the minimum nuclear norm interpolant (and, later, the flat relaxation)."""

from lightning_flat.baselines.nuclear import min_nuclear_norm

__all__ = ["min_nuclear_norm"]
