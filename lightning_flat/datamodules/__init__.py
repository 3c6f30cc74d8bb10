"""LightningDataModules that generate measurement problems."""

from lightning_flat.datamodules.base import MeasurementDataModule, MeasurementSampler, StepChunk
from lightning_flat.datamodules.matrix_sensing import MatrixSensingDataModule
from lightning_flat.datamodules.recovery import (
    BilinearSensingDataModule,
    MatrixCompletionDataModule,
    QuadraticSensingDataModule,
)

__all__ = [
    "BilinearSensingDataModule",
    "MatrixCompletionDataModule",
    "MatrixSensingDataModule",
    "MeasurementDataModule",
    "MeasurementSampler",
    "QuadraticSensingDataModule",
    "StepChunk",
]
