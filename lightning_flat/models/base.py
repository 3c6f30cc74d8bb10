"""Shared Lightning shell of the linear-network models: measurement loss, SGD, cheap per-step logging."""

from __future__ import annotations

import inspect
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

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

    Subclasses implement ``weights()`` (the trained factors) and ``end_to_end()``. This class provides

    - ``loss(batch)``: :math:`\frac1B\sum_{i\in B}(\langle A_i, E\rangle - y_i)^2` (no 1/2) on a
      :class:`~lightning_flat.measurements.MeasurementBatch` (label noise, if any, is already in ``y``);
    - ``training_step``, which logs, every ``Trainer(log_every_n_steps)`` steps (the only steps Lightning writes):
      ``train/loss`` (the batch loss actually optimised), and when the datamodule has them ``train/full_loss`` (full
      data, no noise), ``test/error`` (``datamodule.test_error(E)``) and ``test/relative_error``;
    - ``configure_optimizers``: ``torch.optim.SGD(lr, momentum, weight_decay)``. Ridge is weight decay:
      ``weight_decay=lam`` is the update ``W <- W - lr (grad + lam W)``, i.e. the objective
      :math:`L + \frac\lambda2\sum_j\|W_j\|_F^2`.

    Per-step overhead matters for these tiny models, so the step does no work on non-logging steps and attribute
    writes that Lightning makes on every hook call skip ``nn.Module.__setattr__``'s registry checks.
    """

    lr: float
    momentum: float
    weight_decay: float

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

    # ------------------------------------------------------------------------------------------ model interface
    def weights(self) -> list[Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def end_to_end(self) -> Tensor:
        return self.end_to_end_from(self.weights())

    def end_to_end_from(self, weights: list[Tensor]) -> Tensor:
        """The end-to-end matrix as a function of the trained factors (``W_L ... W_1`` here)."""
        return F.end_to_end(weights)

    def forward(self, measurements: Measurements) -> Tensor:
        """Predictions :math:`\\langle A_i, E\\rangle` for the given measurements."""
        return measurements(self.end_to_end())

    def loss(self, batch: Any) -> Tensor:
        r""":math:`\frac1B\sum_{i\in B}(\langle A_i, E\rangle - y_i)^2`, summed over replicas."""
        return self.loss_from_weights(self.weights(), batch)

    def loss_from_weights(self, weights: list[Tensor], batch: Any) -> Tensor:
        """:meth:`loss` as a pure function of the factors (for ``torch.func``: per-example SAM, HVPs)."""
        measurements, targets = unpack_batch(batch)
        return (measurements(self.end_to_end_from(weights)) - targets).square().mean(-1).sum()

    # ------------------------------------------------------------------------------------------ Lightning hooks
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Lightning loads the state dict before the precision plugin converts the module (e.g. to float64 for
        # precision="64-true"): cast first, so float64 weights are not rounded through float32 on resume.
        for value in checkpoint.get("state_dict", {}).values():
            if isinstance(value, Tensor) and value.is_floating_point():
                if value.dtype != self.dtype:
                    self.to(value.dtype)
                break

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

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = self.loss(batch)
        every = getattr(self, "_log_every", 0)
        if every and (self.global_step + 1) % every == 0:
            self._log_step(loss)
        return loss

    @torch.no_grad()
    def _log_step(self, loss: Tensor) -> None:
        metrics = {}
        E = None
        if self._full_data is not None:
            E = self.end_to_end()
            meas, targets = self._full_data
            metrics["train/full_loss"] = F.measurement_loss(E, meas, targets).mean()
        if self._test_error is not None:
            E = self.end_to_end() if E is None else E
            err = self._test_error(E).mean()
            metrics["test/error"] = err
            if self._test_scale > 0:
                metrics["test/relative_error"] = err / self._test_scale
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=False, prog_bar=True)
        if metrics:
            self.log_dict(metrics, on_step=True, on_epoch=False)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)


LinearNetBase.training_step.__signature__ = inspect.signature(LinearNetBase.training_step)
