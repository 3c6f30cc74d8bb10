"""A recorder of a run's weights, batch losses and end-to-end products at chosen steps, through the engine's step
interface (so fused chunks stay fused)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from lightning.pytorch.callbacks import Callback

from lightning_flat.engine import StepContext, StepHook

__all__ = ["StepRecorder"]


class StepRecorder(StepHook, Callback):
    """Record a run of a lightning_flat model step by step.

    At every step ``t >= track_from`` (``None``: never) it keeps the batch ``losses`` and, with ``products``, the
    end-to-end product ``module.end_to_end_from(weights)``, both of the state after ``t`` updates; at each step of
    ``snapshot_steps``, and at the end of training, it keeps a copy of the weights in ``snapshots[t]`` (a list in the
    optimizer's order, with the replica dimension when the model has replicas).

    Args:
        snapshot_steps: the steps whose weights are kept.
        track_from: the first step whose loss and product are kept (``None``: none).
        products: keep the end-to-end products along with the losses.
    """

    def __init__(self, snapshot_steps: Iterable[int] = (), track_from: int | None = None,
                 products: bool = True) -> None:
        self.snapshot_steps, self.track_from, self.record_products = set(snapshot_steps), track_from, products
        self.losses: list[torch.Tensor] = []
        self.products: list[torch.Tensor] = []
        self.snapshots: dict[int, list[torch.Tensor]] = {}

    def step_check(self, ctx: StepContext) -> None:  # the last phase before the update: the state after ctx.step
        if self.track_from is not None and ctx.step >= self.track_from:
            self.losses.append(ctx.losses.detach().clone())
            if self.record_products:
                with torch.no_grad():
                    self.products.append(ctx.module.end_to_end_from(ctx.weights).detach().clone())
        if ctx.step in self.snapshot_steps:
            self.snapshots[ctx.step] = [w.detach().clone() for w in ctx.weights]

    def on_train_end(self, trainer, pl_module) -> None:
        self.snapshots[trainer.global_step] = [w.detach().clone() for w in pl_module.weights()]
