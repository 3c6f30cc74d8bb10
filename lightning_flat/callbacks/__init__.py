"""Lightning callbacks: measure curvature and structure, change training (label noise, schedules, guard), progress."""

from lightning_flat.callbacks.base import MeasuringCallback
from lightning_flat.callbacks.curvature import CurvatureCallback, HessianTrace, Sharpness
from lightning_flat.callbacks.spectra import EigenvaluesAbove, PreconditionedSharpness, SpectralDensity
from lightning_flat.curvature import CurvatureOptions
from lightning_flat.callbacks.guard import FiniteLossGuard
from lightning_flat.callbacks.label_noise import LabelNoise
from lightning_flat.callbacks.progress import StepProgressBar
from lightning_flat.callbacks.sam import SAM
from lightning_flat.callbacks.schedule import HyperparameterSchedule
from lightning_flat.callbacks.structure import (
    ApproximateRank,
    Balancedness,
    EffectiveRank,
    MatrixNorms,
    SingularValues,
)


__all__ = [
    "ApproximateRank",
    "Balancedness",
    "CurvatureCallback",
    "CurvatureOptions",
    "EffectiveRank",
    "EigenvaluesAbove",
    "FiniteLossGuard",
    "HessianTrace",
    "HyperparameterSchedule",
    "LabelNoise",
    "MatrixNorms",
    "MeasuringCallback",
    "PreconditionedSharpness",
    "SAM",
    "Sharpness",
    "SingularValues",
    "SpectralDensity",
    "StepProgressBar",
]
