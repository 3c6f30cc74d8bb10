"""The declared interfaces between a model, its datamodule and the engine (no attribute back-channels).

- A datamodule that serves a lightning_flat model reads the model's [`StepPlan`][lightning_flat.engine.StepPlan] (its
  [`Replicas`][lightning_flat.engine.Replicas], whose seeds key the minibatch streams, and how many SGD steps each
  ``training_step`` call runs) and yields [`StepChunk`][lightning_flat.engine.StepChunk] items for fused calls.
- A model reads its datamodule's [`MeasurementProblem`][lightning_flat.engine.MeasurementProblem] (the full training
  data, the test error), when the datamodule provides one.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from lightning_flat.engine.replicas import Replicas

__all__ = ["StepPlan", "MeasurementProblem", "StepChunk", "EngineDriven", "WeightLoss"]


@runtime_checkable
class StepPlan(Protocol):
    """What a sampler needs from the module it feeds: the runs whose seeds key the minibatch streams, and the SGD
    steps of the ``training_step`` call that starts at a global step (1: one step per call)."""

    replicas: Replicas

    def steps_in_call(self, step: int) -> int: ...


@runtime_checkable
class MeasurementProblem(Protocol):
    """What a model reads from its datamodule: the full training measurements and targets in a dtype, the error of
    an end-to-end matrix on the ground truth (``has_ground_truth()`` says whether there is one) and the scale that
    makes it relative."""

    def measurements_as(self, dtype: torch.dtype, device: torch.device | str = "cpu") -> tuple[Any, Tensor]: ...

    def has_ground_truth(self) -> bool: ...

    def test_error(self, E: Tensor) -> Tensor: ...

    def test_error_scale(self) -> float: ...


class StepChunk:
    """Global steps ``[start, start + length)`` run by one ``training_step`` call (a fused chunk). ``batch(step)``
    makes each step's batch when the engine runs that step, so a chunk costs nothing to yield; ``source`` is the
    sampler, whose ``batch(step, generator, scratch)`` makes them."""

    __slots__ = ("start", "length", "source", "_generator", "_scratch")

    def __init__(self, start: int, length: int, source: Any, generator: torch.Generator | None = None,
                 scratch: dict[str, Tensor] | None = None) -> None:
        self.start, self.length, self.source = start, length, source
        self._generator = generator
        self._scratch = scratch

    def batch(self, step: int) -> Any:
        """The batch of global step ``step`` (the same values the sampler yields for that step one at a time). Its
        tensors may reuse the memory of the previous step's batch: it is valid until the next call."""
        if not self.start <= step < self.start + self.length:
            raise IndexError(f"step {step} is outside this chunk's steps [{self.start}, {self.start + self.length})")
        return self.source.batch(step, self._generator, self._scratch)

    def __repr__(self) -> str:
        return f"StepChunk(start={self.start}, length={self.length})"


@runtime_checkable
class EngineDriven(Protocol):
    """A module whose training engine runs the [`StepHook`][lightning_flat.engine.StepHook] phases itself (then the
    Lightning-hook driver leaves them alone)."""

    def engine_drives_step_hooks(self) -> bool: ...


@runtime_checkable
class WeightLoss(Protocol):
    """A module whose loss is a pure function of its trained tensors (the lightning_flat models): ``weights()`` and
    ``loss_from_weights(weights, batch)`` (summed over replicas)."""

    def weights(self) -> list[Tensor]: ...

    def loss_from_weights(self, weights: list[Tensor], batch: Any) -> Tensor: ...
