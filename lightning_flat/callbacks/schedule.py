"""Piecewise hyperparameter schedules (learning rate, ridge, label noise) applied at the start of each step."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any, Union

import lightning as L
from lightning.pytorch.callbacks import Callback

from lightning_flat._checks import check_positive_int, check_real
from lightning_flat.callbacks.label_noise import LabelNoise

__all__ = ["HyperparameterSchedule", "Phases"]

ScheduleSpec = Union[float, list[tuple[int, float]], None]


class Phases:
    """A piecewise-constant schedule: ``[(step_0 = 0, value_0), (step_1, value_1), ...]``; ``value(s)`` is the value
    of the last phase with ``step_k <= s``."""

    def __init__(self, name: str, spec: Any, low: float = 0.0) -> None:
        if isinstance(spec, numbers.Real) and not isinstance(spec, bool):
            phases = [(0, spec)]
        elif isinstance(spec, Sequence) and not isinstance(spec, str) and len(spec) > 0:
            phases = []
            for k, item in enumerate(spec):
                if not isinstance(item, Sequence) or isinstance(item, str) or len(item) != 2:
                    raise ValueError(f"{name}[{k}] must be a (step, value) pair, got {item!r}")
                phases.append((item[0], item[1]))
        else:
            raise ValueError(f"{name} must be a number or a list of (step, value) pairs starting at step 0, got {spec!r}")
        steps = []
        for k, (step, value) in enumerate(phases):
            integral = isinstance(step, numbers.Integral) or (isinstance(step, float) and step.is_integer())
            if isinstance(step, bool) or not integral or step < 0:
                raise ValueError(f"{name}[{k}] step must be a non-negative int, got {step!r}")
            check_real(f"{name}[{k}] value", value, low=low)
            steps.append(int(step))
        if steps[0] != 0:
            raise ValueError(f"{name} must start with a phase at step 0, got first step {steps[0]}")
        if any(b <= a for a, b in zip(steps, steps[1:])):
            raise ValueError(f"{name} phase steps must increase strictly, got {steps}")
        self.name = name
        self.steps = steps
        self.values = [float(v) for _, v in phases]

    def value(self, step: int) -> float:
        k = 0
        while k + 1 < len(self.steps) and self.steps[k + 1] <= step:
            k += 1
        return self.values[k]

    def __repr__(self) -> str:
        return f"Phases({self.name}, {list(zip(self.steps, self.values))})"


class HyperparameterSchedule(Callback):
    """Set the learning rate, ridge (weight decay) and label-noise std of each step from a schedule.

    Each of ``lr``, ``weight_decay`` and ``label_noise`` is ``None`` (left alone), a constant, or a list of
    ``(step, value)`` phases starting at step 0, e.g. ``label_noise=[(0, 1.0), (300000, 0.0)]`` (noisy phase, then a
    noiseless polish). The values of step ``s`` are applied before step ``s`` runs (at the start of training and
    after each optimizer step), to every param group of every optimizer and to every :class:`LabelNoise` callback
    of the trainer, whatever the callbacks' order. Values are functions of the step only, so a resumed run follows
    the same schedule.

    Logged keys (at the start, on every change and every ``every_n_steps``): ``hparams/lr``,
    ``hparams/weight_decay``, ``hparams/label_noise`` for the scheduled ones.
    """

    def __init__(self, lr: ScheduleSpec = None, weight_decay: ScheduleSpec = None, label_noise: ScheduleSpec = None,
                 every_n_steps: int = 1000) -> None:
        self.schedules: dict[str, Phases] = {}
        for name, spec in (("lr", lr), ("weight_decay", weight_decay), ("label_noise", label_noise)):
            if spec is not None:
                self.schedules[name] = Phases(name, spec)
        if not self.schedules:
            raise ValueError("HyperparameterSchedule needs at least one of lr, weight_decay, label_noise")
        self.every_n_steps = check_positive_int("every_n_steps", every_n_steps)
        self.current: dict[str, float] = {}

    def values(self, step: int) -> dict[str, float]:
        return {name: s.value(step) for name, s in self.schedules.items()}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if "label_noise" in self.schedules and not any(isinstance(c, LabelNoise) for c in trainer.callbacks):
            raise ValueError("HyperparameterSchedule(label_noise=...) needs a LabelNoise callback in the Trainer")

    def _apply(self, trainer: L.Trainer) -> None:
        step = trainer.global_step
        values = self.values(step)
        for opt in trainer.optimizers:
            for group in opt.param_groups:
                if "lr" in values:
                    group["lr"] = values["lr"]
                if "weight_decay" in values:
                    group["weight_decay"] = values["weight_decay"]
        if "label_noise" in values:
            for cb in trainer.callbacks:
                if isinstance(cb, LabelNoise):
                    cb.std = values["label_noise"]
        changed = values != self.current
        self.current = values
        if (changed or step % self.every_n_steps == 0) and trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics({f"hparams/{k}": v for k, v in values.items()}, step=step)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._apply(trainer)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._apply(trainer)
