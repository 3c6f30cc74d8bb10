"""LightningDataModules that generate measurement problems."""

from lightning_flat.datamodules.base import MeasurementDataModule, MeasurementSampler
from lightning_flat.datamodules.entries import ObservedEntriesDataModule
from lightning_flat.datamodules.matrix_sensing import MatrixSensingDataModule
from lightning_flat.datamodules.recovery import (
    BilinearSensingDataModule,
    MatrixCompletionDataModule,
    QuadraticSensingDataModule,
)
from lightning_flat.datamodules.regression import UnivariateRegressionDataModule


__all__ = [
    "BilinearSensingDataModule",
    "MatrixCompletionDataModule",
    "MatrixSensingDataModule",
    "MeasurementDataModule",
    "MeasurementSampler",
    "ObservedEntriesDataModule",
    "QuadraticSensingDataModule",
    "UnivariateRegressionDataModule",
]
