"""Replicas, in one place: ``R`` independent runs trained in one module, and the step-keyed random streams.

A lightning_flat model owns one [`Replicas`][lightning_flat.engine.Replicas] (``model.replicas``): the seed of every
run, the active mask and the record of diverged runs, per-replica hyperparameters, the masked sums and means and the
per-replica log keys. A single run is ``R = 1`` with the same argument forms (a length-1 list is a scalar), so no caller
branches on it; a module that is not a lightning_flat model is measured and trained as one run without a seed stream
([`replicas_of`][lightning_flat.engine.replicas_of]).

Random numbers of step ``t`` (minibatch indices, label noise, probes) come from generators seeded by
[`step_seed`][lightning_flat.engine.step_seed] of integer keys that include ``t``, so a run resumed at step ``t`` draws
what the uninterrupted run draws; keys that include a run's seed ([`per_stream`][lightning_flat.engine.per_stream]) make
replica ``r`` draw what a single run with that seed draws.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_flat._checks import check_positive_int, check_real

__all__ = ["Replicas", "replicas_of", "replica_seeds", "active_mean", "replica_metrics", "step_seed", "per_stream",
           "per_replica_tensor", "Replicated", "LOG_REPLICAS"]

#: How many replicas are logged one by one as ``key/r{k}`` (all of them stay in the callbacks' histories).
LOG_REPLICAS = 4

_MASK64 = (1 << 64) - 1


def step_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys (splitmix64 chain): the random numbers of step ``k`` depend on ``(seed, k)``
    only, so a run resumed from a checkpoint at step ``k`` draws exactly what the uninterrupted run draws.

    Examples:
        >>> step_seed(0, 1) == step_seed(0, 1) != step_seed(1, 0)
        True
    """
    x = 0x9E3779B97F4A7C15
    for k in keys:
        x = (x ^ (int(k) & _MASK64)) & _MASK64
        x = (x + 0x9E3779B97F4A7C15) & _MASK64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
        x ^= x >> 31
    return x >> 1


def per_stream(streams: Sequence[int] | None, keys: Callable[[int | None], tuple[int, ...]],
               draw: Callable[[torch.Generator], Tensor], generator: torch.Generator, share: bool = False) -> Tensor:
    """One draw per stream: ``draw(g)`` with ``g`` seeded by ``step_seed(*keys(s))`` for every seed ``s`` in
    ``streams``, stacked to ``(R, ...)``; a single stream (or ``None``, keyed by ``keys(None)``) gives one draw of
    shape ``(...)``. With ``share``, streams that are all one seed give that seed's single draw (one draw serves
    every run)."""
    if streams is None or len(streams) == 1 or (share and len(set(streams)) == 1):
        generator.manual_seed(step_seed(*keys(None if streams is None else streams[0])))
        return draw(generator)
    rows = []
    for s in streams:
        generator.manual_seed(step_seed(*keys(s)))
        rows.append(draw(generator))
    return torch.stack(rows)


