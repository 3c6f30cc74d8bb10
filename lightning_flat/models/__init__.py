"""LightningModules: deep linear networks read through measurement operators."""

from lightning_flat._environment import use_leaf_spec_function
from lightning_flat.models.base import LinearNetBase
from lightning_flat.models.deep_linear import DeepLinearNet
from lightning_flat.models.quadratic import QuadraticNet
from lightning_flat.models.residual import ResidualLinearNet

use_leaf_spec_function()  # no LeafSpec deprecation warning at every fit (see lightning_flat._environment)

__all__ = ["DeepLinearNet", "LinearNetBase", "QuadraticNet", "ResidualLinearNet"]
