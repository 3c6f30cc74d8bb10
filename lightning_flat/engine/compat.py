"""Every place where lightning_flat relies on Lightning behaviour that is not public API, in one module.

Each function here has a test in ``tests/engine/test_compat.py`` that fails when the behaviour it relies on
changes (a new Lightning release), instead of training going silently wrong.

- `advance_global_step`: a fused chunk runs ``n + 1`` SGD steps in one ``training_step``; Lightning counts one
  optimizer step and one batch per call, so the other ``n`` are added to its optimizer-step progress (which
  ``trainer.global_step`` reads), to its batch progress (epochs, ``batch_idx``, progress bars) and to the step at
  which its logger connector writes ``self.log`` values (``fit_loop.epoch_loop._batches_that_stepped``): ``max_steps``,
  epochs, checkpoints, progress bars and logged curves all count SGD steps.
- `checkpoint_step_period`: ``ModelCheckpoint(every_n_train_steps=...)`` keeps its period in a private
  attribute; a chunk must end at those steps.
- `silenced_logging`: run a module's ``training_step`` for a measurement without it logging, by shadowing
  ``log``/``log_dict`` on the instance.
- `FastSetattr` and `cache_signature`: Lightning's per-call overhead, which the one-step-per-call path
  pays at every SGD step. Lightning sets plain attributes on the module dozens of times per call
  (``_current_fx_name``, ...), each through ``nn.Module.__setattr__``'s registry checks, and inspects
  ``training_step``'s signature at every call (``inspect.getfullargspec``, which honours ``__signature__``).
- `per_step_hooks`: which hooks of Lightning's ``Callback`` run once per training batch, derived from the
  class itself (every hook it defines that names a batch or runs before/after the backward pass or the optimizer
  step); `KNOWN_CALLBACK_HOOKS` is what it defined when this was written, so the tripwire test fails when a
  Lightning release adds a hook, for someone to look at where it runs.
- `compiled_submodules`: ``torch.compile``'s wrapper keeps the original module as ``_orig_mod``.
- `use_leaf_spec_function`: Lightning's ``CombinedLoader`` builds ``torch.utils._pytree.LeafSpec()`` at every
  fit, whose construction torch (2.13) deprecates in favour of ``treespec_leaf()`` (the same leaf spec), so every
  fit prints a deprecation warning. Where torch has ``treespec_leaf`` and Lightning still uses the deprecated class,
  the one name in Lightning's ``lightning.pytorch.utilities._pytree`` is pointed at it (called once, when
  ``lightning_flat.engine`` is imported).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["advance_global_step", "checkpoint_step_period", "silenced_logging", "FastSetattr", "cache_signature",
           "per_step_hooks", "callback_hooks", "KNOWN_CALLBACK_HOOKS", "compiled_submodules", "use_leaf_spec_function"]

_PLAIN_TYPES = frozenset({str, int, float, bool, type(None)})


def _epoch_loop(trainer: Any) -> Any:
    return trainer.fit_loop.epoch_loop


def advance_global_step(trainer: Any, n: int) -> None:
    """Count ``n`` more optimizer steps and batches (automatic optimization) and move Lightning's logging step along.

    Called inside ``training_step``, while Lightning's own step and batch of this call are started but not
    completed: after Lightning completes them, ``trainer.global_step`` and the batch counters have grown by
    ``n + 1``."""
    if n <= 0:
        return
    loop = _epoch_loop(trainer)
    step = loop.automatic_optimization.optim_progress.optimizer.step
    for tracker in (step.total, step.current):
        tracker.ready += n
        tracker.completed += n
    for tracker in (loop.batch_progress.total, loop.batch_progress.current):
        tracker.ready += n
        tracker.started += n
        tracker.processed += n
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


class FastSetattr:
    """Mixin for an ``nn.Module``: assigning a plain value (``str``, ``int``, ``float``, ``bool``, ``None``) to a name
    that already holds a plain attribute skips ``nn.Module.__setattr__``, which ends in the same assignment after
    registry checks (~3 us each)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if type(value) in _PLAIN_TYPES and name in self.__dict__:
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)


def cache_signature(function: Any) -> Any:
    """Store ``inspect.signature(function)`` as its ``__signature__`` (read by ``inspect`` instead of recomputing it);
    returns the function."""
    if not hasattr(function, "__signature__"):
        function.__signature__ = inspect.signature(function)
    return function


def callback_hooks() -> tuple[str, ...]:
    """Every hook Lightning's ``Callback`` class defines (its ``on_*`` methods), sorted."""
    from lightning.pytorch.callbacks import Callback

    return tuple(sorted(n for n, v in vars(Callback).items() if n.startswith("on_") and callable(v)))


def per_step_hooks() -> tuple[str, ...]:
    """The ``Callback`` hooks that Lightning calls once per training batch (hence once per fused chunk): those of
    `callback_hooks` that name a training batch or run before/after the backward pass, the optimizer step or
    zeroing the gradients."""
    return tuple(n for n in callback_hooks()
                 if n.startswith(("on_train_batch_", "on_before_", "on_after_")) and n != "on_after_validation")


#: ``callback_hooks()`` when this module was written (Lightning 2.5/2.6).
KNOWN_CALLBACK_HOOKS = (
    "on_after_backward", "on_before_backward", "on_before_optimizer_step", "on_before_zero_grad", "on_exception",
    "on_fit_end", "on_fit_start", "on_load_checkpoint", "on_predict_batch_end", "on_predict_batch_start",
    "on_predict_end", "on_predict_epoch_end", "on_predict_epoch_start", "on_predict_start", "on_sanity_check_end",
    "on_sanity_check_start", "on_save_checkpoint", "on_test_batch_end", "on_test_batch_start", "on_test_end",
    "on_test_epoch_end", "on_test_epoch_start", "on_test_start", "on_train_batch_end", "on_train_batch_start",
    "on_train_end", "on_train_epoch_end", "on_train_epoch_start", "on_train_start", "on_validation_batch_end",
    "on_validation_batch_start", "on_validation_end", "on_validation_epoch_end", "on_validation_epoch_start",
    "on_validation_start",
)


def compiled_submodules(module: Any) -> list[str]:
    """The names of ``module``'s submodules that are ``torch.compile`` wrappers (``OptimizedModule``, which keeps
    the compiled module as ``_orig_mod``)."""
    return [name or type(module).__name__ for name, m in module.named_modules() if hasattr(m, "_orig_mod")]


def use_leaf_spec_function() -> bool:
    """Let Lightning build leaf specs with torch's ``treespec_leaf`` instead of the deprecated ``LeafSpec()``;
    returns whether it changed anything (False with a torch or Lightning that does not need it)."""
    from torch.utils import _pytree as torch_pytree

    try:
        from lightning.pytorch.utilities import _pytree as lightning_pytree
    except ImportError:  # a Lightning without this module does not build LeafSpec
        return False
    leaf = getattr(torch_pytree, "treespec_leaf", None)
    if leaf is None or getattr(lightning_pytree, "LeafSpec", None) is not getattr(torch_pytree, "LeafSpec", None):
        return False
    lightning_pytree.LeafSpec = leaf
    return True
