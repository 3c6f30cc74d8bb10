"""The training engine of the lightning_flat models: analytic SGD steps, fused chunks inside Lightning.

One :class:`TrainingEngine` belongs to each model. At ``on_fit_start`` it picks how the model trains under this
Trainer:

- ``"fused"`` (the default path): one ``training_step`` call runs a chunk of SGD steps (the datamodule's sampler
  yields a :class:`~lightning_flat.datamodules.StepChunk`); each step computes its gradients with the oracle, runs the
  :class:`~lightning_flat.engine.StepHook` phases of the per-step callbacks and applies the update with the model's
  :class:`~lightning_flat.engine.ReplicaSGD`. ``trainer.global_step`` counts every SGD step (see
  :func:`~lightning_flat.engine.compat.advance_global_step`). A chunk ends wherever anything needs a step boundary:
  a hook's :meth:`~lightning_flat.engine.StepHook.next_boundary`, ``Trainer(log_every_n_steps)``,
  ``ModelCheckpoint(every_n_train_steps)``, ``max_steps``, the end of an epoch, and at most ``chunk_size`` steps.
- ``"stepwise"``: one SGD step per call, with the same step (the gradients are written to ``.grad`` in the model's
  ``backward`` hook and Lightning's optimizer step applies the same update), when something needs Lightning's
  per-step hooks: a callback the engine does not know that overrides one of them, a per-step hook of a model
  subclass, a validation loop, learning-rate schedulers, gradient clipping, another optimizer, or
  ``chunk_size=1``. Both paths give bitwise the same run.
- ``"lightning"``: Lightning's own automatic optimization with an autograd backward (the callbacks then use their
  Lightning hooks), for what the engine does not cover: several devices (DDP), mixed precision, L-BFGS,
  gradient accumulation, or a subclass that replaces ``training_step``, ``backward`` or ``optimizer_step``.

The gradient oracle is analytic (:mod:`lightning_flat.functional.gradients`: residual, one adjoint, the chain rule
of the parameterization) unless the model asks for ``gradients="autograd"``, has a trace penalty, or its subclass
changes ``end_to_end_from`` without an analytic vector-Jacobian product; autograd is the reference it is tested
against.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from lightning_flat.engine import compat
from lightning_flat.engine.hooks import PER_STEP_HOOKS, PHASES, StepContext, StepHook, hparams_at
from lightning_flat.engine.optim import ReplicaSGD, write_hyperparameters
from lightning_flat.engine.replicas import freeze_nonfinite
from lightning_flat.functional.gradients import residual_and_end_to_end_gradient
from lightning_flat.measurements import unpack_batch

__all__ = ["TrainingEngine", "MODES"]

log = logging.getLogger(__name__)

MODES = ("fused", "stepwise", "lightning")

#: Per-step Lightning hooks of Lightning's own callbacks that are safe to call once per chunk: progress bars only
#: display, checkpoints by steps get their boundaries, time-based ones fire at a chunk's end.
_LIGHTNING_SAFE: dict[str, tuple[str, ...]] = {
    "TQDMProgressBar": PER_STEP_HOOKS,
    "RichProgressBar": PER_STEP_HOOKS,
    "ProgressBar": PER_STEP_HOOKS,
    "ModelCheckpoint": PER_STEP_HOOKS,
    "Timer": PER_STEP_HOOKS,
    "ModelSummary": PER_STEP_HOOKS,
    "RichModelSummary": PER_STEP_HOOKS,
}


def _owner(cls: type, name: str) -> type:
    for klass in cls.__mro__:
        if name in klass.__dict__:
            return klass
    return object


def unknown_per_step_hooks(callback: Any) -> list[str]:
    """The per-step Lightning hooks that ``callback`` overrides and that the engine does not know are safe to call
    once per chunk (empty: the callback may run with fused chunks)."""
    from lightning.pytorch.callbacks import Callback

    out = []
    for name in PER_STEP_HOOKS:
        owner = _owner(type(callback), name)
        if owner is Callback or owner is object:
            continue
        if name in owner.__dict__.get("fused_safe_hooks", ()):
            continue
        if owner.__module__.startswith("lightning.pytorch.") and name in _LIGHTNING_SAFE.get(owner.__name__, ()):
            continue
        out.append(f"{type(callback).__name__}.{name}")
    return out


class TrainingEngine:
    """How a lightning_flat model trains (see the module docstring). ``mode``, ``oracle`` and ``reason`` (why the
    engine left the fused path, empty on it) are set at ``on_fit_start``."""

    def __init__(self, module: Any) -> None:
        self.module = module
        self.mode = "lightning"
        self.oracle = "autograd"
        self.reason = ""
        self._hooks: dict[str, list[StepHook]] = {p: [] for p in PHASES}
        self._boundary_hooks: list[StepHook] = []
        self._periods: list[int] = []
        self._max_steps = -1
        self._log_every = 0
        self._pending: StepContext | None = None
        self._applied: dict[str, Any] = {}

    # ------------------------------------------------------------------------------------------------- set-up
    def configure(self, trainer: Any) -> None:
        """Pick the mode and the oracle for this fit, collect the per-step hooks and the chunk boundaries."""
        m = self.module
        self._pending = None
        self._applied = {}
        self._log_every = max(int(trainer.log_every_n_steps or 0), 0)
        self.mode, self.reason = self._pick_mode(trainer)
        self.oracle = self._pick_oracle()
        callbacks = list(trainer.callbacks)
        hooks = [cb for cb in callbacks if isinstance(cb, StepHook)]

        def overrides(h: StepHook, name: str) -> bool:
            return _owner(type(h), name) is not StepHook

        self._hooks = {p: [h for h in hooks if overrides(h, p) or (p == "step_hparams" and overrides(h, "hparams"))]
                       for p in PHASES}
        self._boundary_hooks = [h for h in hooks if _owner(type(h), "next_boundary") is not StepHook]
        from lightning.pytorch.callbacks import ModelCheckpoint

        periods = [self._log_every] + [compat.checkpoint_step_period(cb) for cb in callbacks
                                       if isinstance(cb, ModelCheckpoint)]
        self._periods = sorted({p for p in periods if p > 0})
        self._max_steps = int(trainer.max_steps) if trainer.max_steps is not None else -1
        if self.mode != "fused" and trainer.is_global_zero:
            log.info(f"{type(m).__name__}: one SGD step per training_step ({self.mode} path) because of {self.reason}")

    def _pick_mode(self, trainer: Any) -> tuple[str, str]:
        from lightning_flat.models.base import LinearNetBase

        m = self.module
        cls = type(m)
        replaced = [n for n in ("training_step", "backward", "optimizer_step")
                    if _owner(cls, n) is not LinearNetBase]
        precision = str(trainer.precision)
        if replaced:
            return "lightning", f"{cls.__name__} replaces {', '.join(replaced)}"
        if getattr(m, "optimizer", "sgd") != "sgd":
            return "lightning", f"optimizer={m.optimizer!r}"
        if trainer.world_size > 1:
            return "lightning", f"it trains on {trainer.world_size} processes (DDP's backward is autograd)"
        if precision not in ("32-true", "64-true", "32", "64"):
            return "lightning", f"precision={precision!r}"
        if trainer.accumulate_grad_batches != 1:
            return "lightning", f"accumulate_grad_batches={trainer.accumulate_grad_batches}"
        reasons = []
        for name in PER_STEP_HOOKS + ("optimizer_zero_grad", "configure_gradient_clipping", "lr_scheduler_step",
                                      "validation_step"):
            owner = _owner(cls, name)
            if owner is not LinearNetBase and owner.__module__.split(".")[0] not in ("lightning", "pytorch_lightning"):
                reasons.append(f"{cls.__name__}.{name}")
        for cb in trainer.callbacks:
            reasons += unknown_per_step_hooks(cb)
        if trainer.lr_scheduler_configs:
            reasons.append("learning-rate schedulers")
        if trainer.gradient_clip_val:
            reasons.append(f"gradient_clip_val={trainer.gradient_clip_val}")
        if len(trainer.optimizers) != 1 or not isinstance(trainer.optimizers[0], ReplicaSGD):
            reasons.append("the optimizer is not the model's ReplicaSGD")
        if getattr(m, "chunk_size", 1) <= 1:
            reasons.append("chunk_size=1")
        if reasons:
            return "stepwise", ", ".join(reasons)
        return "fused", ""

    def _pick_oracle(self) -> str:
        m = self.module
        if self.mode == "lightning" or getattr(m, "gradients", "analytic") != "analytic":
            return "autograd"
        if getattr(m, "trace_penalty", 0.0):
            return "autograd"
        cls = type(m)
        if len({_owner(cls, n) for n in ("end_to_end_from", "end_to_end_and_cache", "end_to_end_vjp")}) > 1:
            return "autograd"  # a subclass changed the parameterization without its vector-Jacobian product
        return "analytic"

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
        weights = m.weights() if weights is None else weights
        ctx = StepContext(step=step, trainer=trainer, module=m, batch=batch, hparams={},
                          streams=m.replica_seeds, weights=weights,
                          loss_and_grads=self.loss_and_grads, replica_dims=1 if m.replicas > 1 else 0)
        hooks = self._hooks
        for h in hooks["step_hparams"]:
            h.step_hparams(ctx)
        if ctx.hparams:
            self.apply_hparams(trainer, ctx.hparams)
        for h in hooks["step_targets"]:
            h.step_targets(ctx)
        ctx.losses, ctx.grads = self.loss_and_grads(weights, ctx.batch)
        if m.replica_active is not None:
            freeze_nonfinite(ctx.losses, m.replica_active, m.diverged, step, m.replica_seeds)
        for h in hooks["step_gradients"]:
            h.step_gradients(ctx)
        for h in hooks["step_check"]:
            h.step_check(ctx)
        if ctx.stop is None:
            self._check_divergence(ctx)
        if ctx.stop is not None:
            trainer.should_stop = True
        return ctx

    def _check_divergence(self, ctx: StepContext) -> None:
        """Without a FiniteLossGuard's say: stop when nothing can train any more (a single model's loss is not
        finite, or every replica is frozen), with the weights of the last finite step and a warning."""
        m = ctx.module
        if m.replica_active is None:
            if bool(torch.isfinite(ctx.losses).all()):
                return
            what = f"a non-finite training loss ({float(ctx.losses)})"
        elif bool(m.replica_active.any()):
            return
        else:
            what = f"every replica diverged ({dict(sorted(m.diverged.items()))})"
        from lightning.pytorch.utilities import rank_zero_warn

        ctx.stop = (f"{type(m).__name__}: {what} at step {ctx.step}; training stops, the weights are those of step "
                    f"{ctx.step} (this update was not applied). Add FiniteLossGuard for other policies.")
        rank_zero_warn(ctx.stop)

    def apply_hparams(self, trainer: Any, hparams: dict[str, Any]) -> None:
        """Put scheduled ``lr``/``weight_decay`` into every optimizer's param groups (:func:`write_hyperparameters`),
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
            values = hparams_at(trainer, trainer.global_step)
            if values:
                self.apply_hparams(trainer, values)

    # ------------------------------------------------------------------------------------ the Lightning hooks
    def training_step(self, batch: Any) -> Tensor:
        m = self.module
        trainer = m.trainer
        if self.mode == "stepwise":
            ctx = self.run_step(trainer.global_step, batch)
            self._pending = ctx
            self._log(ctx)
            return self._loss_value(ctx)
        # fused: every step of the chunk, updates included
        chunk = batch if hasattr(batch, "length") and hasattr(batch, "batch") else None
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
        return self._loss_value(ctx)

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

    @staticmethod
    def _loss_value(ctx: StepContext) -> Tensor:
        losses = ctx.losses
        active = ctx.module.replica_active
        if active is not None:
            losses = torch.where(active, losses, torch.zeros_like(losses))
        return losses.sum().detach()

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
