"""Hyperparameter schedules (learning rate, ridge, label noise, SAM radius) applied before each optimizer step."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any, Union

import lightning as L

from lightning_flat._checks import check_positive_int, check_real
from lightning_flat.engine.hooks import StepContext, StepHook
from lightning_flat.engine.replicas import replicas_of

__all__ = ["HyperparameterSchedule", "Schedule", "SHAPES"]

#: The named shapes and their parameters (see `Schedule`).
SHAPES = {
    "constant": ("value",),
    "anneal": ("high", "low", "at"),
    "periodic": ("values", "lengths"),
    "cosine": ("start", "end", "steps"),
    "linear_warmup": ("value", "steps"),
}

ScheduleSpec = Union[float, dict, list, None]


def _is_number(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _step(name: str, x: Any) -> int:
    integral = isinstance(x, numbers.Integral) or (isinstance(x, float) and x.is_integer())
    if isinstance(x, bool) or not integral or x < 0:
        raise ValueError(f"{name} must be a non-negative int step, got {x!r}")
    return int(x)


class _Shape:
    """One named shape, evaluated at a step counted from the start of its segment."""

    def __init__(self, name: str, spec: dict) -> None:
        shape = spec.get("shape")
        if shape not in SHAPES:
            raise ValueError(f"{name}: shape must be one of {', '.join(map(repr, SHAPES))}, got {shape!r}")
        allowed = set(SHAPES[shape]) | {"shape", "start", "cycles"}
        unknown = set(spec) - allowed
        missing = [k for k in SHAPES[shape] if k not in spec]
        if unknown:
            raise ValueError(f"{name}: {shape!r} takes {sorted(allowed - {'shape'})}, got unknown {sorted(unknown)}")
        if missing:
            raise ValueError(f"{name}: {shape!r} needs {list(SHAPES[shape])}, missing {missing}")
        self.shape = shape
        v = lambda key: check_real(f"{name}.{key}", spec[key], low=0.0)  # noqa: E731
        if shape == "constant":
            self.value_ = v("value")
        elif shape == "anneal":
            self.high, self.low, self.at = v("high"), v("low"), _step(f"{name}.at", spec["at"])
        elif shape == "periodic":
            values, lengths = spec["values"], spec["lengths"]
            if not isinstance(values, Sequence) or not isinstance(lengths, Sequence) or len(values) != len(lengths) \
                    or len(values) == 0:
                raise ValueError(f"{name}: periodic needs values and lengths of one non-zero length, got "
                                 f"{values!r} and {lengths!r}")
            self.values = [check_real(f"{name}.values[{i}]", x, low=0.0) for i, x in enumerate(values)]
            self.lengths = [check_positive_int(f"{name}.lengths[{i}]", x) for i, x in enumerate(lengths)]
            self.cycles = None if spec.get("cycles") is None else check_positive_int(f"{name}.cycles", spec["cycles"])
        elif shape == "cosine":
            self.start, self.end = v("start"), v("end")
            self.steps = check_positive_int(f"{name}.steps", spec["steps"])
        else:  # linear_warmup
            self.value_ = v("value")
            self.steps = check_positive_int(f"{name}.steps", spec["steps"])
            self.start = check_real(f"{name}.start", spec.get("start", 0.0), low=0.0)

    def value(self, t: int) -> float:
        if self.shape == "constant":
            return self.value_
        if self.shape == "anneal":
            return self.high if t < self.at else self.low
        if self.shape == "periodic":
            period = sum(self.lengths)
            if self.cycles is not None and t >= self.cycles * period:
                return self.values[-1]
            t %= period
            for value, length in zip(self.values, self.lengths):
                if t < length:
                    return value
                t -= length
        if self.shape == "cosine":
            if t >= self.steps:
                return self.end
            return self.end + 0.5 * (self.start - self.end) * (1.0 + math.cos(math.pi * t / self.steps))
        # linear_warmup
        if t >= self.steps:
            return self.value_
        return self.start + (self.value_ - self.start) * t / self.steps


class Schedule:
    r"""A hyperparameter as a function of the optimizer step.

    ``spec`` is one of

    - a number: constant;
    - a named shape, a dict with ``"shape"``:

      - ``{"shape": "anneal", "high": h, "low": l, "at": s}``: ``h`` before step ``s``, ``l`` from it on;
      - ``{"shape": "periodic", "values": [v1, v2, ...], "lengths": [n1, n2, ...], "cycles": k}``: ``v1`` for
        ``n1`` steps, then ``v2`` for ``n2`` steps, ..., repeated (``k`` times, then the last value; default forever);
      - ``{"shape": "cosine", "start": a, "end": b, "steps": T}``: $b + \frac{a-b}2(1+\cos(\pi t/T))$, then ``b``;
      - ``{"shape": "linear_warmup", "value": v, "steps": T, "start": a}``: linear from ``a`` (default 0) to ``v``
        over ``T`` steps, then ``v``;
      - ``{"shape": "constant", "value": v}``;
    - a list of ``(step, segment)`` phases starting at step 0, each segment a number or a named shape whose step
      counts from the segment's start, e.g. ``[(0, 0.03), (500, {"shape": "periodic", "values": [0.4, 0.1],
      "lengths": [1000, 1000]})]``.

    All values must be >= 0.
    """

    def __init__(self, name: str, spec: Any) -> None:
        self.name = name
        self.spec = spec
        if _is_number(spec) or isinstance(spec, dict):
            spec = [(0, spec)]
        if isinstance(spec, str) or not isinstance(spec, Sequence) or len(spec) == 0:
            raise ValueError(f"{name} must be a number, a named shape (dict with 'shape') or a list of (step, value) "
                             f"phases starting at step 0, got {self.spec!r}")
        self.starts: list[int] = []
        self.segments: list[float | _Shape] = []
        for k, item in enumerate(spec):
            if isinstance(item, str) or not isinstance(item, Sequence) or len(item) != 2:
                raise ValueError(f"{name}[{k}] must be a (step, value) pair, got {item!r}")
            start, seg = item
            self.starts.append(_step(f"{name}[{k}] step", start))
            if isinstance(seg, dict):
                self.segments.append(_Shape(f"{name}[{k}]", seg))
            else:
                self.segments.append(check_real(f"{name}[{k}] value", seg, low=0.0))
        if self.starts[0] != 0:
            raise ValueError(f"{name} must start with a phase at step 0, got first step {self.starts[0]}")
        if any(b <= a for a, b in zip(self.starts, self.starts[1:])):
            raise ValueError(f"{name} phase steps must increase strictly, got {self.starts}")

    def value(self, step: int) -> float:
        k = 0
        while k + 1 < len(self.starts) and self.starts[k + 1] <= step:
            k += 1
        seg = self.segments[k]
        return seg.value(step - self.starts[k]) if isinstance(seg, _Shape) else seg

    def __repr__(self) -> str:
        return f"Schedule({self.name}, {self.spec!r})"


class ReplicaSchedule:
    """One `Schedule` per replica: ``{"replicas": [spec_0, ..., spec_{R-1}]}`` or a list of numbers (one
    constant per replica). ``value(step)`` is the list of the replicas' values."""

    def __init__(self, name: str, spec: Any) -> None:
        specs = spec["replicas"] if isinstance(spec, dict) else spec
        if isinstance(spec, dict) and set(spec) != {"replicas"}:
            raise ValueError(f"{name}: a per-replica schedule is {{'replicas': [spec, ...]}}, got keys {sorted(spec)}")
        if isinstance(specs, str) or not isinstance(specs, Sequence) or len(specs) == 0:
            raise ValueError(f"{name}: 'replicas' must list one schedule per replica, got {specs!r}")
        self.name, self.spec = name, spec
        self.schedules = [Schedule(f"{name}[replica {r}]", x) for r, x in enumerate(specs)]

    def value(self, step: int) -> list[float]:
        return [s.value(step) for s in self.schedules]

    def __len__(self) -> int:
        return len(self.schedules)

    def __repr__(self) -> str:
        return f"ReplicaSchedule({self.name}, {self.spec!r})"


