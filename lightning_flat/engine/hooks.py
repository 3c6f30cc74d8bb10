"""Per-step callbacks, written once: [`StepHook`][lightning_flat.engine.StepHook] phases, run by the engine or by one
driver.

A callback that acts on *every* SGD step (label noise, schedules, SAM, the finite-loss guard) implements phases of
[`StepHook`][lightning_flat.engine.StepHook]; they run in this order, for all hooks of a phase before the next phase
(whatever the order of the callbacks in the Trainer):

1. [`StepHook.step_hparams`][lightning_flat.engine.StepHook.step_hparams] writes the hyperparameters of step ``t``
   (``lr``, ``weight_decay``, ``label_noise``, ``sam_rho``) into ``ctx.hparams`` (the learning rate and ridge then go
   into the optimizers);
2. [`StepHook.step_targets`][lightning_flat.engine.StepHook.step_targets] may replace the batch's targets
   ([`StepContext.set_targets`][lightning_flat.engine.StepContext.set_targets]; the dataset is never modified);
3. the loss and the gradients are computed (diverged replicas are frozen);
4. [`StepHook.step_gradients`][lightning_flat.engine.StepHook.step_gradients] may replace ``ctx.grads`` (e.g. by a SAM
   gradient, from ``ctx.oracle``);
5. [`StepHook.step_check`][lightning_flat.engine.StepHook.step_check] may set ``ctx.stop`` to a message: the update of
   step ``t`` is then not applied and the run stops;
6. the update is applied.

Who runs the phases: on a lightning_flat model the training engine (`lightning_flat.engine.loop`) runs them at
every step, also inside fused chunks. On any other module (or when the engine leaves training to Lightning) one
`LightningDriver` runs the same phases from Lightning's hooks; like Lightning's own hook dispatch it is one
piece of code for all hooks: the first [`StepHook`][lightning_flat.engine.StepHook] callback of the Trainer forwards
each Lightning hook to it (`drive`), the others do nothing:

- ``on_train_start`` / ``on_train_batch_end``: the scheduled learning rate and ridge of the coming step go into the
  optimizers (so that anything reading them during that step sees its values);
- ``on_train_batch_start``: ``step_hparams`` then ``step_targets`` (targets replaced in the batch container that
  Lightning holds, once per micro-batch under gradient accumulation);
- ``on_before_backward``: the loss is kept (the first non-finite micro-batch's, under accumulation);
- ``on_before_optimizer_step``: ``step_gradients`` (the parameters' ``.grad`` replaced, averaged across ranks under
  DDP) then ``step_check`` (the decision combined across ranks; a stop drops every gradient, so the update leaves
  the weights, momentum and ridge untouched, and sets ``trainer.should_stop``).

A chunk ends wherever a [`BoundaryHook`][lightning_flat.engine.BoundaryHook]'s
[`next_boundary`][lightning_flat.engine.BoundaryHook.next_boundary] asks (e.g. a measuring callback's cadence), so that
Lightning's ``on_train_batch_end`` sees that global step.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from lightning_flat.engine.interfaces import EngineDriven
from lightning_flat.engine.module_loss import ModuleOracle
from lightning_flat.engine.optim import write_hyperparameters
from lightning_flat.engine.replicas import Replicas, replicas_of
from lightning_flat.measurements import MeasurementBatch

__all__ = ["StepContext", "StepHook", "BoundaryHook", "StepOracle", "PHASES", "scheduled_hparams", "batch_targets",
           "with_targets", "drive", "LightningDriver"]

#: The phase methods of [`StepHook`][lightning_flat.engine.StepHook], in the order they run.
PHASES = ("step_hparams", "step_targets", "step_gradients", "step_check")


class StepOracle(Protocol):
    """The loss of the module being trained as a function of its trained tensors (``weights``, in the optimizer's
    order): ``loss_and_grads(weights, batches)`` gives the per-replica losses (``(R,)``, or ``()``) and the gradients
    of their sum, averaged over the micro-batches ``batches``; ``loss_at(weights, batch)`` is the (summed) loss as a
    pure function, for ``torch.func`` transforms."""

    def loss_and_grads(self, weights: Sequence[Tensor], batches: Sequence[Any]) -> tuple[Tensor, list[Tensor]]: ...

    def loss_at(self, weights: Sequence[Tensor], batch: Any) -> Tensor: ...

    def preserving(self) -> Any:
        """A context that puts back whatever the evaluations inside it change in the module (nothing to do for a
        pure loss)."""


def batch_targets(batch: Any, key: str | int | None = None) -> Tensor:
    """The targets of a batch: a [`MeasurementBatch`][lightning_flat.measurements.MeasurementBatch]'s, a dict's ``key``
    (default ``"targets"``), a list's ``key`` (default the last entry)."""
    if isinstance(batch, MeasurementBatch):
        return batch.targets
    if isinstance(batch, dict):
        k = "targets" if key is None else key
        if k not in batch:
            raise KeyError(f"the batch has no key {k!r}; set target_key to one of {list(batch)}")
        return batch[k]
    if isinstance(batch, list):
        return batch[-1 if key is None else key]
    raise TypeError(f"cannot change the targets of a {type(batch).__name__} batch in place: yield a "
                    "MeasurementBatch, a dict or a list")


