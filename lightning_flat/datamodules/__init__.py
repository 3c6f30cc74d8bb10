"""LightningDataModules that generate measurement problems."""

from lightning_flat.datamodules.base import MeasurementDataModule, MeasurementSampler
from lightning_flat.datamodules.matrix_sensing import MatrixSensingDataModule

__all__ = ["MatrixSensingDataModule", "MeasurementDataModule", "MeasurementSampler"]
