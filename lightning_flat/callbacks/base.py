"""Shared shell of the measuring callbacks: cadence, history, logging straight to the trainer's loggers."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from lightning_flat._checks import check_positive_int
from lightning_flat.engine.hooks import BoundaryHook
from lightning_flat.engine.replicas import LOG_REPLICAS, replicas_of

__all__ = ["MeasuringCallback", "results_table", "config_state_key"]


def _plain(value: Any) -> Any:
    """A value as it appears in a state key: callables by their qualified name, containers item by item."""
    if isinstance(value, (str, int, float, bool, type(None))):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if callable(value):
        return getattr(value, "__qualname__", None) or type(value).__qualname__
    return repr(value)


def config_state_key(obj: Any, config: dict[str, Any]) -> str:
    """``ClassName{config}`` with every configuration value in plain form: two differently configured instances of
    one class get different keys (so both can sit in one Trainer and keep their checkpoint state apart)."""
    return f"{type(obj).__qualname__}{ {k: _plain(v) for k, v in config.items()} }"


class MeasuringCallback(BoundaryHook, Callback):
    """Base of the callbacks that measure the model every ``every_n_steps`` optimizer steps.

    A measurement is taken whenever ``trainer.global_step`` is a multiple of ``every_n_steps`` (step 0 of a fresh
    run included, at the start of training) and at the end of training; a resumed run continues the same cadence.
    Step ``s`` means the weights after ``s`` updates. Values are written to every logger of the trainer at
    ``step = global_step`` (so they are never dropped by ``Trainer(log_every_n_steps)``), kept in
    ``self.history[key] = [(step, value), ...]``, and the last ones in ``self.last``. The values measured during
    training also reach ``trainer.callback_metrics`` (through ``pl_module.log(..., logger=False)``), so
    ``EarlyStopping(monitor="hessian/sharpness")`` and ``ModelCheckpoint(monitor=...)`` can watch them, also with
    ``logger=False``. A monitored key changes only when a read happens; when such a monitor watches one of this
    callback's keys, the callback also reads at the last batch of every epoch, so each of the monitor's epoch-end
    checks sees a value read since its previous check (``EarlyStopping``'s patience counts its checks, each on a fresh
    read, never a stale repeat; with epochs shorter than ``every_n_steps`` that is one read per epoch).

    Replicas: ``measure`` may return per-replica values of shape ``(R,)``. They are logged as their mean over the
    active (not diverged) replicas under the key and one by one as ``key/r{k}`` for the first ``log_replicas``
    replicas; ``self.replica_history[key] = [(step, [v_0, ..., v_{R-1}]), ...]`` keeps them all, and at the end of
    training a wandb logger gets them as a Table (``replica_table()``).

    Subclasses implement ``measure(trainer, pl_module) -> dict``; it runs under ``torch.no_grad()`` and must not
    change the model or any global random state, and ``config()`` (every constructor argument), from which the
    checkpoint ``state_key`` is built. On the lightning_flat models the training engine ends its fused chunks at the
    measured steps (`next_boundary`).
    """

    group = "measure"
    log_replicas = LOG_REPLICAS
    #: At the end of training the last measuring callback of the Trainer logs (INFO, rank zero) one table of every
    #: measuring callback's keys: `results_table`. Set to False on the class or an instance to skip it.
    print_results = True
    fused_safe_hooks = ("on_train_batch_start", "on_train_batch_end")

    def __init__(self, every_n_steps: int = 100) -> None:
        self.every_n_steps = check_positive_int("every_n_steps", every_n_steps)
        self.history: dict[str, list[tuple[int, float]]] = {}
        self.replica_history: dict[str, list[tuple[int, list[float]]]] = {}
        self.last: dict[str, float] = {}
        self._last_step: int | None = None
        self._state_key: str | None = None

    def config(self) -> dict[str, Any]:
        """Every constructor argument (extended by subclasses): what tells two instances apart in a checkpoint."""
        return {"every_n_steps": self.every_n_steps}

    @property
    def state_key(self) -> str:
        # Lightning reads state_key on every hook call of every step: build the string once.
        if self._state_key is None:
            self._state_key = config_state_key(self, self.config())
        return self._state_key

    def ready(self) -> bool:
        """Whether a measurement can be taken now (e.g. a curvature callback's batches are kept)."""
        return True

    def observe(self, trainer: L.Trainer, batch: Any) -> bool:
        """Look at a training batch before its step; True when the callback became ready with it."""
        return False

    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:  # pragma: no cover
        raise NotImplementedError

    def rename(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """The keys as logged (subclasses may map them, e.g. to another group); identity here."""
        return metrics

    def next_boundary(self, step: int) -> int:
        return (step // self.every_n_steps + 1) * self.every_n_steps

    def _run(self, trainer: L.Trainer, pl_module: L.LightningModule, monitor: bool = False) -> None:
        step = trainer.global_step
        if self._last_step == step or not self.ready():
            return
        self._last_step = step
        with torch.no_grad():
            metrics = self.rename(self.measure(trainer, pl_module))
        reps = replicas_of(pl_module)
        values: dict[str, float] = {}  # one value per key (the mean over active replicas), kept in history
        logged: dict[str, float] = {}  # what goes to the loggers: finite values of active replicas only
        for k, v in metrics.items():
            v = v.detach().to(torch.float64) if isinstance(v, Tensor) else torch.as_tensor(v, dtype=torch.float64)
            if v.ndim >= 1:
                v = reps.mask(v)  # a frozen replica is not measured
                self.replica_history.setdefault(k, []).append((step, [float(x) for x in v.cpu()]))
            values[k] = float(reps.mean(v))
            logged.update({name: float(x) for name, x in reps.metrics(k, v).items()})
        for k, v in values.items():
            self.history.setdefault(k, []).append((step, v))
        self.last = values
        if trainer.is_global_zero and logged:
            for logger in trainer.loggers:
                logger.log_metrics(logged, step=step)
        if monitor:
            # into trainer.callback_metrics (for EarlyStopping / ModelCheckpoint(monitor=...)), not to the loggers
            # again: the finite mean over active replicas under each key
            for k, v in values.items():
                if math.isfinite(v):
                    pl_module.log(k, v, on_step=True, on_epoch=False, logger=False, batch_size=1,
                                  rank_zero_only=True)

    def replica_table(self) -> tuple[list[str], list[list[float]]]:
        """``(columns, rows)``: one row per measured step and replica, one column per per-replica key."""
        keys = sorted(self.replica_history)
        if not keys:
            return [], []
        rows = []
        for i, (step, vals) in enumerate(self.replica_history[keys[0]]):
            for r in range(len(vals)):
                rows.append([step, r] + [self.replica_history[k][i][1][r] for k in keys])
        return ["step", "replica", *keys], rows

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self._run(trainer, pl_module)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.observe(trainer, batch) and trainer.global_step % self.every_n_steps == 0:
            self._run(trainer, pl_module, monitor=True)  # the first read possible: weights of step global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        last = trainer.is_last_batch or batch_idx + 1 == trainer.num_training_batches  # (a fused chunk's too)
        if trainer.global_step % self.every_n_steps == 0 or (last and self.monitored(trainer)):
            self._run(trainer, pl_module, monitor=True)

    def monitored(self, trainer: L.Trainer) -> bool:
        """Whether an ``EarlyStopping`` or ``ModelCheckpoint`` of the Trainer monitors one of this callback's keys
        (then it also reads at the last batch of every epoch, so their epoch-end checks see a fresh value)."""
        from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

        keys = set(self.last)
        return any(isinstance(cb, (EarlyStopping, ModelCheckpoint)) and cb.monitor in keys for cb in trainer.callbacks)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._run(trainer, pl_module)
        measuring = [cb for cb in trainer.callbacks if isinstance(cb, MeasuringCallback)]
        if measuring and measuring[-1] is self and self.print_results and trainer.is_global_zero:
            from lightning.pytorch.utilities import rank_zero_info

            table = results_table(measuring)
            if table:
                rank_zero_info(table)
        if self.replica_history and trainer.is_global_zero:
            from lightning.pytorch.loggers import WandbLogger

            columns, rows = self.replica_table()
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    logger.log_table(key=f"{self.group}/replicas", columns=columns, data=rows)

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "replica_history": self.replica_history, "last": self.last,
                "last_step": self._last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = {k: [tuple(x) for x in v] for k, v in state_dict.get("history", {}).items()}
        self.replica_history = {k: [(s, list(v)) for s, v in h]
                                for k, h in state_dict.get("replica_history", {}).items()}
        self.last = dict(state_dict.get("last", {}))
        self._last_step = state_dict.get("last_step")


#: Keys whose values are a bound for another key: the table shows them beside it.
THEORY = {"hessian/sharpness": ("hessian/two_over_lr", "2/lr")}


def results_table(callbacks: list[MeasuringCallback]) -> str:
    """One small table of what ``callbacks`` measured: for each key its first, last, min and max value (finite
    values, the mean over active replicas), the steps it covers and, where the library logs one, the theory line
    beside it (e.g. 2/lr for the sharpness). Empty when nothing was measured."""
    rows = []
    for cb in callbacks:
        for key, hist in cb.history.items():
            vals = [(s, v) for s, v in hist if math.isfinite(v)]
            if not vals or any(key == other for other, _ in THEORY.values()):
                continue
            values = [v for _, v in vals]
            theory = ""
            if key in THEORY:
                other, label = THEORY[key]
                ref = [v for _, v in cb.history.get(other, []) if math.isfinite(v)]
                theory = f"{label} = {ref[-1]:.4g}" if ref else ""
            rows.append((key, f"{vals[0][0]}-{vals[-1][0]}", values[0], values[-1], min(values), max(values), theory))
    if not rows:
        return ""
    w = max(len(r[0]) for r in rows)
    lines = [f"{'measured':<{w}}  {'steps':>13}  {'first':>11}  {'last':>11}  {'min':>11}  {'max':>11}  theory"]
    for key, steps, first, last, lo, hi, theory in rows:
        lines.append(f"{key:<{w}}  {steps:>13}  {first:>11.4g}  {last:>11.4g}  {lo:>11.4g}  {hi:>11.4g}  {theory}")
    return "\n".join(lines)
