"""The declared interface between per-step callbacks and the training engine.

A lightning_flat model may run several SGD steps inside one Lightning ``training_step`` (a *fused chunk*). Lightning
calls its per-batch hooks once per call, so a callback that must act on *every* SGD step does so through
:class:`StepHook`: the engine calls its phase methods for each step ``t``, in this order, for all hooks of a phase
before the next phase (whatever the order of the callbacks in the Trainer):

1. :meth:`StepHook.step_hparams` writes the hyperparameters of step ``t`` (``lr``, ``weight_decay``,
   ``label_noise``, ``sam_rho``) into ``ctx.hparams``;
2. :meth:`StepHook.step_targets` may replace ``ctx.batch`` (a new batch: the dataset and the sampler's batch are
   never modified);
3. the engine computes ``ctx.losses`` and ``ctx.grads`` (and freezes diverged replicas);
4. :meth:`StepHook.step_gradients` may replace ``ctx.grads`` (e.g. by a SAM gradient, using ``ctx.loss_and_grads``);
5. :meth:`StepHook.step_check` may set ``ctx.stop`` to a message: the update of step ``t`` is then not applied and
   the run stops;
6. the engine applies the update with ``ctx.hparams``.

A chunk ends wherever a hook's :meth:`StepHook.next_boundary` asks (e.g. a measuring callback's cadence), so that
Lightning's ``on_train_batch_end`` sees that global step. The same hooks run when the engine takes one step per
call; on any other LightningModule the callbacks act through their Lightning hooks instead
(:func:`engine_drives` tells which).

A callback that overrides a per-step Lightning hook (``on_train_batch_start``/``_end``, ``on_before_backward``,
``on_after_backward``, ``on_before_optimizer_step``, ``on_before_zero_grad``) without declaring it in
``fused_safe_hooks`` is unknown to the engine, which then runs one SGD step per call, so that the callback sees
every step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor

__all__ = ["StepContext", "StepHook", "PHASES", "PER_STEP_HOOKS", "engine_drives", "hparams_at"]

#: The phase methods of :class:`StepHook`, in the order the engine calls them.
PHASES = ("step_hparams", "step_targets", "step_gradients", "step_check")

#: Lightning hooks that run once per ``training_step`` call (hence once per chunk).
PER_STEP_HOOKS = ("on_train_batch_start", "on_train_batch_end", "on_before_backward", "on_after_backward",
                  "on_before_optimizer_step", "on_before_zero_grad")


@dataclass
class StepContext:
    """What one SGD step of the engine hands to the :class:`StepHook` phases.

    Attributes:
        step: the global step ``t`` (the weights are those after ``t`` updates; this step makes update ``t + 1``).
        trainer: the Trainer (for logging and ``global_rank``; do not read ``trainer.global_step`` inside a chunk,
            use ``step``).
        module: the LightningModule being trained.
        batch: this step's batch (a :class:`~lightning_flat.measurements.MeasurementBatch`).
        hparams: the hyperparameters of this step, set by ``step_hparams``; a missing key means "as configured".
        streams: the seeds of the runs (the model's ``replica_seeds``): per-replica random streams key on them.
        weights: the trained tensors, in the optimizer's order.
        loss_and_grads: ``(weights, batch) -> (losses, grads)``, the engine's gradient oracle (analytic or autograd)
            at any point, e.g. a SAM ascent point.
        replica_dims: 1 when the weights carry a leading replica dimension, else 0.
        losses: per-replica batch losses ``(R,)`` (``()`` without replicas), set before ``step_gradients``.
        grads: the gradients the update will use, set before ``step_gradients``.
        stop: a message set by ``step_check`` to skip this update and stop the run.
    """

    step: int
    trainer: Any
    module: Any
    batch: Any
    hparams: dict[str, Any]
    streams: list[int] | None
    weights: list[Tensor]
    loss_and_grads: Callable[[list[Tensor], Any], tuple[Tensor, list[Tensor]]]
    replica_dims: int = 0
    losses: Tensor | None = None
    grads: list[Tensor] | None = None
    stop: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class StepHook:
    """Mixin of the callbacks that act on every SGD step through the engine (see the module docstring).

    Subclasses override the phases they need; the engine only calls overridden ones. ``fused_safe_hooks`` names the
    per-step Lightning hooks this class defines that the engine may call once per chunk (because the class acts per
    step through the phases, or only needs the boundaries it declares in :meth:`next_boundary`).
    """

    fused_safe_hooks: ClassVar[tuple[str, ...]] = ()

    def hparams(self, step: int) -> dict[str, Any]:
        """The hyperparameters this hook sets for global step ``step`` (a pure function of the step; read by
        :func:`hparams_at` on the Lightning path)."""
        return {}

    def step_hparams(self, ctx: StepContext) -> None:
        """Write the hyperparameters of ``ctx.step`` into ``ctx.hparams`` (default: :meth:`hparams`)."""
        ctx.hparams.update(self.hparams(ctx.step))

    def step_targets(self, ctx: StepContext) -> None:
        """Replace ``ctx.batch`` (e.g. by one with noisy targets)."""

    def step_gradients(self, ctx: StepContext) -> None:
        """Replace ``ctx.grads``."""

    def step_check(self, ctx: StepContext) -> None:
        """Set ``ctx.stop`` to a message to skip this update and stop the run."""

    def next_boundary(self, step: int) -> int | None:
        """The first global step after ``step`` at which Lightning's ``on_train_batch_end`` must run (the chunk
        ends there), or ``None``."""
        return None


def engine_drives(pl_module: Any) -> bool:
    """True when ``pl_module``'s training engine calls the :class:`StepHook` phases itself (the callbacks then leave
    their Lightning per-step hooks alone)."""
    drives = getattr(pl_module, "engine_drives_step_hooks", None)
    return bool(drives()) if callable(drives) else False


def hparams_at(trainer: Any, step: int) -> dict[str, Any]:
    """The hyperparameters that the trainer's :class:`StepHook` callbacks set for global step ``step`` (e.g. a
    scheduled ``label_noise``), for callbacks acting through Lightning's hooks."""
    out: dict[str, Any] = {}
    for cb in getattr(trainer, "callbacks", ()):
        if isinstance(cb, StepHook):
            out.update(cb.hparams(step))
    return out
