"""Stop a run cleanly on a non-finite loss, before the bad update reaches the weights."""

from __future__ import annotations

import logging
import math
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_flat._checks import check_bool, check_choice, check_positive_int
from lightning_flat.engine.hooks import StepContext, StepHook, engine_drives

__all__ = ["FiniteLossGuard"]

log = logging.getLogger(__name__)


class FiniteLossGuard(StepHook, Callback):
    """Stop training when the training loss (or, with ``check_grads``, a gradient) is not finite.

    The check runs after the backward pass and before the optimizer step. On a non-finite value the gradients are
    dropped (``grad = None``, so SGD leaves the weights, momentum and ridge untouched: the weights stay those of the
    last finite step and a checkpoint written afterwards holds them), ``trainer.should_stop`` is set, and a warning
    names the step and the value. The decision is combined across ranks. ``stopped_step``, ``stopped_value`` and
    ``message`` keep what happened.

    With replicas (a lightning_flat model with ``replicas > 1``) the model itself freezes a replica whose loss turns
    non-finite; the guard then stops the run when all replicas have diverged (``replicas="all"``, default) or at
    the first one (``replicas="any"``), and ``check_grads`` looks at the active replicas' gradients only.

    On the lightning_flat models the training engine runs the check at every SGD step (also inside fused chunks,
    see :class:`~lightning_flat.engine.StepHook`) and does not apply the update of a failed step; on any other
    LightningModule it runs in ``on_before_optimizer_step``.

    With a :class:`SAM` callback in the Trainer the gradients are always checked: its ascent point can turn the
    gradient non-finite while the loss is still finite, and that update is refused like a non-finite loss.

    Args:
        every_n_steps: check period in optimizer steps (1: every step; the check costs one scalar read).
        check_grads: also check every gradient (costs a reduction per parameter).
        replicas: ``"all"`` or ``"any"``, see above.
    """

    fused_safe_hooks = ("on_before_backward", "on_before_optimizer_step")

    def __init__(self, every_n_steps: int = 1, check_grads: bool = False, replicas: str = "all") -> None:
        self.every_n_steps = check_positive_int("every_n_steps", every_n_steps)
        self.check_grads = check_bool("check_grads", check_grads)
        self.replicas = check_choice("replicas", replicas, ("all", "any"))
        self.stopped_step: int | None = None
        self.stopped_value: float | None = None
        self.message: str | None = None
        self._loss: Tensor | None = None
        self._grads = self.check_grads

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        from lightning_flat.callbacks.sam import SAM

        self._grads = self.check_grads or any(isinstance(cb, SAM) for cb in trainer.callbacks)

    def _stop(self, step: int, value: float, what: str) -> str:
        self.stopped_step, self.stopped_value = step, value
        self.message = (
            f"FiniteLossGuard: non-finite {what} at step {step} (loss = {value}); stopping. "
            f"The weights are those of step {step}: this update was not applied."
        )
        rank_zero_warn(self.message)
        return self.message

    def _replica_verdict(self, pl_module: L.LightningModule, active: Tensor) -> str | None:
        """With replicas: what went wrong under the ``replicas`` policy, or ``None`` when training may go on."""
        if bool(active.any()) if self.replicas == "all" else bool(active.all()):
            return None
        diverged = getattr(pl_module, "diverged", {})
        return (f"loss in {'every replica' if self.replicas == 'all' else 'a replica'} "
                f"(diverged replicas and their (step, loss): {dict(sorted(diverged.items()))})")

    def step_check(self, ctx: StepContext) -> None:
        if ctx.step % self.every_n_steps:
            return
        losses, active = ctx.losses, getattr(ctx.module, "replica_active", None)
        if active is None:
            what = None if math.isfinite(float(losses)) else "training loss"
        else:
            what = self._replica_verdict(ctx.module, active)
        if what is None and self._grads:
            for g in ctx.grads:
                if not bool(torch.isfinite(g if active is None else g[active]).all()):
                    what = "gradient"
                    break
        if what is not None:
            value = float(losses if active is None else torch.where(active, losses, torch.zeros_like(losses)).sum())
            ctx.stop = self._stop(ctx.step, value, what)

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        if engine_drives(pl_module):
            self._loss = None
        elif self._loss is None or bool(torch.isfinite(self._loss).all()):
            # under gradient accumulation: the first non-finite micro-batch loss of the step is kept
            self._loss = loss.detach()

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        loss, self._loss = self._loss, None  # the next step's micro-batches start afresh
        if trainer.global_step % self.every_n_steps or loss is None or engine_drives(pl_module):
            return
        value = float(loss)
        bad = not math.isfinite(value)
        what = "training loss"
        active = getattr(pl_module, "replica_active", None)
        if active is not None and not bad:
            verdict = self._replica_verdict(pl_module, active)
            bad, what = verdict is not None, verdict or what
        if not bad and self._grads:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
                        bad, what = True, "gradient"
                        break
        bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if not bad:
            return
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
        trainer.should_stop = True
        self._stop(trainer.global_step, value, what)

    def state_dict(self) -> dict[str, Any]:
        return {"stopped_step": self.stopped_step, "stopped_value": self.stopped_value}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.stopped_step = state_dict.get("stopped_step")
        self.stopped_value = state_dict.get("stopped_value")
