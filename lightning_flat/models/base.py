"""Shared Lightning shell of the linear-network models: measurement loss, SGD, cheap per-step logging."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor

from lightning_flat import functional as F
from lightning_flat.measurements import MeasurementBatch, Measurements

__all__ = ["LinearNetBase", "unpack_batch"]

_PLAIN_TYPES = frozenset({str, int, float, bool, type(None)})


def unpack_batch(batch: Any) -> tuple[Measurements, Tensor]:
    """``(measurements, targets)`` from a :class:`MeasurementBatch`, a dict with those keys or a pair."""
    if isinstance(batch, MeasurementBatch):
        return batch.measurements, batch.targets
    if isinstance(batch, dict) and "measurements" in batch and "targets" in batch:
        return batch["measurements"], batch["targets"]
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[0], Measurements):
        return batch[0], batch[1]
    raise TypeError(
        "batch must be a MeasurementBatch, a dict with 'measurements' and 'targets', or a pair "
        f"(Measurements, targets), got {type(batch).__name__}"
    )


class LinearNetBase(L.LightningModule):
    r"""Base of the lightning_flat models: a network whose end-to-end map is a matrix ``E`` read by measurements.

    Subclasses implement ``weights()`` (the trained factors) and may override ``end_to_end_from(weights)``. This
    class provides

    - ``loss(batch)``: :math:`\frac1B\sum_{i\in B}(\langle A_i, E\rangle - y_i)^2` (no 1/2) on a
      :class:`~lightning_flat.measurements.MeasurementBatch` (label noise, if any, is already in ``y``), summed over
      replicas (so their gradients never mix);
    - ``training_step``, which logs, every ``Trainer(log_every_n_steps)`` steps (the only steps Lightning writes):
      ``train/loss`` (the batch loss actually optimised), and when the datamodule has them ``train/full_loss`` (full
      data, no noise), ``test/error`` (``datamodule.test_error(E)``) and ``test/relative_error``; with replicas the
      mean over the active replicas under these keys plus ``key/r{k}`` for the first ``log_replicas`` replicas, and
      ``replicas/active``;
    - ``configure_optimizers``: ``torch.optim.SGD(lr, momentum, weight_decay)``, or with replicas
      :class:`~lightning_flat.optim.ReplicaSGD` (per-replica ``lr`` and ``weight_decay``, frozen diverged replicas).
      Ridge is weight decay: ``weight_decay=lam`` is the update ``W <- W - lr (grad + lam W)``, i.e. the objective
      :math:`L + \frac\lambda2\sum_j\|W_j\|_F^2`.

    **Replicas.** With ``replicas = R > 1`` every factor has a leading dimension ``R`` and ``end_to_end()`` is
    ``(R, d_out, d_in)``. Replica ``r`` has its own seed ``replica_seeds[r]`` (``seed + r`` unless a list is
    given): its initial draw, its minibatch indices (with a lightning_flat datamodule) and its label noise (with
    :class:`~lightning_flat.callbacks.LabelNoise`) are those of a single run with that seed. A replica whose loss
    turns non-finite is frozen (``replica_active[r] = False``), reported in ``diverged`` and by a warning, and
    never touches the others; :class:`~lightning_flat.callbacks.FiniteLossGuard` stops the run only when all
    replicas have diverged (by default).

    Per-step overhead matters for these tiny models, so the step does no work on non-logging steps and attribute
    writes that Lightning makes on every hook call skip ``nn.Module.__setattr__``'s registry checks.
    """

    #: Replicas logged one by one as ``key/r{k}`` (all of them are in the callbacks' ``replica_history``).
    log_replicas = 4

    replicas: int = 1
    replica_seeds: list[int]
    replica_active: Tensor | None  # a bool buffer (R,) with replicas, else None
    lr: float | list[float]
    momentum: float
    weight_decay: float | list[float]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Lightning inspects `training_step`'s signature on every step (inspect.getfullargspec, ~0.1 ms); a cached
        # __signature__ on the function makes that a dictionary lookup.
        step = cls.__dict__.get("training_step")
        if step is not None and not hasattr(step, "__signature__"):
            step.__signature__ = inspect.signature(step)

    def __setattr__(self, name: str, value: Any) -> None:
        # Lightning sets plain attributes (e.g. `_current_fx_name`) dozens of times per step. For a name that is
        # already a plain attribute and a plain value (no parameter, module or tensor), nn.Module.__setattr__ ends
        # in exactly this assignment, after isinstance checks that cost ~3 us each time.
        if type(value) in _PLAIN_TYPES and name in self.__dict__:
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def _init_replicas(self, replicas: int, seed: int | Sequence[int]) -> None:
        """Set ``replicas``, ``replica_seeds``, the ``replica_active`` buffer and ``diverged`` (call in __init__)."""
        self.replicas = replicas
        if isinstance(seed, Sequence) and not isinstance(seed, (str, bytes)):
            seeds = [int(s) for s in seed]
            if len(seeds) != replicas:
                raise ValueError(f"seed must be an int or a list of {replicas} ints (one per replica), got {len(seeds)}")
        else:
            seeds = [int(seed) + r for r in range(replicas)]
        self.replica_seeds = seeds
        if replicas > 1:
            self.register_buffer("replica_active", torch.ones(replicas, dtype=torch.bool))
        else:
            self.replica_active = None
        self.diverged: dict[int, tuple[int, float]] = {}

    # ------------------------------------------------------------------------------------------ model interface
    def weights(self) -> list[Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def end_to_end(self) -> Tensor:
        return self.end_to_end_from(self.weights())

    def end_to_end_from(self, weights: list[Tensor]) -> Tensor:
        """The end-to-end matrix as a function of the trained factors (``W_L ... W_1`` here)."""
        return F.end_to_end(weights)

    def forward(self, measurements: Measurements) -> Tensor:
        """Predictions :math:`\langle A_i, E\rangle` for the given measurements."""
        return measurements(self.end_to_end())

    def replica_losses_from_weights(self, weights: list[Tensor], batch: Any) -> Tensor:
        """Per-replica batch losses, shape ``(R,)`` (``()`` without replicas), as a pure function of the factors."""
        measurements, targets = unpack_batch(batch)
        return (measurements(self.end_to_end_from(weights)) - targets).square().mean(-1)

    def loss_from_weights(self, weights: list[Tensor], batch: Any) -> Tensor:
        """:meth:`loss` as a pure function of the factors (for ``torch.func``: per-example SAM, HVPs)."""
        return self.replica_losses_from_weights(weights, batch).sum()

    def loss(self, batch: Any) -> Tensor:
        r""":math:`\frac1B\sum_{i\in B}(\langle A_i, E\rangle - y_i)^2`, summed over replicas."""
        return self.loss_from_weights(self.weights(), batch)

    def active_mean(self, values: Tensor) -> Tensor:
        """Mean of per-replica ``values (R, ...)`` over the active replicas (the value itself without replicas)."""
        if self.replica_active is None or values.ndim == 0:
            return values
        mask = self.replica_active.reshape(-1, *([1] * (values.ndim - 1)))
        count = self.replica_active.sum().clamp(min=1)
        return torch.where(mask, values, torch.zeros_like(values)).sum(0) / count

    # ------------------------------------------------------------------------------------------ Lightning hooks
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Lightning loads the state dict before the precision plugin converts the module (e.g. to float64 for
        # precision="64-true"): cast first, so float64 weights are not rounded through float32 on resume.
        for value in checkpoint.get("state_dict", {}).values():
            if isinstance(value, Tensor) and value.is_floating_point():
                if value.dtype != self.dtype:
                    self.to(value.dtype)
                break
        self.diverged = {int(k): tuple(v) for k, v in checkpoint.get("lightning_flat_diverged", {}).items()}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.diverged:
            checkpoint["lightning_flat_diverged"] = dict(self.diverged)

    def on_fit_start(self) -> None:
        self._log_every = max(int(self.trainer.log_every_n_steps), 1) if self.trainer.log_every_n_steps else 0
        self._full_data = None
        self._test_error = None
        dm = self.trainer.datamodule
        if dm is not None and hasattr(dm, "measurements_as"):
            self._full_data = dm.measurements_as(self.dtype, self.device)
        if dm is not None and callable(getattr(dm, "test_error", None)) and getattr(dm, "ground_truth", None) is not None:
            self._test_error = dm.test_error
            self._test_scale = float(dm.ground_truth.square().sum())

    def hessian_trace(self, measurements: Measurements, targets: Tensor | None = None) -> Tensor:
        """Exact Hessian trace of the full measurement loss in the trained factors, per replica (the closed form of
        :func:`lightning_flat.functional.hessian_trace`; models with another structure override this)."""
        return F.hessian_trace(self.weights(), measurements, targets)

    def penalty(self, weights: list[Tensor]) -> Tensor | None:
        """Terms added to the training loss besides the data fit: ``trace_penalty * hessian_trace`` (the flatness
        regularizer, differentiable) and, with L-BFGS, the ridge ``weight_decay / 2 * sum_j ||W_j||^2``."""
        out = None
        lam = getattr(self, "trace_penalty", 0.0)
        if lam:
            if self._full_data is None:
                raise RuntimeError("trace_penalty needs the training measurements: fit with a lightning_flat datamodule")
            meas, targets = self._full_data
            out = lam * self.hessian_trace_from(weights, meas, targets)
        if getattr(self, "optimizer", "sgd") == "lbfgs" and self.weight_decay:
            ridge = 0.5 * self.weight_decay * sum(W.square().sum((-2, -1)) for W in weights)
            out = ridge if out is None else out + ridge
        return out

    def hessian_trace_from(self, weights: list[Tensor], measurements: Measurements, targets: Tensor) -> Tensor:
        """:meth:`hessian_trace` as a function of the factors (for the differentiable penalty)."""
        return F.hessian_trace(weights, measurements, targets)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        weights = self.weights()
        losses = self.replica_losses_from_weights(weights, batch)
        extra = self.penalty(weights) if (getattr(self, "trace_penalty", 0.0) or getattr(self, "optimizer", "sgd")
                                          == "lbfgs") else None
        if extra is not None:
            losses = losses + extra
        if self.replica_active is not None:
            self._mask_diverged(losses.detach())
            loss = torch.where(self.replica_active, losses, torch.zeros_like(losses)).sum()
        else:
            loss = losses.sum()
        every = getattr(self, "_log_every", 0)
        if every and (self.global_step + 1) % every == 0:
            self._log_step(losses.detach())
        return loss

    def _mask_diverged(self, losses: Tensor) -> None:
        newly = self.replica_active & ~torch.isfinite(losses)
        if bool(newly.any()):
            from lightning.pytorch.utilities import rank_zero_warn

            for r in newly.nonzero().flatten().tolist():
                self.diverged[r] = (int(self.global_step), float(losses[r]))
                rank_zero_warn(f"replica {r} (seed {self.replica_seeds[r]}) diverged at step {self.global_step} "
                               f"(loss = {float(losses[r])}); it is frozen, the other replicas go on")
            self.replica_active &= ~newly

    def _log_replicas(self, metrics: dict[str, Tensor], key: str, values: Tensor) -> None:
        metrics[key] = self.active_mean(values)
        if values.ndim > 0:
            for r in range(min(self.log_replicas, values.shape[0])):
                metrics[f"{key}/r{r}"] = values[r]

    @torch.no_grad()
    def _log_step(self, losses: Tensor) -> None:
        metrics: dict[str, Tensor] = {}
        self._log_replicas(metrics, "train/loss", losses)
        E = None
        if self._full_data is not None:
            E = self.end_to_end()
            meas, targets = self._full_data
            self._log_replicas(metrics, "train/full_loss", F.measurement_loss(E, meas, targets))
        if self._test_error is not None:
            E = self.end_to_end() if E is None else E
            err = self._test_error(E)
            self._log_replicas(metrics, "test/error", err)
            if self._test_scale > 0:
                self._log_replicas(metrics, "test/relative_error", err / self._test_scale)
        if self.replica_active is not None:
            metrics["replicas/active"] = self.replica_active.sum().to(losses.dtype)
        self.log("train/loss", metrics.pop("train/loss"), on_step=True, on_epoch=False, prog_bar=True)
        self.log_dict(metrics, on_step=True, on_epoch=False)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if getattr(self, "optimizer", "sgd") == "lbfgs":
            return torch.optim.LBFGS(self.parameters(), lr=self.lr, max_iter=getattr(self, "lbfgs_iterations", 20),
                                     history_size=100, tolerance_grad=1e-15, tolerance_change=1e-18,
                                     line_search_fn="strong_wolfe")
        if self.replica_active is None:
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum,
                                   weight_decay=self.weight_decay)
        from lightning_flat.optim import ReplicaSGD

        def per_replica(v):
            return torch.tensor(v, dtype=torch.float64) if isinstance(v, (list, tuple)) else v

        return ReplicaSGD(self.parameters(), lr=per_replica(self.lr), momentum=self.momentum,
                          weight_decay=per_replica(self.weight_decay), active=self.replica_active)


LinearNetBase.training_step.__signature__ = inspect.signature(LinearNetBase.training_step)
