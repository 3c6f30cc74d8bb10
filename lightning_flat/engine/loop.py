"""The training engine of the lightning_flat models: analytic SGD steps, fused chunks inside Lightning.

One [`TrainingEngine`][lightning_flat.engine.TrainingEngine] belongs to each model. At ``on_fit_start`` it picks how the
model trains under this Trainer:

- ``"fused"`` (the default path): one ``training_step`` call runs a chunk of SGD steps (the sampler yields a
  [`StepChunk`][lightning_flat.engine.StepChunk]); each step computes its gradients with the oracle, runs the
  [`StepHook`][lightning_flat.engine.StepHook] phases of the per-step callbacks and applies the update with the model's
  [`ReplicaSGD`][lightning_flat.engine.ReplicaSGD]. ``trainer.global_step`` counts every SGD step (see
  `advance_global_step`). A chunk ends wherever anything needs a step boundary:
  a [`BoundaryHook`][lightning_flat.engine.BoundaryHook]'s ``next_boundary``, ``Trainer(log_every_n_steps)``,
  ``ModelCheckpoint(every_n_train_steps)``, ``max_steps``, the end of an epoch, and at most ``chunk_size`` steps.
- ``"stepwise"``: one SGD step per call, with the same step (the gradients are written to ``.grad`` in the model's
  ``backward`` hook and Lightning's optimizer step applies the same update), when something needs Lightning's
  per-step hooks: a callback that defines one of them without declaring it fused-safe, a per-step hook of a model
  subclass, a validation loop, learning-rate schedulers, gradient clipping, another optimizer, or
  ``chunk_size=1``. Both paths give bitwise the same run.
- ``"lightning"``: Lightning's own automatic optimization with an autograd backward (the step hooks then run from
  Lightning's hooks, `LightningDriver`), for what the engine does not cover:
  several devices (DDP), mixed precision, L-BFGS, gradient accumulation, or a subclass that replaces
  ``training_step``, ``backward`` or ``optimizer_step``.

What the engine needs from its module (the lightning_flat models provide it, see
[`LinearNetBase`][lightning_flat.models.LinearNetBase]): ``replicas``, ``chunk_size``, ``gradients``, ``optimizer``,
``weights()``, ``uses_analytic_gradients()``, ``end_to_end_and_cache``/``end_to_end_vjp`` (the analytic oracle),
``training_losses_from_weights`` (autograd), ``loss_from_weights`` and ``log_training_step``. The engine imports no
model: it is given the class whose hooks hand training to it (``base``).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
from torch import Tensor

from lightning_flat.engine import compat
from lightning_flat.engine.hooks import BoundaryHook, StepContext, phase_hooks, scheduled_hparams
from lightning_flat.engine.interfaces import StepChunk
from lightning_flat.engine.optim import ReplicaSGD, write_hyperparameters
from lightning_flat.functional.gradients import residual_and_end_to_end_gradient
from lightning_flat.measurements import unpack_batch

__all__ = ["TrainingEngine", "MODES", "unknown_per_step_hooks"]

log = logging.getLogger(__name__)

MODES = ("fused", "stepwise", "lightning")


def _owner(cls: type, name: str) -> type:
    for klass in cls.__mro__:
        if name in klass.__dict__:
            return klass
    return object


def _lightning_display_callbacks() -> tuple[type, ...]:
    """Lightning's own callbacks whose per-step hooks only display or save at boundaries the engine honours
    (progress bars, checkpoints by steps, the timer, model summaries): their hooks may run once per chunk."""
    from lightning.pytorch.callbacks import ModelCheckpoint, ModelSummary, ProgressBar, Timer

    return ProgressBar, ModelCheckpoint, Timer, ModelSummary


def unknown_per_step_hooks(callback: Any) -> list[str]:
    """The per-step Lightning hooks (`per_step_hooks`) that ``callback``
    defines and that are not known to be safe once per chunk (declared in ``fused_safe_hooks``, or Lightning's own
    display and checkpoint callbacks' own hooks): empty when the callback may run with fused chunks."""
    from lightning.pytorch.callbacks import Callback

    display = _lightning_display_callbacks()
    out = []
    for name in compat.per_step_hooks():
        owner = _owner(type(callback), name)
        if owner is Callback or owner is object:
            continue
        if name in owner.__dict__.get("fused_safe_hooks", ()):
            continue
        if issubclass(owner, display) and owner.__module__.startswith("lightning."):
            continue
        out.append(f"{type(callback).__name__}.{name}")
    return out


class _EngineOracle:
    """The engine's gradient oracle as a [`StepOracle`][lightning_flat.engine.StepOracle] (for ``step_gradients``)."""

    def __init__(self, engine: TrainingEngine) -> None:
        self.engine = engine

    def __call__(self, loss_fn: Any = None) -> _EngineOracle:
        return self

    def loss_and_grads(self, weights: list[Tensor], batches: list[Any]) -> tuple[Tensor, list[Tensor]]:
        if len(batches) != 1:
            raise ValueError(f"the engine runs one batch per step, got {len(batches)}")
        return self.engine.loss_and_grads(weights, batches[0])

    def loss_at(self, weights: list[Tensor], batch: Any) -> Tensor:
        return self.engine.module.loss_from_weights(list(weights), batch)

    def preserving(self) -> Any:
        return contextlib.nullcontext()  # the models' loss is a pure function of their factors


class TrainingEngine:
    """How a lightning_flat model trains (see the module docstring). ``mode``, ``oracle`` and ``reason`` (why the
    engine left the fused path, empty on it) are set at ``on_fit_start``.

    Args:
        module: the model.
        base: the class whose ``training_step``/``backward``/``optimizer_step`` and per-step hooks hand training to
            the engine (a subclass that overrides them takes another path).
    """

    def __init__(self, module: Any, base: type) -> None:
        self.module = module
        self.base = base
        self.mode = "lightning"
        self.oracle = "autograd"
        self.reason = ""
        self._hooks: dict[str, list[Any]] = phase_hooks([])
        self._boundary_hooks: list[BoundaryHook] = []
        self._periods: list[int] = []
        self._max_steps = -1
        self._log_every = 0
        self._pending: StepContext | None = None
        self._applied: dict[str, Any] = {}
        self._step_oracle = _EngineOracle(self)

    # ------------------------------------------------------------------------------------------------- set-up
    def configure(self, trainer: Any) -> None:
        """Pick the mode and the oracle for this fit, collect the per-step hooks and the chunk boundaries."""
        m = self.module
        self._pending = None
        self._applied = {}
        self._log_every = max(int(trainer.log_every_n_steps or 0), 0)
        self.mode, self.reason = self._pick_mode(trainer)
        self.oracle = "analytic" if self.mode != "lightning" and m.uses_analytic_gradients() else "autograd"
        callbacks = list(trainer.callbacks)
        self._hooks = phase_hooks(callbacks)
        self._boundary_hooks = [cb for cb in callbacks if isinstance(cb, BoundaryHook)
                                and _owner(type(cb), "next_boundary") is not BoundaryHook]
        from lightning.pytorch.callbacks import ModelCheckpoint

        periods = [self._log_every] + [compat.checkpoint_step_period(cb) for cb in callbacks
                                       if isinstance(cb, ModelCheckpoint)]
        self._periods = sorted({p for p in periods if p > 0})
        self._max_steps = int(trainer.max_steps) if trainer.max_steps is not None else -1
        if self.mode != "fused" and trainer.is_global_zero:
            log.info(f"{type(m).__name__}: one SGD step per training_step ({self.mode} path) because of {self.reason}")

    def _pick_mode(self, trainer: Any) -> tuple[str, str]:
        m = self.module
        cls = type(m)
        replaced = [n for n in ("training_step", "backward", "optimizer_step") if _owner(cls, n) is not self.base]
        precision = str(trainer.precision)
        if replaced:
            return "lightning", f"{cls.__name__} replaces {', '.join(replaced)}"
        if m.optimizer != "sgd":
            return "lightning", f"optimizer={m.optimizer!r}"
        if trainer.world_size > 1:
            return "lightning", f"it trains on {trainer.world_size} processes (DDP's backward is autograd)"
        if precision not in ("32-true", "64-true", "32", "64"):
            return "lightning", f"precision={precision!r}"
        if trainer.accumulate_grad_batches != 1:
            return "lightning", f"accumulate_grad_batches={trainer.accumulate_grad_batches}"
        reasons = []
        for name in compat.per_step_hooks() + ("optimizer_zero_grad", "configure_gradient_clipping",
                                               "lr_scheduler_step", "validation_step"):
            owner = _owner(cls, name)
            if owner is not self.base and owner.__module__.split(".")[0] not in ("lightning", "pytorch_lightning"):
                reasons.append(f"{cls.__name__}.{name}")
        for cb in trainer.callbacks:
            reasons += unknown_per_step_hooks(cb)
        if trainer.lr_scheduler_configs:
            reasons.append("learning-rate schedulers")
        if trainer.gradient_clip_val:
            reasons.append(f"gradient_clip_val={trainer.gradient_clip_val}")
        if len(trainer.optimizers) != 1 or not isinstance(trainer.optimizers[0], ReplicaSGD):
            reasons.append("the optimizer is not the model's ReplicaSGD")
        if m.chunk_size <= 1:
            reasons.append("chunk_size=1")
        if reasons:
            return "stepwise", ", ".join(reasons)
        return "fused", ""

    # -------------------------------------------------------------------------------------------------- chunks
    def steps_in_call(self, step: int) -> int:
        """How many SGD steps the ``training_step`` call that starts at global step ``step`` runs."""
        if self.mode != "fused":
            return 1
        end = step + max(int(self.module.chunk_size), 1)
        if self._max_steps > step:  # the last step is a call of its own: progress bars end on it
            end = min(end, self._max_steps - 1 if self._max_steps - 1 > step else self._max_steps)
        for p in self._periods:
            end = min(end, (step // p + 1) * p)
        for h in self._boundary_hooks:
            b = h.next_boundary(step)
            if b is not None and b > step:
                end = min(end, b)
        return end - step

    # ------------------------------------------------------------------------------------------------ one step
    def loss_and_grads(self, weights: list[Tensor], batch: Any) -> tuple[Tensor, list[Tensor]]:
        """Per-replica batch losses and the gradients of their sum, with this fit's oracle."""
        m = self.module
        if self.oracle == "analytic":
            measurements, targets = unpack_batch(batch)
            with torch.no_grad():  # the parameters require grad: no graph for these products
                E, cache = m.end_to_end_and_cache(weights)
                losses, G = residual_and_end_to_end_gradient(E, measurements, targets)
                return losses, m.end_to_end_vjp(weights, cache, G)
        with torch.enable_grad():
            leaves = [w.detach().requires_grad_(True) for w in weights]
            losses = m.training_losses_from_weights(leaves, batch)
            grads = torch.autograd.grad(losses.sum(), leaves)
        return losses.detach(), list(grads)

    def run_step(self, step: int, batch: Any, weights: list[Tensor] | None = None) -> StepContext:
        """Everything of SGD step ``step`` but the update: hyperparameters, targets, gradients, replica freezing,
        gradient hooks and checks. ``ctx.stop`` set means: do not apply this update, stop the run. ``weights``
        (default ``module.weights()``) saves that call when a chunk runs many steps."""
        m = self.module
        trainer = m.trainer
        replicas = m.replicas
        ctx = StepContext(step, trainer, m, batch, replicas, {}, trainer.global_rank, 0, [],
                          m.weights() if weights is None else weights, oracle=self._step_oracle)
        hooks = self._hooks
        for h in hooks["step_hparams"]:
            h.step_hparams(ctx)
        if ctx.hparams:
            self.apply_hparams(trainer, ctx.hparams)
        for h in hooks["step_targets"]:
            h.step_targets(ctx)
        ctx.losses, ctx.grads = self.loss_and_grads(ctx.weights, ctx.batch)
        replicas.freeze_nonfinite(ctx.losses, step)
        if hooks["step_gradients"]:
            ctx.batches = [ctx.batch]
            for h in hooks["step_gradients"]:
                h.step_gradients(ctx)
        for h in hooks["step_check"]:
            h.step_check(ctx)
        if ctx.stop is None:
            what = replicas.stop_reason(ctx.losses)
            if what is not None:  # without a FiniteLossGuard's say: nothing can train any more
                from lightning.pytorch.utilities import rank_zero_warn

                ctx.stop = (f"{type(m).__name__}: {what} at step {step}; training stops, the weights are those of "
                            f"step {step} (this update was not applied). Add FiniteLossGuard for other policies.")
                rank_zero_warn(ctx.stop)
        if ctx.stop is not None:
            trainer.should_stop = True
        return ctx

    def apply_hparams(self, trainer: Any, hparams: dict[str, Any]) -> None:
        """Put scheduled ``lr``/``weight_decay`` into every optimizer's param groups (`write_hyperparameters`),
        only when they changed since the last call (so a per-replica list is converted once per change)."""
        changed = {k: hparams[k] for k in ("lr", "weight_decay") if k in hparams and self._applied.get(k) != hparams[k]}
        if changed:
            self._applied.update(changed)
            write_hyperparameters(trainer.optimizers, changed)

    def prepare_step(self, trainer: Any) -> None:
        """Put the scheduled ``lr``/``weight_decay`` of the coming step (``trainer.global_step``) in the optimizers
        before Lightning's hooks of that step run (at the start of training and at the end of every call), so that
        callbacks reading the optimizer see the values the step will use."""
        if self.mode != "lightning":
            values = scheduled_hparams(trainer, trainer.global_step)
            if values:
                self.apply_hparams(trainer, values)

    def drives_step_hooks(self) -> bool:
        """True when the engine runs the step hooks' phases (not on Lightning's own path)."""
        return self.mode != "lightning"

    # ------------------------------------------------------------------------------------ the Lightning hooks
    def training_step(self, batch: Any) -> Tensor:
        m = self.module
        trainer = m.trainer
        if self.mode == "stepwise":
            ctx = self.run_step(trainer.global_step, batch)
            self._pending = ctx
            self._log(ctx)
            return m.replicas.masked_sum(ctx.losses).detach()
        # fused: every step of the chunk, updates included
        chunk = batch if isinstance(batch, StepChunk) else None
        start = trainer.global_step
        if chunk is not None and chunk.start != start:
            raise RuntimeError(f"the sampler's chunk starts at step {chunk.start} but the trainer is at step {start}")
        length = chunk.length if chunk is not None else 1
        opt = trainer.optimizers[0]
        weights = m.weights()
        order = self._order(weights, opt)
        done, ctx = 0, None
        for t in range(start, start + length):
            ctx = self.run_step(t, chunk.batch(t) if chunk is not None else batch, weights)
            done += 1
            self._log(ctx)  # at the weights of step t, as Lightning's path logs them (only a chunk's last step logs)
            if ctx.stop is not None:
                break
            grads = ctx.grads
            opt.apply_gradients(grads if order is None else [None if k is None else grads[k] for k in order])
        compat.advance_global_step(trainer, done - 1)
        return m.replicas.masked_sum(ctx.losses).detach()

    @staticmethod
    def _order(weights: list[Tensor], opt: Any) -> list[int | None] | None:
        """Where each optimizer parameter sits in ``weights`` (``None`` if nowhere or frozen); ``None`` when the
        orders agree."""
        params = [p for group in opt.param_groups for p in group["params"]]
        if len(params) == len(weights) and all(p is w and p.requires_grad for p, w in zip(params, weights)):
            return None
        index = {id(w): k for k, w in enumerate(weights)}
        return [index.get(id(p)) if p.requires_grad else None for p in params]

    def _log(self, ctx: StepContext) -> None:
        every = self._log_every
        if every and (ctx.step + 1) % every == 0:
            self.module.log_training_step(ctx.losses, ctx.step)

    def backward(self, loss: Tensor) -> bool:
        """The model's ``backward`` hook: write the step's gradients to ``.grad`` (stepwise), do nothing (fused:
        the chunk is applied), or return ``False`` for Lightning's autograd backward."""
        if self.mode == "fused":
            return True
        ctx, self._pending = self._pending, None
        if ctx is None:
            return False
        if ctx.stop is None:
            for w, g in zip(ctx.weights, ctx.grads):
                if w.requires_grad:
                    w.grad = g if w.grad is None else w.grad + g
        return True
