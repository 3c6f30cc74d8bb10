"""What the example scripts share around a training run: a quiet process, and a CPU Trainer with an in-memory logger
and an optional offline wandb run (the recorder of weights at chosen steps is
[`lightning_flat.experiments.recording.StepRecorder`][lightning_flat.experiments.recording.StepRecorder])."""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["FitResult", "fit", "quiet", "trainer", "wandb_group", "wandb_logger"]

#: Lightning and wandb messages the examples silence: a one-process datamodule, pytree spec deprecations, and the
#: divergences that a sweep counts and reports itself.
QUIET_WARNINGS = (".*does not have many workers.*", ".*LeafSpec.*", ".*diverged at step.*", ".*FiniteLossGuard.*")


def quiet(threads: int | None = None) -> int:
    """Prepare an example's process (the main one or a sweep worker): offline, silent wandb unless ``WANDB_MODE``
    says otherwise, the `QUIET_WARNINGS` filtered, Lightning's info logs off, and ``threads`` intra-op threads
    (default [`lightning_flat.threads.default_threads`][lightning_flat.threads.default_threads]). Returns the number of
    threads in use."""
    import logging

    from lightning_flat.threads import use_threads

    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    for pattern in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", pattern)
    for name in ("lightning.pytorch", "lightning.pytorch.utilities.rank_zero", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return use_threads(threads)


def wandb_group(out: str) -> str:
    """The wandb group of an example's runs: the name of its output folder."""
    return os.path.basename(os.fspath(out).rstrip("/"))


def wandb_logger(name: str, out: str, config: dict[str, Any] | None = None):
    """An offline ``WandbLogger`` in project ``lightning-flat``, saved under ``out`` and grouped by its name (a run
    that is still open in this process is finished first, so that it does not swallow this one)."""
    import wandb

    from lightning_flat.loggers import WandbLogger

    if wandb.run is not None:
        wandb.finish()
    return WandbLogger(project="lightning-flat", name=name, save_dir=out, offline=True, group=wandb_group(out),
                       **({"config": config} if config is not None else {}))


def trainer(max_steps: int, *, callbacks: Iterable = (), logger: Any = False, precision: str = "64-true",
            log_every_n_steps: int = 50, progress: bool | dict[str, Any] = False):
    """A one-device CPU ``Trainer`` for ``max_steps`` steps without checkpoints or a model summary. ``progress``:
    ``True`` (or the keyword arguments of one, as a dict) adds a
    [`StepProgressBar`][lightning_flat.callbacks.StepProgressBar] unless ``callbacks`` has a progress bar: a bar
    in a terminal, plain lines in a log file."""
    import lightning as L
    from lightning.pytorch.callbacks import ProgressBar

    callbacks = list(callbacks)
    if progress and not any(isinstance(c, ProgressBar) for c in callbacks):
        from lightning_flat.callbacks import StepProgressBar

        callbacks.append(StepProgressBar(**(progress if isinstance(progress, dict) else {})))
    progress = bool(progress)
    return L.Trainer(max_steps=max_steps, precision=precision, logger=logger, callbacks=list(callbacks),
                     log_every_n_steps=log_every_n_steps, enable_checkpointing=False, enable_model_summary=False,
                     enable_progress_bar=progress, accelerator="cpu", devices=1)


class FitResult:
    """What [`fit`][lightning_flat.experiments.training.fit] returns: the ``memory`` logger (every logged value), the
    fitted ``trainer``, the training wall time in ``seconds`` and the folder of the offline wandb run (``wandb_dir``,
    ``None`` without one)."""

    def __init__(self, memory, trainer, seconds: float, wandb_dir: str | None = None) -> None:
        self.memory, self.trainer, self.seconds, self.wandb_dir = memory, trainer, seconds, wandb_dir


def fit(model, datamodule, max_steps: int, *, callbacks: Sequence = (), precision: str = "64-true",
        log_every_n_steps: int = 50, wandb: str | None = None, out: str | None = None,
        config: dict[str, Any] | None = None, progress: bool | dict[str, Any] = False) -> FitResult:
    """Train ``model`` on ``datamodule`` for ``max_steps`` steps with a
    [`MemoryLogger`][lightning_flat.loggers.MemoryLogger] and, when ``wandb`` names a run, an offline wandb run under
    ``out`` (finished afterwards)."""
    from lightning_flat.loggers import MemoryLogger

    memory = MemoryLogger()
    loggers = [memory]
    if wandb is not None:
        if out is None:
            raise ValueError("fit(wandb=...) needs out=, the folder of the wandb run")
        loggers.append(wandb_logger(wandb, out, config))
    tr = trainer(max_steps, callbacks=callbacks, logger=loggers, precision=precision,
                 log_every_n_steps=log_every_n_steps, progress=progress)
    t0 = time.perf_counter()
    tr.fit(model, datamodule)
    seconds = time.perf_counter() - t0
    wandb_dir = None
    if wandb is not None:
        run = loggers[-1].experiment
        wandb_dir = run.dir.rsplit(os.sep + "files", 1)[0]  # the run's folder (offline-run-...), not its files/
        run.finish()
    return FitResult(memory, tr, seconds, wandb_dir)
