"""Shared shell of the measurement datamodules: i.i.d. minibatches with one gather per step, no DataLoader."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import lightning as L
import torch
from torch import Tensor

from lightning_flat._checks import check_choice, check_nonnegative_int, check_positive_int, check_tensor
from lightning_flat.engine.interfaces import StepChunk, StepPlan
from lightning_flat.engine.replicas import per_stream, step_seed
from lightning_flat.measurements import MeasurementBatch, Measurements

__all__ = ["MeasurementDataModule", "MeasurementSampler"]

_SHUFFLE = 0x5348554646  # keeps the permutations' seeds apart from the i.i.d. draws' (step keys)
#: How minibatch indices are drawn: i.i.d. with replacement (the default), or epoch-wise permutations.
SAMPLINGS = ("replacement", "shuffle")


class MeasurementSampler:
    """Iterable of [`MeasurementBatch`][lightning_flat.measurements.MeasurementBatch] (one per SGD step) or
    [`StepChunk`][lightning_flat.engine.StepChunk] (several) for one epoch.

    Minibatch indices are drawn i.i.d. uniformly **with replacement** at every step (``batch_size`` of them), from a
    generator reseeded by ``step_seed(seed, rank, stream, step)``: one ``randint`` and one gather per step, no
    per-sample indexing, and a resumed run sees the same batches as an uninterrupted one. ``streams`` are the seeds
    of the runs being trained (a lightning_flat model's ``replica_seeds``): one stream gives indices ``(B,)``,
    several (replicas) give ``(R, B)``, row ``r`` being exactly what a single run with seed ``streams[r]`` draws;
    replicas that all share one seed share one ``(B,)`` draw (and one gather).
    ``batch_size=None`` yields the full data every step (gradient descent).

    ``sampling="shuffle"`` draws **without** replacement instead: each stream walks through a sequence of random
    permutations of the ``n`` measurements, ``B`` positions per step (step ``t`` takes positions ``[tB, (t+1)B)``,
    permutation ``k`` covering positions ``[kn, (k+1)n)`` and seeded by ``(seed, rank, stream, k)``), as a
    shuffling ``DataLoader`` does epoch by epoch. With few measurements this forbids long runs of one index, which
    changes SGD's noise (it is never a silent default).

    An epoch is the global steps from ``start_step()`` (the trainer's global step, read when iteration starts) up to
    the next multiple of ``steps_per_epoch``; ``len()`` is its number of steps. ``steps_in_call(step)`` (a
    lightning_flat model's, when it trains in fused chunks) says how many steps the item starting at ``step`` covers:
    1 yields the step's batch, more a [`StepChunk`][lightning_flat.engine.StepChunk] (the engine then counts every step
    as a Lightning batch). The last step of an epoch is an item of its own, so that progress bars, which show the first
    step of each call, end at the epoch's last step. The batches of a step depend on ``(seed, rank, stream, step)``
    only, never on the chunking.
    """

    def __init__(self, measurements: Measurements, targets: Tensor, batch_size: int | None, seed: int,
                 steps_per_epoch: int, start_step: Callable[[], int] = lambda: 0, rank: int = 0,
                 streams: list[int] | None = None, steps_in_call: Callable[[int], int] | None = None,
                 sampling: str = "replacement") -> None:
        self.sampling = check_choice("sampling", sampling, SAMPLINGS)
        self.measurements, self.targets = measurements, targets
        self.batch_size, self.seed, self.rank = batch_size, seed, rank
        self.steps_per_epoch = steps_per_epoch
        self.start_step = start_step
        self.streams = None if streams is None else [int(s) for s in streams]
        self.steps_in_call = steps_in_call

    def _items(self, start: int) -> Iterator[tuple[int, int]]:
        """``(first step, number of steps)`` of every item of the epoch that starts at ``start``."""
        spe = self.steps_per_epoch
        end = (start // spe + 1) * spe
        step = start
        while step < end:
            k = 1 if self.steps_in_call is None else max(1, min(int(self.steps_in_call(step)), end - 1 - step))
            yield step, k
            step += k

    def __len__(self) -> int:
        start = int(self.start_step())
        return (start // self.steps_per_epoch + 1) * self.steps_per_epoch - start

    def indices(self, step: int, generator: torch.Generator | None = None) -> Tensor:
        """The minibatch indices of global step ``step``: ``(B,)``, or ``(R, B)`` for several streams."""
        device = self.targets.device
        g = generator if generator is not None else torch.Generator(device=device)
        n, B = len(self.measurements), self.batch_size
        if self.sampling == "shuffle":
            return self._shuffled_streams(step, g)
        # one run, or replicas that share their seed (hence their minibatches): one draw, one gather
        return per_stream(self.streams, lambda s: (self.seed, self.rank, step) if s is None else
                          (self.seed, self.rank, s, step),
                          lambda gen: torch.randint(n, (B,), generator=gen, device=device), g, share=True)

    def _shuffled_streams(self, step: int, g: torch.Generator) -> Tensor:
        streams = [None] if self.streams is None else self.streams
        unique = {s: self._shuffled(step, s, g) for s in dict.fromkeys(streams)}
        return unique[streams[0]] if len(unique) == 1 else torch.stack([unique[s] for s in streams])

    def _shuffled(self, step: int, stream: int | None, g: torch.Generator) -> Tensor:
        """Positions ``[step B, (step+1) B)`` of the stream's sequence of permutations."""
        n, B = len(self.measurements), self.batch_size
        first, last = step * B, (step + 1) * B - 1
        keys = (self.seed, self.rank) if stream is None else (self.seed, self.rank, stream)
        perms = []
        for k in range(first // n, last // n + 1):
            g.manual_seed(step_seed(*keys, _SHUFFLE, k))
            perms.append(torch.randperm(n, generator=g, device=self.targets.device))
        return torch.cat(perms)[first % n:first % n + B]

    def batch(self, step: int, generator: torch.Generator | None = None,
              scratch: dict[str, Tensor] | None = None) -> MeasurementBatch:
        """The batch of global step ``step`` (``scratch``: see
        [`Measurements.subset`][lightning_flat.measurements.Measurements.subset]'s ``out``)."""
        if self.batch_size is None:
            return MeasurementBatch(self.measurements, self.targets)
        idx = self.indices(step, generator)
        targets = torch.index_select(self.targets, 0, idx) if idx.ndim == 1 else self.targets[idx]
        return MeasurementBatch(self.measurements.subset(idx, scratch), targets, idx)

    def state_dict(self) -> dict:
        """Nothing to save: the batches of a step follow from ``(seed, rank, stream, step)``. Having this (and
        `load_state_dict`) tells Lightning the sampler resumes exactly mid-epoch."""
        return {"seed": self.seed, "batch_size": self.batch_size, "sampling": self.sampling}

    def load_state_dict(self, state_dict: dict) -> None:
        saved = (state_dict.get("seed", self.seed), state_dict.get("batch_size", self.batch_size),
                 state_dict.get("sampling", self.sampling))
        if saved != (self.seed, self.batch_size, self.sampling):
            from lightning.pytorch.utilities import rank_zero_warn
            rank_zero_warn(f"resuming with sampler seed/batch_size/sampling {self.seed}/{self.batch_size}/"
                           f"{self.sampling}, but the checkpoint was written with {'/'.join(map(str, saved))}")

    def __iter__(self) -> Iterator[MeasurementBatch | StepChunk]:
        g = torch.Generator(device=self.targets.device)
        scratch: dict[str, Tensor] = {}  # the chunks' gather buffers (engine-internal batches only)
        for step, k in self._items(int(self.start_step())):
            yield self.batch(step, g) if k == 1 else StepChunk(step, k, self, g, scratch)


class MeasurementDataModule(L.LightningDataModule):
    """Base of the datamodules that generate a measurement problem.

    Subclasses set ``self.measurements`` (float64 master copy), ``self.targets`` and, where one exists,
    ``self.ground_truth``, and may override [`test_error`][lightning_flat.datamodules.MeasurementDataModule.test_error].
    The training dataloader is a [`MeasurementSampler`][lightning_flat.datamodules.MeasurementSampler] whose batches are
    already on the model's device and in its dtype (read from the trainer's LightningModule when ``train_dataloader`` is
    called), so Lightning's transfer is a no-op.

    Args:
        batch_size: minibatch size (indices i.i.d. with replacement), or ``None`` for full-batch gradient descent.
        seed: seed of the problem draw and of the minibatch sampler.
        steps_per_epoch: batches per epoch. Sampling is i.i.d., so an epoch is only a bookkeeping unit; train with
            ``Trainer(max_steps=...)``. Long epochs keep Lightning's per-epoch overhead off the step path.
        sampling: ``"replacement"`` (i.i.d. indices, the default) or ``"shuffle"`` (random permutations of the data,
            ``batch_size`` positions per step, see
            [`MeasurementSampler`][lightning_flat.datamodules.MeasurementSampler]).
    """

    measurements: Measurements
    targets: Tensor
    ground_truth: Tensor | None = None

    def __init__(self, batch_size: int | None = 50, seed: int = 0, steps_per_epoch: int = 1000,
                 sampling: str = "replacement") -> None:
        super().__init__()
        self.sampling = check_choice("sampling", sampling, SAMPLINGS)
        self.batch_size = None if batch_size is None else check_positive_int("batch_size", batch_size)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        self.seed = check_nonnegative_int("seed", seed)
        self.steps_per_epoch = check_positive_int("steps_per_epoch", steps_per_epoch)
        self._cast_cache: dict[tuple, tuple[Measurements, Tensor]] = {}
        self._truth_cache: dict[tuple, Tensor] = {}

    @classmethod
    def from_problem(cls, measurements: Measurements, targets: Tensor, ground_truth: Tensor | None = None,
                     batch_size: int | None = None, seed: int = 0, steps_per_epoch: int = 1000,
                     sampling: str = "replacement") -> MeasurementDataModule:
        """A datamodule over given measurements and targets (and, optionally, the ground truth behind them), e.g. a
        handful of observed entries: ``MeasurementDataModule.from_problem(Entries(rows, cols, (2, 2)), b)``."""
        if not isinstance(measurements, Measurements):
            raise TypeError(f"measurements must be a lightning_flat Measurements, got {type(measurements).__name__}")
        if not isinstance(targets, Tensor) or targets.shape != (len(measurements),) or not targets.is_floating_point():
            raise ValueError(f"targets must be a float tensor of shape ({len(measurements)},), got "
                             f"{getattr(targets, 'shape', targets)}")
        check_tensor("targets", targets, finite=True)
        if ground_truth is not None:
            check_tensor("ground_truth", ground_truth, floating=True, finite=True)
            if tuple(ground_truth.shape) != tuple(measurements.shape):
                raise ValueError(f"ground_truth must have shape {measurements.shape}, got {tuple(ground_truth.shape)}")
        dm = cls.__new__(MeasurementDataModule)
        MeasurementDataModule.__init__(dm, batch_size=batch_size, seed=seed, steps_per_epoch=steps_per_epoch,
                                       sampling=sampling)
        dm.measurements, dm.targets, dm.ground_truth = measurements, targets, ground_truth
        return dm

    def setup(self, stage: str) -> None:
        trainer = self.trainer
        if trainer is not None and self.hparams and trainer.is_global_zero:
            # Lightning would merge these with the model's and refuse keys present in both (e.g. `seed`).
            for logger in trainer.loggers:
                logger.log_hyperparams({f"data/{k}": v for k, v in self.hparams.items()})

    def measurements_as(self, dtype: torch.dtype, device: torch.device | str = "cpu") -> tuple[Measurements, Tensor]:
        """``(measurements, targets)`` in ``dtype`` on ``device``, converted once and cached (so derived caches such
        as [`Dense.moment`][lightning_flat.measurements.Dense.moment] are built once per run)."""
        key = (dtype, torch.device(device))
        if key not in self._cast_cache:
            self._cast_cache[key] = (self.measurements.to(device=device, dtype=dtype),
                                     self.targets.to(device=device, dtype=dtype))
        return self._cast_cache[key]

    def has_ground_truth(self) -> bool:
        """Whether [`test_error`][lightning_flat.datamodules.MeasurementDataModule.test_error] can be computed (the
        problem has a ground truth)."""
        return self.ground_truth is not None

    def _module_dtype_device(self) -> tuple[torch.dtype, torch.device]:
        module = self.trainer.lightning_module if self.trainer is not None else None
        if module is not None:
            for p in module.parameters():
                if p.is_floating_point():
                    return p.dtype, p.device
            return torch.get_default_dtype(), module.device
        return torch.get_default_dtype(), torch.device("cpu")

    def train_dataloader(self) -> MeasurementSampler:
        """The sampler, in the dtype and on the device of the trainer's module. A lightning_flat model's
        [`StepPlan`][lightning_flat.engine.StepPlan] gives the seed streams (one per replica) and the fused chunks."""
        dtype, device = self._module_dtype_device()
        meas, targets = self.measurements_as(dtype, device)
        trainer = self.trainer
        rank = trainer.global_rank if trainer is not None else 0
        start = (lambda: trainer.global_step) if trainer is not None else (lambda: 0)
        module = trainer.lightning_module if trainer is not None else None
        plan = module if isinstance(module, StepPlan) else None
        return MeasurementSampler(meas, targets, self.batch_size, self.seed, self.steps_per_epoch, start, rank,
                                  plan.replicas.streams if plan is not None else None,
                                  plan.steps_in_call if plan is not None else None, self.sampling)

    def test_error(self, E: Tensor) -> Tensor:
        r"""Population error $\|E - M^*\|_F^2$, shape ``(...)`` for ``E (..., d_out, d_in)``."""
        if self.ground_truth is None:
            raise RuntimeError(f"{type(self).__name__} has no ground truth")
        key = (E.dtype, E.device)
        if key not in self._truth_cache:
            self._truth_cache[key] = self.ground_truth.to(dtype=E.dtype, device=E.device)
        return (E - self._truth_cache[key]).square().sum((-2, -1))

    def test_error_scale(self) -> float:
        r"""What ``test/relative_error`` divides ``test_error`` by: $\|M^*\|_F^2$ here (subclasses may say
        otherwise, e.g. the error of zero filling)."""
        if self.ground_truth is None:
            raise RuntimeError(f"{type(self).__name__} has no ground truth")
        return float(self.ground_truth.square().sum())