def _parse(name: str, spec: Any) -> Schedule | ReplicaSchedule:
    if isinstance(spec, dict) and "replicas" in spec:
        return ReplicaSchedule(name, spec)
    if isinstance(spec, (list, tuple)) and len(spec) > 0 and all(_is_number(x) for x in spec):
        return ReplicaSchedule(name, list(spec))  # a list of numbers: one constant per replica
    return Schedule(name, spec)


class HyperparameterSchedule(StepHook):
    """Set the learning rate, ridge (weight decay), label-noise std and SAM radius of each step from schedules.

    Each of ``lr``, ``weight_decay``, ``label_noise`` and ``sam_rho`` is ``None`` (left alone) or a `Schedule`
    spec: a constant, a named shape (``"anneal"``, ``"periodic"``, ``"cosine"``, ``"linear_warmup"``) or a list of
    ``(step, value-or-shape)`` phases, e.g. ``label_noise=[(0, 1.0), (300000, 0.0)]`` (noisy phase, then a noiseless
    polish). With replicas, ``lr``, ``weight_decay`` and ``label_noise`` may be per replica:
    ``{"replicas": [spec_0, ..., spec_{R-1}]}``, or a list of numbers for per-replica constants.

    The values of step ``s`` are in place when step ``s`` runs, whatever the callbacks' order: the learning rate and
    ridge in every param group of every optimizer; the label-noise std and the SAM radius are read by
    [`LabelNoise`][lightning_flat.callbacks.LabelNoise] and [`SAM`][lightning_flat.callbacks.SAM] from this schedule
    (their own ``std``/``rho`` are the values without a schedule and are never changed). The values of every SGD step
    are set through the ``step_hparams`` phase ([`StepHook`][lightning_flat.engine.StepHook]: inside the engine's fused
    chunks on the lightning_flat models, from Lightning's hooks on any other module, where the param groups also hold
    the coming step's values between steps). Values depend on the step only, so a resumed run follows the same schedule.

    Logged keys (at the first step, at every change of value and every ``every_n_steps``): ``hparams/lr``,
    ``hparams/weight_decay``, ``hparams/label_noise``, ``hparams/sam_rho`` for the scheduled ones (per-replica
    values: their mean and ``.../r{k}``).
    """

    def __init__(self, lr: ScheduleSpec = None, weight_decay: ScheduleSpec = None, label_noise: ScheduleSpec = None,
                 sam_rho: ScheduleSpec = None, every_n_steps: int = 1000) -> None:
        self.schedules: dict[str, Schedule | ReplicaSchedule] = {}
        for name, spec in (("lr", lr), ("weight_decay", weight_decay), ("label_noise", label_noise),
                           ("sam_rho", sam_rho)):
            if spec is not None:
                self.schedules[name] = _parse(name, spec)
        if isinstance(self.schedules.get("sam_rho"), ReplicaSchedule):
            raise ValueError("sam_rho cannot be set per replica")
        if not self.schedules:
            raise ValueError("HyperparameterSchedule needs at least one of lr, weight_decay, label_noise, sam_rho")
        self.every_n_steps = check_positive_int("every_n_steps", every_n_steps)
        self.current: dict[str, float | list[float]] = {}

    @property
    def state_key(self) -> str:
        from lightning_flat.callbacks.base import config_state_key

        return config_state_key(self, {**{k: s.spec for k, s in self.schedules.items()},
                                       "every_n_steps": self.every_n_steps})

    def values(self, step: int) -> dict[str, float | list[float]]:
        """The scheduled values of global step ``step``."""
        return {name: s.value(step) for name, s in self.schedules.items()}

    def hparams(self, step: int) -> dict[str, float | list[float]]:
        return self.values(step)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        from lightning_flat.callbacks.label_noise import LabelNoise
        from lightning_flat.callbacks.sam import SAM

        for name, kind in (("label_noise", LabelNoise), ("sam_rho", SAM)):
            if name in self.schedules and not any(isinstance(c, kind) for c in trainer.callbacks):
                raise ValueError(f"HyperparameterSchedule({name}=...) needs a {kind.__name__} callback in the Trainer")
        replicas = replicas_of(pl_module).count
        for name, sched in self.schedules.items():
            if isinstance(sched, ReplicaSchedule) and len(sched) != replicas:
                raise ValueError(f"HyperparameterSchedule({name}=...) has {len(sched)} per-replica schedules but the "
                                 f"model has {replicas} replica(s)")

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if "lr" in self.schedules and trainer.lr_scheduler_configs:
            names = ", ".join(type(c.scheduler).__name__ for c in trainer.lr_scheduler_configs)
            raise ValueError(f"HyperparameterSchedule(lr=...) and the module's learning-rate scheduler ({names}) would "
                             f"both set the learning rate, compounding each other: keep one (drop lr= here, or return "
                             f"no scheduler from configure_optimizers)")

    def _record(self, trainer: L.Trainer, step: int, values: dict[str, Any]) -> None:
        """Keep ``values`` as the current ones and log them at a change or every ``every_n_steps``."""
        changed = values != self.current
        self.current = values
        if (changed or step % self.every_n_steps == 0) and trainer.is_global_zero:
            metrics = {}
            for k, v in values.items():
                if isinstance(v, list):
                    metrics[f"hparams/{k}"] = sum(v) / len(v)
                    metrics.update({f"hparams/{k}/r{r}": x for r, x in enumerate(v[:4])})
                else:
                    metrics[f"hparams/{k}"] = v
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)

    def step_hparams(self, ctx: StepContext) -> None:
        values = self.values(ctx.step)
        ctx.hparams.update(values)
        self._record(ctx.trainer, ctx.step, values)

    def state_dict(self) -> dict[str, Any]:
        return {"current": dict(self.current)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.current = dict(state_dict.get("current", {}))
