"""Training progress that stays readable in a log file: a tqdm bar in a terminal, one line every N steps elsewhere."""

from __future__ import annotations

import math
import sys
import time
from typing import Any

from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

from lightning_flat._checks import check_bool, check_nonnegative_int, check_positive_int

__all__ = ["StepProgressBar"]


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _value(v: Any) -> str:
    if hasattr(v, "item"):
        v = v.item()
    return f"{v:.4g}" if isinstance(v, float) else str(v)


class StepProgressBar(TQDMProgressBar):
    """Lightning's tqdm progress bar when stdout is a terminal; otherwise (a log file, a pipe, a notebook's captured
    output) one plain line every ``every_n_steps`` optimizer steps and one at the end, with no carriage returns:

        train: step 1000/7000 (14%), 850 steps/s, 0:07 left, loss 0.01234
        train: done, step 7000/7000 in 0:08 (840 steps/s), loss 2.1e-09

    Use it as the Trainer's progress bar (``callbacks=[StepProgressBar(every_n_steps=500)]``; it replaces the
    default one). It counts SGD steps (``trainer.global_step``), so it keeps a lightning_flat model on its fused
    path (it only reads at the step boundaries the engine already stops at: a line may come a few steps after a
    multiple of ``every_n_steps``).

    Args:
        every_n_steps: steps between two printed lines (when stdout is not a terminal).
        refresh_rate: batches between two redraws of the terminal bar (as in ``TQDMProgressBar``; 0 shows nothing).
        process_position: the terminal bar's line, for several trainers at once (as in ``TQDMProgressBar``).
        name: what each printed line starts with, e.g. a run's name when several processes print.
        lines: ``True`` prints lines, ``False`` draws the bar, ``None`` (default) decides by whether stdout is a
            terminal when the fit starts.
    """

    #: The engine calls ``on_train_batch_end`` once per chunk; the bar reads ``trainer.global_step`` then.
    fused_safe_hooks = ("on_train_batch_end",)

    def __init__(self, every_n_steps: int = 1000, refresh_rate: int = 1, process_position: int = 0,
                 name: str = "train", lines: bool | None = None) -> None:
        super().__init__(refresh_rate=check_nonnegative_int("refresh_rate", refresh_rate),
                         process_position=process_position)
        self.every_n_steps = check_positive_int("every_n_steps", every_n_steps)
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, got {name!r} of type {type(name).__name__}")
        self.name = name
        self.lines = None if lines is None else check_bool("lines", lines)
        self._printing = False
        self._start: tuple[float, int] = (0.0, 0)
        self._total: int | None = None
        self._mark = 0

    @property
    def printing(self) -> bool:
        """Whether this fit prints lines (decided at ``setup``) rather than drawing a bar."""
        return self._printing

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.lines is None:
            isatty = getattr(sys.stdout, "isatty", None)
            self._printing = not (callable(isatty) and isatty())
        else:
            self._printing = self.lines

    # In line mode every tqdm bar is a disabled one: Lightning's hooks still find their bar and draw nothing.
    def init_sanity_tqdm(self) -> Tqdm:
        return Tqdm(disable=True) if self._printing else super().init_sanity_tqdm()

    def init_train_tqdm(self) -> Tqdm:
        return Tqdm(disable=True) if self._printing else super().init_train_tqdm()

    def init_validation_tqdm(self) -> Tqdm:
        return Tqdm(disable=True) if self._printing else super().init_validation_tqdm()

    def init_test_tqdm(self) -> Tqdm:
        return Tqdm(disable=True) if self._printing else super().init_test_tqdm()

    def init_predict_tqdm(self) -> Tqdm:
        return Tqdm(disable=True) if self._printing else super().init_predict_tqdm()

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        super().on_train_start(trainer, pl_module)
        step = int(trainer.global_step)
        self._start = (time.perf_counter(), step)
        self._mark = step // self.every_n_steps
        self._total = None
        if trainer.max_steps is not None and trainer.max_steps > 0:
            self._total = int(trainer.max_steps)
        else:
            try:
                total = float(trainer.estimated_stepping_batches)
            except Exception:  # no length to count (an iterable dataset)
                total = math.inf
            self._total = int(total) if math.isfinite(total) else None

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self._printing:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            return
        step = int(trainer.global_step)
        if self._total and step >= self._total:  # the closing line says it
            return
        if self.is_enabled and step // self.every_n_steps > self._mark:
            self._mark = step // self.every_n_steps
            self._line(trainer, pl_module, done=False)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        super().on_train_end(trainer, pl_module)
        if self._printing and self.is_enabled:
            self._line(trainer, pl_module, done=True)

    def _line(self, trainer: Any, pl_module: Any, done: bool) -> None:
        step = int(trainer.global_step)
        elapsed = time.perf_counter() - self._start[0]
        rate = (step - self._start[1]) / elapsed if elapsed > 0 else 0.0
        of = f"/{self._total}" if self._total else ""
        if done:
            parts = [f"{self.name}: done, step {step}{of} in {_clock(elapsed)} ({rate:.0f} steps/s)"]
        else:
            pct = f" ({100 * step / self._total:.0f}%)" if self._total else ""
            parts = [f"{self.name}: step {step}{of}{pct}", f"{rate:.0f} steps/s"]
            if self._total and rate > 0:
                parts.append(f"{_clock((self._total - step) / rate)} left")
        metrics = {k: v for k, v in self.get_metrics(trainer, pl_module).items() if k != "v_num"}
        parts += [f"{k} {_value(v)}" for k, v in metrics.items()]
        print(", ".join(parts), flush=True)