def with_targets(batch: Any, value: Tensor, key: str | int | None = None, in_place: bool = False) -> Any:
    """``batch`` with its targets replaced by ``value``: in place (the container Lightning holds), or in a shallow
    copy (tensors shared)."""
    if not in_place:
        batch = MeasurementBatch(batch.measurements, batch.targets, batch.index) \
            if isinstance(batch, MeasurementBatch) else dict(batch) if isinstance(batch, dict) else list(batch)
    if isinstance(batch, MeasurementBatch):
        batch.targets = value
    elif isinstance(batch, dict):
        batch["targets" if key is None else key] = value
    else:
        batch[-1 if key is None else key] = value
    return batch


@dataclass
class StepContext:
    """What one SGD step hands to the [`StepHook`][lightning_flat.engine.StepHook] phases.

    Attributes:
        step: the global step ``t`` (the weights are those after ``t`` updates; this step makes update ``t + 1``).
        trainer: the Trainer (for logging; read the step from ``step``, not ``trainer.global_step``).
        module: the LightningModule being trained.
        batch: this step's batch (the current micro-batch under gradient accumulation).
        replicas: the module's [`Replicas`][lightning_flat.engine.Replicas] (one run for other modules).
        hparams: the hyperparameters of this step, set by ``step_hparams``; a missing key means "as configured".
        rank: the process's global rank (random streams are keyed by it).
        micro: the micro-batch of this optimizer step under gradient accumulation (0 otherwise).
        batches: every micro-batch of this step, for ``step_gradients`` (``[batch]`` without accumulation).
        weights: the trained tensors (with a gradient), in the optimizer's order, for ``step_gradients``.
        losses: per-replica losses ``(R,)`` (``()`` for one run), set before ``step_gradients``.
        grads: the gradients the update will use, set before ``step_gradients``.
        oracle: ``loss_fn -> StepOracle``: the loss of this module at other weights (the engine's analytic oracle on
            a lightning_flat model, which ignores ``loss_fn``; else autograd over ``loss_fn(module, batch)``).
        stop: a message set by ``step_check`` to skip this update and stop the run.
        in_place: targets are replaced in the batch container (Lightning holds it), not in a copy.
    """

    step: int
    trainer: Any
    module: Any
    batch: Any
    replicas: Replicas
    hparams: dict[str, Any] = field(default_factory=dict)
    rank: int = 0
    micro: int = 0
    batches: list[Any] = field(default_factory=list)
    weights: list[Tensor] = field(default_factory=list)
    losses: Tensor | None = None
    grads: list[Tensor] | None = None
    oracle: Callable[[Any], StepOracle] | None = None
    stop: str | None = None
    in_place: bool = False

    def targets(self, key: str | int | None = None) -> Tensor:
        """The targets of ``batch`` (see `batch_targets`)."""
        return batch_targets(self.batch, key)

    def set_targets(self, value: Tensor, key: str | int | None = None) -> None:
        """Replace the targets of ``batch``: in a new batch object on the engine path (the sampler's batch is kept),
        in the container itself on Lightning's path."""
        self.batch = with_targets(self.batch, value, key, in_place=self.in_place)


