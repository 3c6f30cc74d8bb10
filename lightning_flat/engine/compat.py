"""Every place where lightning_flat relies on Lightning behaviour that is not public API, in one module.

Each function here has a test in ``tests/engine/test_compat.py`` that fails when the behaviour it relies on
changes (a new Lightning release), instead of training going silently wrong.

- :func:`advance_global_step`: a fused chunk runs ``n + 1`` SGD steps in one ``training_step``; Lightning counts one
  optimizer step per call, so the other ``n`` are added to its optimizer-step progress (which ``trainer.global_step``
  reads) and to the step at which Lightning's logger connector writes ``self.log`` values
  (``fit_loop.epoch_loop._batches_that_stepped``), so that ``max_steps``, checkpoints and logged curves count SGD
  steps.
- :func:`checkpoint_step_period`: ``ModelCheckpoint(every_n_train_steps=...)`` keeps its period in a private
  attribute; a chunk must end at those steps.
- :func:`silenced_logging`: run a module's ``training_step`` for a measurement without it logging, by shadowing
  ``log``/``log_dict`` on the instance.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["advance_global_step", "checkpoint_step_period", "silenced_logging"]


def _epoch_loop(trainer: Any) -> Any:
    return trainer.fit_loop.epoch_loop


def advance_global_step(trainer: Any, n: int) -> None:
    """Count ``n`` more optimizer steps (automatic optimization) and move Lightning's logging step along with them.

    Called inside ``training_step``, while Lightning's own step of this call is "ready" but not "completed": after
    Lightning completes it, ``trainer.global_step`` has grown by ``n + 1``."""
    if n <= 0:
        return
    loop = _epoch_loop(trainer)
    step = loop.automatic_optimization.optim_progress.optimizer.step
    for tracker in (step.total, step.current):
        tracker.ready += n
        tracker.completed += n
    loop._batches_that_stepped += n


def checkpoint_step_period(callback: Any) -> int:
    """The ``every_n_train_steps`` of a ``ModelCheckpoint`` (0 when it saves by epochs or time only)."""
    return int(getattr(callback, "_every_n_train_steps", 0) or 0)


@contextmanager
def silenced_logging(module: Any) -> Iterator[None]:
    """Within the block, ``module.log`` and ``module.log_dict`` do nothing (instance attributes shadow the
    LightningModule methods; they are removed afterwards)."""
    had = {name: name in module.__dict__ for name in ("log", "log_dict")}
    saved = {name: module.__dict__.get(name) for name in had}
    module.__dict__["log"] = lambda *a, **k: None
    module.__dict__["log_dict"] = lambda *a, **k: None
    try:
        yield
    finally:
        for name, present in had.items():
            if present:
                module.__dict__[name] = saved[name]
            else:
                module.__dict__.pop(name, None)
