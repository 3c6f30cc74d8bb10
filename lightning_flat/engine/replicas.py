"""Replica bookkeeping, in one place: seed streams, the active mask, divergence, means and per-replica keys.

A lightning_flat model with ``replicas = R > 1`` trains ``R`` independent networks. Replica ``r`` has its own seed
(its init draw, minibatch stream and label-noise stream); it is *active* until its loss turns non-finite, when it
is frozen and recorded. Everything that reports per-replica values (the models' own logging, the measuring
callbacks) goes through :func:`replica_metrics`, so every mean is over the active replicas and is NaN when none is
active.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["replica_seeds", "active_mean", "replica_metrics", "freeze_nonfinite", "LOG_REPLICAS"]

#: How many replicas are logged one by one as ``key/r{k}`` (all of them stay in the callbacks' histories).
LOG_REPLICAS = 4


def replica_seeds(seed: int | Sequence[int], replicas: int) -> list[int]:
    """The seed of every replica: ``seed + r``, or ``seed[r]`` when a list of ``replicas`` ints is given.

    Example:
        >>> replica_seeds(3, 2), replica_seeds([5, 5], 2)
        ([3, 4], [5, 5])
    """
    if isinstance(seed, Sequence) and not isinstance(seed, (str, bytes)):
        seeds = list(seed)
        if len(seeds) != replicas:
            raise ValueError(f"seed must be an int or a list of {replicas} ints (one per replica), got a list of "
                             f"{len(seeds)}")
    elif isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int or a list of ints, got {seed!r} of type {type(seed).__name__}")
    else:
        seeds = [seed + r for r in range(replicas)]
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int):
            raise TypeError(f"seed must be an int or a list of ints, got {seed!r}")
        if s < 0:
            raise ValueError(f"seeds must be non-negative ints, got {seed!r}")
    return [int(s) for s in seeds]


def active_mean(values: Tensor, active: Tensor | None) -> Tensor:
    """Mean of per-replica ``values (R, ...)`` over the active replicas, NaN where none is active; with
    ``active=None`` (no replica is frozen, or no replicas) the plain mean over dim 0; a 0-d value is itself.

    Example:
        >>> active_mean(torch.tensor([1.0, 5.0, 3.0]), torch.tensor([True, False, True]))
        tensor(2.)
        >>> active_mean(torch.tensor([1.0, 5.0]), torch.tensor([False, False]))
        tensor(nan)
    """
    if values.ndim == 0:
        return values
    if active is None:
        return values.mean(0)
    mask = active.to(values.device).reshape(-1, *([1] * (values.ndim - 1)))
    count = active.sum()
    total = torch.where(mask, values, torch.zeros_like(values)).sum(0)
    if int(count) == 0:
        return torch.full_like(total, float("nan"))
    return total / count.to(values.dtype)


def replica_metrics(key: str, values: Tensor, active: Tensor | None, limit: int = LOG_REPLICAS) -> dict[str, Tensor]:
    """What to log of per-replica ``values (R,)``: ``{key: mean over active replicas, key/r0: ..., key/r{limit-1}:
    ...}``, or ``{key: value}`` for a 0-d value. Only finite values of active replicas are logged: a frozen replica
    has no point, and a non-finite value (a diverged run, or a mean over none) is left out rather than drawn."""
    out = {}
    mean = active_mean(values, active)
    if bool(torch.isfinite(mean).all()):
        out[key] = mean
    if values.ndim > 0:
        for r in range(min(limit, values.shape[0])):
            if (active is None or bool(active[r])) and bool(torch.isfinite(values[r]).all()):
                out[f"{key}/r{r}"] = values[r]
    return out


def freeze_nonfinite(losses: Tensor, active: Tensor, diverged: dict[int, tuple[int, float]], step: int,
                     seeds: Sequence[int]) -> list[int]:
    """Freeze (in ``active``, in place) the active replicas whose loss is not finite and record them in
    ``diverged[r] = (step, loss)``; returns the newly frozen replicas (a warning names each)."""
    newly = active & ~torch.isfinite(losses)
    if not bool(newly.any()):
        return []
    from lightning.pytorch.utilities import rank_zero_warn

    out = newly.nonzero().flatten().tolist()
    for r in out:
        diverged[r] = (int(step), float(losses[r]))
        rank_zero_warn(f"replica {r} (seed {seeds[r]}) diverged at step {step} (loss = {float(losses[r])}); it is "
                       "frozen, the other replicas go on")
    active &= ~newly
    return out