class BoundaryHook:
    """Mixin of the callbacks that need Lightning's ``on_train_batch_end`` at certain global steps: the engine ends
    its fused chunks there. ``fused_safe_hooks`` names the per-step Lightning hooks the class defines that need not
    see every SGD step (the engine may call them once per fused chunk); any other per-step hook a callback defines
    makes the engine run one step per call, so that the hook sees every step."""

    fused_safe_hooks: ClassVar[tuple[str, ...]] = ()

    def next_boundary(self, step: int) -> int | None:
        """The first global step after ``step`` at which ``on_train_batch_end`` must run, or ``None``."""
        return None


class StepHook(BoundaryHook, Callback):
    """Base of the callbacks that act on every SGD step through phases (see the module docstring).

    Subclasses override the phases they need (and [`hparams`][lightning_flat.engine.StepHook.hparams] for scheduled
    values); only overridden phases run. They do not implement Lightning's per-step hooks themselves:
    [`StepHook`][lightning_flat.engine.StepHook] does, once, to drive the phases of every hook of the Trainer on modules
    the engine does not train, and ``fused_safe_hooks`` tells the engine that these hooks need not see every step (the
    engine runs the phases itself).
    """

    fused_safe_hooks: ClassVar[tuple[str, ...]] = ("on_train_batch_start", "on_before_backward",
                                                   "on_before_optimizer_step", "on_train_batch_end")

    def hparams(self, step: int) -> dict[str, Any]:
        """The hyperparameters this hook sets for global step ``step`` (a pure function of the step)."""
        return {}

    def step_hparams(self, ctx: StepContext) -> None:
        """Write the hyperparameters of ``ctx.step`` into ``ctx.hparams`` (default:
        [`hparams`][lightning_flat.engine.StepHook.hparams])."""
        ctx.hparams.update(self.hparams(ctx.step))

    def step_targets(self, ctx: StepContext) -> None:
        """Replace the targets of ``ctx.batch``
        ([`StepContext.set_targets`][lightning_flat.engine.StepContext.set_targets])."""

    def step_gradients(self, ctx: StepContext) -> None:
        """Replace ``ctx.grads``."""

    def step_check(self, ctx: StepContext) -> None:
        """Set ``ctx.stop`` to a message to skip this update and stop the run."""

    def undo_targets(self, batch: Any) -> Any:
        """``batch`` without what [`step_targets`][lightning_flat.engine.StepHook.step_targets] put in it (a shallow
        copy), or ``batch`` itself: how the curvature callbacks keep a clean batch whatever the callbacks' order."""
        return batch

    # ---------------------------------------------------------------- Lightning's hooks: one driver for all hooks
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        drive(self, trainer, pl_module, "train_start")

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        drive(self, trainer, pl_module, "batch_start", batch=batch, batch_idx=batch_idx)

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: Tensor) -> None:
        drive(self, trainer, pl_module, "before_backward", loss=loss)

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        drive(self, trainer, pl_module, "before_optimizer_step", optimizer=optimizer)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        drive(self, trainer, pl_module, "batch_end")


def overrides(hook: Any, name: str, base: type = StepHook) -> bool:
    """Whether ``hook``'s class overrides ``base.name``."""
    return getattr(type(hook), name, None) is not getattr(base, name, None)


def phase_hooks(callbacks: Sequence[Any]) -> dict[str, list[StepHook]]:
    """The [`StepHook`][lightning_flat.engine.StepHook] callbacks that implement each phase, in the Trainer's order."""
    hooks = [cb for cb in callbacks if isinstance(cb, StepHook)]
    return {p: [h for h in hooks if overrides(h, p) or (p == "step_hparams" and overrides(h, "hparams"))]
            for p in PHASES}


def scheduled_hparams(trainer: Any, step: int) -> dict[str, Any]:
    """The hyperparameters that the trainer's [`StepHook`][lightning_flat.engine.StepHook] callbacks set for global step
    ``step`` (e.g. a scheduled learning rate), for callbacks that need them outside the phases (e.g. ``2/lr``)."""
    out: dict[str, Any] = {}
    for cb in trainer.callbacks:
        if isinstance(cb, StepHook):
            out.update(cb.hparams(step))
    return out


