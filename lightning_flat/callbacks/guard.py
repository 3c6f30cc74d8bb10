"""Stop a run cleanly on a non-finite loss, before the bad update reaches the weights."""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from lightning_flat._checks import check_bool, check_choice, check_positive_int
from lightning_flat.engine.hooks import StepContext, StepHook

__all__ = ["FiniteLossGuard"]

log = logging.getLogger(__name__)


class FiniteLossGuard(StepHook):
    """Stop training when the training loss (or, with ``check_grads``, a gradient) is not finite.

    The check runs after the gradients and before the update. On a non-finite value the update is not applied (the
    weights, momentum and ridge stay those of the last finite step, and a checkpoint written afterwards holds them),
    ``trainer.should_stop`` is set, and a warning names the step and the value. The decision is combined across
    ranks. ``stopped_step``, ``stopped_value`` and ``message`` keep what happened.

    With replicas (a lightning_flat model with ``replicas > 1``) the model itself freezes a replica whose loss turns
    non-finite; the guard then stops the run when all replicas have diverged (``replicas="all"``, default) or at
    the first one (``replicas="any"``), and ``check_grads`` looks at the active replicas' gradients only.

    It acts at every SGD step through the ``step_check`` phase ([`StepHook`][lightning_flat.engine.StepHook]): inside
    the engine's fused chunks on the lightning_flat models, in ``on_before_optimizer_step`` on any other module
    (where the gradients are then dropped, so the optimizer step leaves everything as it was). Under gradient
    accumulation a non-finite micro-batch loss stops the step.

    With a [`SAM`][lightning_flat.callbacks.SAM] callback in the Trainer the gradients are always checked: its ascent
    point can turn the gradient non-finite while the loss is still finite, and that update is refused like a non-finite
    loss.

    Args:
        every_n_steps: check period in optimizer steps (1: every step; the check costs one scalar read).
        check_grads: also check every gradient (costs a reduction per parameter).
        replicas: ``"all"`` or ``"any"``, see above.

    Raises:
        ValueError: ``every_n_steps`` not a positive int, ``replicas`` not ``"all"``/``"any"``.
        TypeError: ``check_grads`` not a bool.
    """

    def __init__(self, every_n_steps: int = 1, check_grads: bool = False, replicas: str = "all") -> None:
        self.every_n_steps = check_positive_int("every_n_steps", every_n_steps)
        self.check_grads = check_bool("check_grads", check_grads)
        self.replicas = check_choice("replicas", replicas, ("all", "any"))
        self.stopped_step: int | None = None
        self.stopped_value: float | None = None
        self.message: str | None = None
        self._grads = self.check_grads

    @property
    def state_key(self) -> str:
        return (f"{type(self).__qualname__}{{'every_n_steps': {self.every_n_steps}, 'check_grads': {self.check_grads},"
                f" 'replicas': {self.replicas!r}}}")

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

    def step_check(self, ctx: StepContext) -> None:
        if ctx.step % self.every_n_steps or ctx.losses is None:
            return
        reps = ctx.replicas
        what = None
        if reps.stop_reason(ctx.losses, self.replicas) is not None:
            what = "training loss" if not reps.dims else \
                (f"loss in {'every replica' if self.replicas == 'all' else 'a replica'} (diverged replicas and their "
                 f"(step, loss): {dict(sorted(reps.diverged.items()))})")
        if what is None and self._grads and ctx.grads is not None:
            active = reps.active if reps.dims else None
            for g in ctx.grads:
                if g is not None and not bool(torch.isfinite(g if active is None else g[active]).all()):
                    what = "gradient"
                    break
        if what is not None:
            ctx.stop = self._stop(ctx.step, reps.loss_value(ctx.losses), what)

    def state_dict(self) -> dict[str, Any]:
        return {"stopped_step": self.stopped_step, "stopped_value": self.stopped_value}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.stopped_step = state_dict.get("stopped_step")
        self.stopped_value = state_dict.get("stopped_value")
