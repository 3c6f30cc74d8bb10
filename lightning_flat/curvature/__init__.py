"""Curvature sources: where the curvature callbacks' reads come from, behind one interface
([`CurvatureSource`][lightning_flat.curvature.CurvatureSource]), closed forms on the lightning_flat models and
Hessian-vector products on any other LightningModule."""

from __future__ import annotations

from typing import Any

from lightning_flat.curvature.base import CurvatureOptions, CurvatureSource, LayerTraces, Operator
from lightning_flat.curvature.closed_form import ClosedFormCurvature, ClosedFormSource
from lightning_flat.curvature.generic import ModuleSource
from lightning_flat.engine.module_loss import LossFn

__all__ = ["ClosedFormCurvature", "ClosedFormSource", "CurvatureOptions", "CurvatureSource", "LayerTraces",
           "ModuleSource", "Operator", "curvature_source"]


def curvature_source(module: Any, options: CurvatureOptions, loss_fn: LossFn | None = None, batch: Any = None,
                     who: str = "this callback") -> CurvatureSource:
    """The source for ``module``: its closed forms when it offers them
    ([`ClosedFormCurvature`][lightning_flat.curvature.ClosedFormCurvature], the lightning_flat models), else
    Hessian-vector products of ``loss_fn`` ([`ModuleSource`][lightning_flat.curvature.ModuleSource]).

    Raises:
        ValueError: ``loss_fn``, ``batch``, ``batches`` or ``gauss_newton`` given for a lightning_flat model (its
            exact Hessian of the full measurement loss is measured), or ``measurements`` for another module.
    """
    if isinstance(module, ClosedFormCurvature):
        given = [name for name, value in (("loss_fn", loss_fn), ("batch", batch),
                                          ("gauss_newton", options.gauss_newton)) if value is not None]
        given += ["batches"] if options.batches != 1 else []
        if given:
            raise ValueError(f"{who}: {', '.join(given)} is for modules other than the lightning_flat models; on "
                             f"{type(module).__name__} the exact Hessian of the full measurement loss is measured")
        return ClosedFormSource(module, options)
    if options.measurements is not None:
        raise ValueError(f"{who}: CurvatureOptions(measurements=...) is for the lightning_flat models; "
                         f"{type(module).__name__}'s curvature comes from loss_fn on its training batches")
    return ModuleSource(module, options, loss_fn, batch, who)
