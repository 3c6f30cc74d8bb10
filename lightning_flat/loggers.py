"""An in-memory Lightning logger, so scripts and tests can read back every logged value."""

from __future__ import annotations

from argparse import Namespace
from typing import Any

from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only

__all__ = ["MemoryLogger"]


class MemoryLogger(Logger):
    """Keep every logged metric in memory: ``history[key] = [(step, value), ...]``.

    Use it beside a WandbLogger or CSVLogger (``Trainer(logger=[wandb, MemoryLogger()])``) when a script needs the
    curves afterwards, e.g. to draw figures. ``series(key)`` returns ``(steps, values)`` lists.
    """

    def __init__(self, name: str = "memory") -> None:
        super().__init__()
        self._name = name
        self.history: dict[str, list[tuple[int, float]]] = {}
        self.hparams: dict[str, Any] = {}

    @property
    def name(self) -> str:
        return self._name

    @property
    def version(self) -> int:
        return 0

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        for k, v in metrics.items():
            if k == "epoch":
                continue
            self.history.setdefault(k, []).append((-1 if step is None else int(step), float(v)))

    @rank_zero_only
    def log_hyperparams(self, params: dict[str, Any] | Namespace, *args: Any, **kwargs: Any) -> None:
        self.hparams.update(vars(params) if isinstance(params, Namespace) else dict(params))

    def series(self, key: str) -> tuple[list[int], list[float]]:
        pairs = self.history.get(key, [])
        return [s for s, _ in pairs], [v for _, v in pairs]

    def last(self, key: str) -> float:
        return self.history[key][-1][1]
