"""Label-noise SGD: fresh Gaussian noise on the training targets of every batch."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from lightning_flat._checks import check_nonnegative_int, check_real
from lightning_flat.datamodules.base import step_seed
from lightning_flat.engine.hooks import StepContext, StepHook, engine_drives, hparams_at
from lightning_flat.measurements import MeasurementBatch

__all__ = ["LabelNoise"]

_STREAM = 0x4C4E  # keeps the noise stream apart from the minibatch sampler's


class LabelNoise(StepHook, Callback):
    r"""Add fresh :math:`N(0, \mathrm{std}^2)` noise to the targets of each training batch.

    The loss optimised at step t is :math:`\frac1B\sum_{i\in B_t}(f_i - b_i - \xi_{t,i})^2`: the noise sits inside
    the residual, is redrawn for every sample and step, and the stored dataset is never modified (the batch gets a
    new targets tensor). The noise of step t comes from a generator seeded by ``(seed, rank, t)``, so a run resumed
    from a checkpoint draws exactly the noise of the uninterrupted run; ``state_dict`` keeps ``std`` and ``seed``.

    ``std = 0`` draws nothing. A :class:`HyperparameterSchedule` with ``label_noise=...`` sets the std of each step
    (``std`` is then the value without a schedule, and is not changed); ``last_std`` is the std of the latest step.

    On the lightning_flat models the noise is added by the training engine at every SGD step (also inside fused
    chunks, see :class:`~lightning_flat.engine.StepHook`); the batch the sampler made is not modified. On any other
    LightningModule it is added in ``on_train_batch_start``, by replacing the targets in the batch container.
    Batches: a :class:`MeasurementBatch`, a dict (``target_key``, default ``"targets"``) or a list (``target_key``
    an index, default the last entry). Tuples cannot be changed in place: use a list or a dict.

    Args:
        std: noise standard deviation (absolute, in target units), >= 0.
        seed: seed of the noise stream.
        target_key: where the targets sit in a dict or list batch.
    """

    fused_safe_hooks = ("on_train_batch_start",)

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
        replicas = getattr(pl_module, "replicas", 1)
        if isinstance(self._std, list) and len(self._std) != replicas:
            raise ValueError(f"LabelNoise(std=[...]) has {len(self._std)} values (one per replica) but the model has "
                             f"{replicas} replica(s)")

    @property
    def state_key(self) -> str:
        # Lightning reads state_key on every hook call of every step: build the string once (from the initial seed).
        if self._state_key is None:
            self._state_key = self._generate_state_key(seed=self.seed)
        return self._state_key

    def noise(self, shape: torch.Size, step: int, rank: int, dtype: torch.dtype, device: torch.device,
              streams: list[int] | None = None, micro: int = 0) -> Tensor:
        """The standard normal noise of step ``step`` (before multiplying by ``std``). With ``streams`` (the seeds
        of the runs: a lightning_flat model's ``replica_seeds``) the noise of run ``r`` is keyed by ``streams[r]``,
        so replica ``r`` draws what a single run with that seed draws; several streams need ``shape = (R, B)``.
        ``micro`` numbers the micro-batches of one optimizer step under gradient accumulation (each its own draw;
        micro-batch 0 draws what a run without accumulation draws)."""
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
        g = self._generator
        extra = (micro,) if micro else ()
        if streams is None or len(streams) == 1:
            keys = (self.seed, _STREAM, rank, step) if streams is None else (self.seed, _STREAM, rank, streams[0], step)
            g.manual_seed(step_seed(*keys, *extra))
            return torch.randn(shape, generator=g, dtype=dtype, device=device)
        if len(shape) < 1 or shape[0] != len(streams):
            raise ValueError(f"LabelNoise: {len(streams)} replicas need targets of shape ({len(streams)}, ...), "
                             f"got {tuple(shape)}")
        rows = []
        for s in streams:
            g.manual_seed(step_seed(self.seed, _STREAM, rank, s, step, *extra))
            rows.append(torch.randn(shape[1:], generator=g, dtype=dtype, device=device))
        return torch.stack(rows)

    def _get(self, batch: Any) -> Tensor:
        if isinstance(batch, MeasurementBatch):
            return batch.targets
        if isinstance(batch, dict):
            key = "targets" if self.target_key is None else self.target_key
            if key not in batch:
                raise KeyError(f"LabelNoise: batch has no key {key!r}; set target_key to one of {list(batch)}")
            return batch[key]
        if isinstance(batch, list):
            return batch[-1 if self.target_key is None else self.target_key]
        raise TypeError(
            f"LabelNoise cannot change the targets of a {type(batch).__name__} batch in place: yield a "
            "MeasurementBatch, a dict or a list"
        )

    def _set(self, batch: Any, value: Tensor) -> None:
        if isinstance(batch, MeasurementBatch):
            batch.targets = value
        elif isinstance(batch, dict):
            batch["targets" if self.target_key is None else self.target_key] = value
        else:
            batch[-1 if self.target_key is None else self.target_key] = value

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
        batch = ctx.batch
        y = self.noisy(batch.targets, std, ctx.step, ctx.trainer.global_rank, ctx.streams)
        ctx.batch = MeasurementBatch(batch.measurements, y, batch.index)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if engine_drives(pl_module):
            return  # the engine adds the noise at every step (step_targets)
        std = self.last_std = hparams_at(trainer, trainer.global_step).get("label_noise", self._std)
        if not isinstance(std, list) and std == 0.0:
            return
        streams = getattr(pl_module, "replica_seeds", None)
        micro = batch_idx % getattr(trainer, "accumulate_grad_batches", 1)  # a fresh draw per micro-batch of a step
        clean = self._get(batch)
        noisy = self.noisy(clean, std, trainer.global_step, trainer.global_rank, streams, micro)
        self._set(batch, noisy)
        self._clean = (noisy, clean)

    def clean(self, batch: Any) -> Any:
        """``batch`` with the targets this callback replaced by noisy ones put back (a shallow copy; the batch
        itself is left as training sees it), or ``batch`` itself when it holds no targets of this callback: how the
        curvature callbacks keep a noiseless batch whatever the callbacks' order."""
        if self._clean is None or isinstance(batch, Tensor):
            return batch
        noisy, clean = self._clean
        try:
            current = self._get(batch)
        except (KeyError, TypeError, IndexError):
            return batch
        if current is not noisy:
            return batch
        copy = MeasurementBatch(batch.measurements, batch.targets, batch.index) if isinstance(batch, MeasurementBatch) \
            else dict(batch) if isinstance(batch, dict) else list(batch)
        self._set(copy, clean)
        return copy

    def state_dict(self) -> dict[str, Any]:
        return {"std": self._std, "seed": self.seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.std = state_dict.get("std", self._std)
        self.seed = state_dict.get("seed", self.seed)
