"""LightningModules: deep linear networks read through measurement operators."""

from lightning_flat.models.base import LinearNetBase
from lightning_flat.models.deep_linear import DeepLinearNet
from lightning_flat.models.quadratic import QuadraticNet
from lightning_flat.models.residual import ResidualLinearNet


__all__ = ["DeepLinearNet", "LinearNetBase", "QuadraticNet", "ResidualLinearNet"]
