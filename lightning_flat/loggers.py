"""Loggers: an in-memory one, so scripts and tests can read back every logged value; Lightning's WandbLogger without
wandb's deprecation warning; one wandb run that reports an experiment."""

from __future__ import annotations

import os
from argparse import Namespace
from collections.abc import Sequence
from typing import Any

from lightning.pytorch.loggers import Logger
from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger
from lightning.pytorch.utilities import rank_zero_only


__all__ = ["MemoryLogger", "WandbLogger", "wandb_report"]



class WandbLogger(_LightningWandbLogger):
    """Lightning's ``WandbLogger`` (same arguments) without the two warnings wandb prints at every run started
    through it: Lightning passes ``anonymous=None`` to ``wandb.init`` unless told otherwise, and wandb (0.2x, 0.3x)
    answers "The anonymous setting has no effect and will be removed" (this logger passes ``anonymous`` only when it
    is given); a ``save_dir`` that does not exist yet gets "git root ... does not exist" (this logger creates it when
    the run starts)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self._wandb_init.get("anonymous", "given") is None:
            del self._wandb_init["anonymous"]

    @property
    def experiment(self) -> Any:
        folder = self._wandb_init.get("dir")
        if self._experiment is None and folder:
            os.makedirs(folder, exist_ok=True)
        return super().experiment


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


def wandb_report(save_dir: str, name: str, config: dict[str, Any] | None = None, figures: Sequence[str] = (),
                 checks: Sequence[dict[str, Any]] = (), summary: dict[str, Any] | None = None,
                 group: str | None = None, project: str = "lightning-flat") -> str:
    """One wandb run that tells an experiment's story: its ``config``, the ``figures`` (PNG paths) as images, the
    ``checks`` (dicts with ``name``, ``value``, ``passed``) as a table, and ``summary`` (final values) in the run's
    summary. Offline unless ``WANDB_MODE`` says otherwise (``wandb sync <dir>`` uploads it later); written under
    ``save_dir/wandb``. Returns the run's folder."""
    import wandb

    run = wandb.init(project=project, name=name, dir=save_dir, group=group, config=dict(config or {}),
                     mode=os.environ.get("WANDB_MODE", "offline"), reinit="create_new")
    try:
        if figures:
            run.log({os.path.splitext(os.path.basename(p))[0]: wandb.Image(p) for p in figures})
        if checks:
            table = wandb.Table(columns=["check", "value", "passed"],
                                data=[[c["name"], float(c["value"]), bool(c["passed"])] for c in checks])
            run.log({"checks": table})
            run.summary["checks_passed"] = sum(bool(c["passed"]) for c in checks)
            run.summary["checks_total"] = len(checks)
        for k, v in (summary or {}).items():
            run.summary[k] = v
        return run.dir.rsplit("/files", 1)[0]
    finally:
        run.finish()
