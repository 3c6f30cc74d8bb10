"""Label-noise SGD: fresh Gaussian noise on the training targets of every batch."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_flat._checks import check_nonnegative_int, check_real
from lightning_flat.engine.hooks import StepContext, StepHook, batch_targets, with_targets
from lightning_flat.engine.replicas import per_stream, replicas_of

__all__ = ["LabelNoise"]

_STREAM = 0x4C4E  # keeps the noise stream apart from the minibatch sampler's


class LabelNoise(StepHook):
    r"""Add fresh $N(0, \mathrm{std}^2)$ noise to the targets of each training batch.

    The loss optimised at step t is $\frac1B\sum_{i\in B_t}(f_i - b_i - \xi_{t,i})^2$: the noise sits inside
    the residual, is redrawn for every sample and step, and the stored dataset is never modified (the batch gets a
    new targets tensor). The noise of step t comes from a generator seeded by ``(seed, rank, t)`` (and the run's seed
    with replicas: replica ``r`` draws what a single run with its seed draws), so a run resumed from a checkpoint
    draws exactly the noise of the uninterrupted run; ``state_dict`` keeps ``std`` and ``seed``.

    ``std = 0`` draws nothing. A [`HyperparameterSchedule`][lightning_flat.callbacks.HyperparameterSchedule] with
    ``label_noise=...`` sets the std of each step (``std`` is then the value without a schedule, and is not changed);
    ``last_std`` is the std of the latest step. Under gradient accumulation every micro-batch gets its own draw.

    It acts at every SGD step through the step phases ([`StepHook`][lightning_flat.engine.StepHook]): inside the
    engine's fused chunks on the lightning_flat models, from Lightning's hooks on any other module (the targets are
    then replaced in the batch container). Batches: a
    [`MeasurementBatch`][lightning_flat.measurements.MeasurementBatch], a dict (``target_key``, default ``"targets"``)
    or a list (``target_key`` an index, default the last entry); tuples cannot be changed in place: use a list or a
    dict. Targets must be real-valued.

    Args:
        std: noise standard deviation (absolute, in target units), >= 0; with replicas a list gives one per replica.
        seed: seed of the noise stream.
        target_key: where the targets sit in a dict or list batch.

    Raises:
        ValueError: a negative ``std``; at setup, a per-replica ``std`` whose length is not the model's replica count.
        TypeError: a ``target_key`` that is neither a str, an int nor None; during the first step, integer targets
            (class labels) or a batch whose targets cannot be replaced.
    """

    def __init__(self, std: float | list[float] = 1.0, seed: int = 0, target_key: str | int | None = None) -> None:
        self.std = std
        self.seed = check_nonnegative_int("seed", seed)
        if target_key is not None and (isinstance(target_key, bool) or not isinstance(target_key, (str, int))):
            raise TypeError(f"target_key must be a str (dict batches), an int (list batches) or None, got "
                            f"{target_key!r} of type {type(target_key).__name__}")
        self.target_key = target_key
        self._clean: tuple[Tensor, Tensor] | None = None  # (noisy targets it set, the clean ones they replaced)
        self.last_std: float | list[float] | None = None
        self._generator: torch.Generator | None = None
        self._state_key: str | None = None

    @property
    def std(self) -> float | list[float]:
        return self._std

    @std.setter
    def std(self, value: float | list[float]) -> None:
        if isinstance(value, (list, tuple)):
            self._std = [check_real(f"std[{r}]", v, low=0.0) for r, v in enumerate(value)]
        else:
            self._std = check_real("std", value, low=0.0)

    def setup(self, trainer, pl_module, stage: str) -> None:
        count = replicas_of(pl_module).count
        if isinstance(self._std, list) and len(self._std) != count:
            raise ValueError(f"LabelNoise(std=[...]) has {len(self._std)} values (one per replica) but the model has "
                             f"{count} replica(s)")

    @property
    def state_key(self) -> str:
        # Lightning reads state_key on every hook call of every step: build the string once.
        if self._state_key is None:
            self._state_key = f"{type(self).__qualname__}{{'seed': {self.seed}, 'target_key': {self.target_key!r}}}"
        return self._state_key

    def noise(self, shape: torch.Size, step: int, rank: int, dtype: torch.dtype, device: torch.device,
              streams: list[int] | None = None, micro: int = 0) -> Tensor:
        """The standard normal noise of step ``step`` (before multiplying by ``std``). With ``streams`` (the seeds
        of the runs: a lightning_flat model's ``replicas.streams``) the noise of run ``r`` is keyed by
        ``streams[r]``, so replica ``r`` draws what a single run with that seed draws; several streams need
        ``shape = (R, B)``. ``micro`` numbers the micro-batches of one optimizer step under gradient accumulation
        (each its own draw; micro-batch 0 draws what a run without accumulation draws)."""
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
        extra = (micro,) if micro else ()
        several = streams is not None and len(streams) > 1
        if several and (len(shape) < 1 or shape[0] != len(streams)):
            raise ValueError(f"LabelNoise: {len(streams)} replicas need targets of shape ({len(streams)}, ...), "
                             f"got {tuple(shape)}")
        row = shape[1:] if several else shape
        return per_stream(streams, lambda s: (self.seed, _STREAM, rank, step, *extra) if s is None else
                          (self.seed, _STREAM, rank, s, step, *extra),
                          lambda g: torch.randn(row, generator=g, dtype=dtype, device=device), self._generator)

    def noisy(self, y: Tensor, std: float | list[float], step: int, rank: int, streams: list[int] | None,
              micro: int = 0) -> Tensor:
        """``y`` plus the noise of step ``step`` times ``std`` (a float, or one per replica); with several
        ``streams`` a shared ``y (B,)`` becomes ``(R, B)`` (one draw per replica)."""
        if streams is not None and len(streams) > 1 and (y.ndim < 2 or y.shape[0] != len(streams)):
            y = y.expand(len(streams), *y.shape)  # full-batch targets shared by the replicas: noise per replica
        if not y.is_floating_point():
            raise TypeError(f"LabelNoise adds Gaussian noise to real-valued regression targets; these targets are "
                            f"{y.dtype} (class labels?): noise on labels is not implemented, remove LabelNoise or "
                            f"point target_key at float targets")
        xi = self.noise(y.shape, step, rank, y.dtype, y.device, streams, micro)
        if isinstance(std, list):
            if y.ndim < 2 or y.shape[0] != len(std):
                raise ValueError(f"LabelNoise: std has {len(std)} values (one per replica) but the targets have shape "
                                 f"{tuple(y.shape)}")
            scale = torch.tensor(std, dtype=y.dtype, device=y.device).reshape(-1, *([1] * (y.ndim - 1)))
            return y + scale * xi
        return y + std * xi

    def step_targets(self, ctx: StepContext) -> None:
        std = self.last_std = ctx.hparams.get("label_noise", self._std)
        if not isinstance(std, list) and std == 0.0:
            return
        try:
            clean = ctx.targets(self.target_key)
        except (KeyError, TypeError) as err:
            raise type(err)(f"LabelNoise {err.args[0]}") from None
        noisy = self.noisy(clean, std, ctx.step, ctx.rank, ctx.replicas.streams, ctx.micro)
        ctx.set_targets(noisy, self.target_key)
        self._clean = (noisy, clean) if ctx.in_place else None

    def undo_targets(self, batch: Any) -> Any:
        """``batch`` with the targets this callback replaced in place put back (a shallow copy; the batch itself is
        left as training sees it), or ``batch`` itself when it holds no targets of this callback."""
        if self._clean is None or isinstance(batch, Tensor):
            return batch
        noisy, clean = self._clean
        try:
            current = batch_targets(batch, self.target_key)
        except (KeyError, TypeError, IndexError):
            return batch
        if current is not noisy:
            return batch
        return with_targets(batch, clean, self.target_key)

    def state_dict(self) -> dict[str, Any]:
        return {"std": self._std, "seed": self.seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.std = state_dict.get("std", self._std)
        self.seed = state_dict.get("seed", self.seed)