def replica_seeds(seed: int | Sequence[int], replicas: int) -> list[int]:
    """The seed of every replica: ``seed + r``, or ``seed[r]`` when a list of ``replicas`` ints is given.

    Examples:
        >>> replica_seeds(3, 2), replica_seeds([5, 5], 2), replica_seeds([7], 1)
        ([3, 4], [5, 5], [7])
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


def per_replica_tensor(value: Any) -> Any:
    """A per-replica list as a float64 tensor ``(R,)``; a number (or a tensor) as it is."""
    return torch.tensor(value, dtype=torch.float64) if isinstance(value, (list, tuple)) else value


def active_mean(values: Tensor, active: Tensor | None) -> Tensor:
    """Mean of per-replica ``values (R, ...)`` over the active replicas, NaN where none is active; with
    ``active=None`` the plain mean over dim 0; a 0-d value is itself.

    Examples:
        >>> active_mean(torch.tensor([1.0, 5.0, 3.0]), torch.tensor([True, False, True]))
        tensor(2.)
        >>> active_mean(torch.tensor([1.0, 5.0]), torch.tensor([False, False]))
        tensor(nan)
    """
    if values.ndim == 0:
        return values
    if active is None or bool(active.all()):
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


class Replicas(nn.Module):
    """The ``count`` runs of one module.

    Per-replica tensors carry a leading dimension ``count`` when ``count > 1`` (``dims = 1``) and none for a single
    run (``dims = 0``); every method takes both forms. The active mask is the buffer ``active`` (moves with the
    module, saved in its state dict); ``diverged[r] = (step, loss)`` records the replicas frozen by
    [`freeze_nonfinite`][lightning_flat.engine.Replicas.freeze_nonfinite].

    Args:
        count: the number ``R`` of runs.
        seed: ``seed + r`` for run ``r``, or one int per run; ``None``: one run without a seed stream (a module that
            is not a lightning_flat model: its random streams are keyed by the step alone).

    Examples:
        >>> reps = Replicas(3, seed=10)
        >>> reps.seeds, reps.dims, reps.hyperparameter("lr", [0.1, 0.2, 0.3])
        ([10, 11, 12], 1, [0.1, 0.2, 0.3])
        >>> float(reps.masked_sum(torch.tensor([1.0, 2.0, 4.0])))
        7.0
    """

    active: Tensor

    def __init__(self, count: int = 1, seed: int | Sequence[int] | None = 0) -> None:
        super().__init__()
        self.count = check_positive_int("replicas", count)
        self.streams: list[int] | None = None if seed is None else replica_seeds(seed, self.count)
        self.register_buffer("active", torch.ones(self.count, dtype=torch.bool))
        self.diverged: dict[int, tuple[int, float]] = {}
        self.log_limit = LOG_REPLICAS

    @property
    def seeds(self) -> list[int]:
        """The seed of every run (``[0]`` for a run without a seed stream)."""
        return self.streams if self.streams is not None else [0]

    @property
    def dims(self) -> int:
        """Leading replica dimensions of per-replica tensors: 1 when ``count > 1``, else 0."""
        return 1 if self.count > 1 else 0

    def __len__(self) -> int:
        return self.count

    def extra_repr(self) -> str:
        return f"count={self.count}, seeds={self.streams}"

    # ------------------------------------------------------------------------------------------ hyperparameters
    def hyperparameter(self, name: str, value: Any, *, low: float | None = 0.0, allow_none: bool = False,
                       **kw: Any) -> Any:
        """A number, or a list of ``count`` numbers (one per run; a list of one is its number); ``None`` where
        allowed. Raises ``ValueError`` naming ``name`` otherwise."""
        if value is None and allow_none:
            return None
        if isinstance(value, (list, tuple)):
            if len(value) != self.count:
                raise ValueError(f"{name} must be a number or a list of {self.count} numbers (one per replica), "
                                 f"got a list of {len(value)}")
            values = [check_real(f"{name}[{r}]", v, low=low, **kw) for r, v in enumerate(value)]
            return values[0] if self.count == 1 else values
        return check_real(name, value, low=low, **kw)

    def initial(self, draw: Callable[[int, torch.Generator], list[Tensor]]) -> list[Tensor]:
        """Initial tensors of every run: ``draw(r, g)`` with ``g`` seeded by run ``r``'s seed, stacked to
        ``(R, ...)`` position by position (one run: as drawn), so run ``r`` starts where a single run with its seed
        starts."""
        draws = [draw(r, torch.Generator().manual_seed(s)) for r, s in enumerate(self.seeds)]
        if self.dims == 0:
            return list(draws[0])
        return [torch.stack([d[j] for d in draws]) for j in range(len(draws[0]))]

    def pick(self, value: Any, r: int) -> Any:
        """Run ``r``'s entry of a per-replica list, or the shared value."""
        return value[r] if isinstance(value, (list, tuple)) else value

    # ------------------------------------------------------------------------------------------- per-run views
    def split(self, tensors: Sequence[Tensor]) -> list[list[Tensor]]:
        """Per-run views ``[[t_0[r], t_1[r], ...] for r]`` of per-replica tensors (``[tensors]`` for one run)."""
        if self.dims == 0:
            return [list(tensors)]
        return [[t[r] for t in tensors] for r in range(self.count)]

    def first_active(self) -> int | None:
        """The first active run, or ``None`` when every run is frozen."""
        if not bool(self.active.any()):
            return None
        return int(self.active.nonzero()[0, 0])

    # ---------------------------------------------------------------------------------- sums, means, log keys
    def mask(self, values: Tensor, fill: float = float("nan")) -> Tensor:
        """Per-replica ``values (R, ...)`` with the frozen runs' entries set to ``fill`` (a 0-d value as it is)."""
        if values.ndim == 0 or bool(self.active.all()):
            return values
        active = self.active.to(values.device).reshape(-1, *([1] * (values.ndim - 1)))
        return torch.where(active, values, torch.full_like(values, fill))

    def masked_sum(self, losses: Tensor) -> Tensor:
        """The sum of the active runs' ``losses`` (what training minimises: the runs' gradients never mix)."""
        return self.mask(losses, 0.0).sum()

    def mean(self, values: Tensor) -> Tensor:
        """Mean over the active runs (NaN when none is active; a single run's value as it is)."""
        return active_mean(values, self.active if values.ndim else None)

    def metrics(self, key: str, values: Tensor) -> dict[str, Tensor]:
        """What to log: the mean over the active runs under ``key`` and ``key/r{k}`` for the first ``log_limit``
        runs (finite values of active runs only, see [`replica_metrics`][lightning_flat.engine.replica_metrics])."""
        return replica_metrics(key, values, self.active if values.ndim else None, self.log_limit)

    # ------------------------------------------------------------------------------------------------ divergence
    def freeze_nonfinite(self, losses: Tensor, step: int) -> list[int]:
        """Freeze the active runs whose loss is not finite (``count > 1``; a single run is stopped instead, see
        [`stop_reason`][lightning_flat.engine.Replicas.stop_reason]) and record them in ``diverged``; returns the newly
        frozen runs (a warning names each)."""
        if self.dims == 0:
            return []
        active = self.active
        newly = active & ~torch.isfinite(losses.to(active.device))
        if not bool(newly.any()):
            return []
        from lightning.pytorch.utilities import rank_zero_warn

        out = newly.nonzero().flatten().tolist()
        for r in out:
            self.diverged[r] = (int(step), float(losses[r]))
            rank_zero_warn(f"replica {r} (seed {self.seeds[r]}) diverged at step {step} (loss = {float(losses[r])}); "
                           "it is frozen, the other replicas go on")
        active &= ~newly
        return out

    def stop_reason(self, losses: Tensor, policy: str = "all") -> str | None:
        """Why training cannot go on, or ``None``: a single run's loss is not finite, or (``policy="all"``) every run
        is frozen, or (``policy="any"``) one is."""
        if self.dims == 0:
            return None if bool(torch.isfinite(losses).all()) else f"a non-finite training loss ({float(losses)})"
        if bool(self.active.any()) if policy == "all" else bool(self.active.all()):
            return None
        which = "every replica" if policy == "all" else "a replica"
        return f"{which} diverged ({dict(sorted(self.diverged.items()))})"

    def loss_value(self, losses: Tensor) -> float:
        """A number for messages: the summed loss of the active runs (a single run's loss)."""
        return float(self.masked_sum(losses.detach()))


class Replicated:
    """Declares that a module owns a [`Replicas`][lightning_flat.engine.Replicas] as ``replicas`` (the lightning_flat
    models do)."""

    replicas: Replicas


def replicas_of(module: Any) -> Replicas:
    """The [`Replicas`][lightning_flat.engine.Replicas] of a lightning_flat model, or one run without a seed stream for
    any other module."""
    if isinstance(module, Replicated):
        return module.replicas
    return Replicas(1, seed=None)
