"""The training machinery the lightning_flat models share: analytic steps, fused chunks, the step interface that
per-step callbacks use, replica bookkeeping and :class:`ReplicaSGD`."""

from lightning_flat.engine.hooks import PER_STEP_HOOKS, PHASES, StepContext, StepHook, engine_drives
from lightning_flat.engine.loop import MODES, TrainingEngine, unknown_per_step_hooks
from lightning_flat.engine.optim import ReplicaSGD
from lightning_flat.engine.replicas import active_mean, freeze_nonfinite, replica_metrics, replica_seeds

__all__ = [
    "MODES",
    "PER_STEP_HOOKS",
    "PHASES",
    "ReplicaSGD",
    "StepContext",
    "StepHook",
    "TrainingEngine",
    "active_mean",
    "engine_drives",
    "freeze_nonfinite",
    "replica_metrics",
    "replica_seeds",
    "unknown_per_step_hooks",
]
