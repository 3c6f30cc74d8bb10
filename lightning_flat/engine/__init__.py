"""The training machinery the lightning_flat models share: replicas and their random streams, the step interface
that per-step callbacks use (run by the engine inside fused chunks, and by one driver from Lightning's hooks
elsewhere), analytic steps and fused chunks, and [`ReplicaSGD`][lightning_flat.engine.ReplicaSGD]."""

from lightning_flat.engine import compat
from lightning_flat.engine.grid import ReplicaGrid
from lightning_flat.engine.hooks import PHASES, BoundaryHook, StepContext, StepHook, StepOracle, scheduled_hparams
from lightning_flat.engine.interfaces import EngineDriven, MeasurementProblem, StepChunk, StepPlan, WeightLoss
from lightning_flat.engine.loop import MODES, TrainingEngine, unknown_per_step_hooks
from lightning_flat.engine.module_loss import ModuleOracle, training_step_loss
from lightning_flat.engine.optim import ReplicaSGD
from lightning_flat.engine.replicas import (
    Replicas,
    Replicated,
    active_mean,
    per_stream,
    replica_metrics,
    replica_seeds,
    replicas_of,
    step_seed,
)

compat.use_leaf_spec_function()  # no LeafSpec deprecation warning at every fit (see compat)

__all__ = [
    "BoundaryHook",
    "EngineDriven",
    "MODES",
    "MeasurementProblem",
    "ModuleOracle",
    "PHASES",
    "ReplicaGrid",
    "ReplicaSGD",
    "Replicas",
    "Replicated",
    "StepChunk",
    "StepContext",
    "StepHook",
    "StepOracle",
    "StepPlan",
    "TrainingEngine",
    "WeightLoss",
    "active_mean",
    "per_stream",
    "replica_metrics",
    "replica_seeds",
    "replicas_of",
    "scheduled_hparams",
    "step_seed",
    "training_step_loss",
    "unknown_per_step_hooks",
]
