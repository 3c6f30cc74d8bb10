"""Intra-op threads for the examples and the ``lightning-flat`` command.

These models are tiny (matrices of at most a few thousand entries), so an SGD step is a few dozen small kernels:
splitting each over threads costs more than it saves, and a second thread competes with any other process on the
machine. The examples and the CLI therefore run one intra-op thread per process unless told otherwise (an explicit
``threads``, the ``LIGHTNING_FLAT_THREADS`` or ``OMP_NUM_THREADS`` environment variable); parallel work goes to
separate processes (the examples' ``--workers``) or to replicas in one module.
"""

from __future__ import annotations

import os

import torch

from lightning_flat._checks import check_positive_int

__all__ = ["default_threads", "use_threads"]


def default_threads() -> int | None:
    """``LIGHTNING_FLAT_THREADS`` if set, ``None`` (keep torch's choice) if ``OMP_NUM_THREADS`` is set, else 1."""
    value = os.environ.get("LIGHTNING_FLAT_THREADS")
    if value:
        try:
            return check_positive_int("LIGHTNING_FLAT_THREADS", int(value))
        except ValueError as err:
            raise ValueError(f"LIGHTNING_FLAT_THREADS must be a positive int, got {value!r}") from err
    return None if os.environ.get("OMP_NUM_THREADS") else 1


def use_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads to ``threads`` (default
    [`default_threads`][lightning_flat.threads.default_threads]); returns the number in use."""
    n = default_threads() if threads is None else check_positive_int("threads", threads)
    if n is not None:
        torch.set_num_threads(n)
    return torch.get_num_threads()