# ----------------------------------------------------------------------------- the driver on Lightning's path
_DRIVERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def drive(hook: StepHook, trainer: Any, pl_module: Any, event: str, **kwargs: Any) -> None:
    """Forward one Lightning hook of ``hook`` to the Trainer's driver, if ``hook`` is the Trainer's first
    [`StepHook`][lightning_flat.engine.StepHook] and the module's engine does not run the phases itself."""
    if isinstance(pl_module, EngineDriven) and pl_module.engine_drives_step_hooks():
        return
    first = next(cb for cb in trainer.callbacks if isinstance(cb, StepHook))
    if first is not hook:
        return
    driver = _DRIVERS.get(trainer)
    if driver is None or driver.module is not pl_module or event == "train_start":
        driver = _DRIVERS[trainer] = LightningDriver(trainer, pl_module)
    getattr(driver, event)(trainer, pl_module, **kwargs)


class LightningDriver:
    """The phases of a Trainer's step hooks, driven from Lightning's hooks (see the module docstring)."""

    def __init__(self, trainer: Any, module: Any) -> None:
        self.module = module
        self.hooks = phase_hooks(trainer.callbacks)
        self.replicas = replicas_of(module)
        self.batches: list[Any] = []
        self.hparams: dict[str, Any] = {}
        self.loss: Tensor | None = None
        self._applied: dict[str, Any] = {}

    def _apply(self, trainer: Any, values: dict[str, Any]) -> None:
        changed = {k: values[k] for k in ("lr", "weight_decay") if k in values and self._applied.get(k) != values[k]}
        if changed:
            self._applied.update(changed)
            write_hyperparameters(trainer.optimizers, changed)

    def train_start(self, trainer: Any, module: Any) -> None:
        self._apply(trainer, scheduled_hparams(trainer, trainer.global_step))

    def batch_end(self, trainer: Any, module: Any) -> None:
        self._apply(trainer, scheduled_hparams(trainer, trainer.global_step))

    def batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
        micro = batch_idx % max(int(trainer.accumulate_grad_batches), 1)
        if micro == 0:
            self.batches, self.loss = [], None
        ctx = StepContext(step=trainer.global_step, trainer=trainer, module=module, batch=batch,
                          replicas=self.replicas, rank=trainer.global_rank, micro=micro, in_place=True)
        for h in self.hooks["step_hparams"]:
            h.step_hparams(ctx)
        if ctx.hparams:
            self._apply(trainer, ctx.hparams)
        for h in self.hooks["step_targets"]:
            h.step_targets(ctx)
        self.hparams = ctx.hparams
        self.batches.append(batch)  # as training sees it (targets replaced in place)

    def before_backward(self, trainer: Any, module: Any, loss: Tensor) -> None:
        if self.loss is None or bool(torch.isfinite(self.loss).all()):
            self.loss = loss.detach()  # under accumulation: the first non-finite micro-batch loss of the step is kept

    def before_optimizer_step(self, trainer: Any, module: Any, optimizer: Any) -> None:
        batches, self.batches = self.batches, []
        loss, self.loss = self.loss, None
        if not (self.hooks["step_gradients"] or self.hooks["step_check"]) or not batches:
            return
        params = [p for group in optimizer.param_groups for p in group["params"]
                  if p.requires_grad and p.grad is not None]
        grads = [p.grad for p in params]
        ctx = StepContext(step=trainer.global_step, trainer=trainer, module=module, batch=batches[-1],
                          replicas=self.replicas, hparams=dict(self.hparams), rank=trainer.global_rank,
                          batches=batches, weights=params, losses=loss, grads=grads,
                          oracle=lambda loss_fn=None: ModuleOracle(module, params, loss_fn), in_place=True)
        if params:
            for h in self.hooks["step_gradients"]:
                h.step_gradients(ctx)
            if ctx.grads is not grads:
                new = ctx.grads
                if trainer.world_size > 1:
                    new = [trainer.strategy.reduce(g, reduce_op="mean") for g in new]
                for p, g in zip(params, new):
                    p.grad = g.to(p.dtype)
        for h in self.hooks["step_check"]:
            h.step_check(ctx)
        if self.hooks["step_check"] and trainer.strategy.reduce_boolean_decision(ctx.stop is not None, all=False):
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None
            trainer.should_stop = True
