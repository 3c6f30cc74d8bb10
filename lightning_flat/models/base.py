"""Shared Lightning shell of the linear-network models: the parameterization interface and the hooks that hand
training to the engine ([`lightning_flat.engine`][lightning_flat.engine])."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor

from lightning_flat import functional as F
from lightning_flat.engine.compat import FastSetattr, cache_signature
from lightning_flat.engine.interfaces import MeasurementProblem
from lightning_flat.engine.loop import TrainingEngine
from lightning_flat.engine.optim import ReplicaSGD
from lightning_flat.engine.replicas import Replicas, Replicated
from lightning_flat.functional.gradients import chain_prefixes, chain_vjp
from lightning_flat.measurements import Measurements, unpack_batch

__all__ = ["LinearNetBase", "unpack_batch"]


class LinearNetBase(Replicated, FastSetattr, L.LightningModule):
    r"""Base of the lightning_flat models: a network whose end-to-end map is a matrix ``E`` read by measurements.

    Subclasses implement ``weights()`` (the trained factors) and, for another parameterization than the chain
    $E = W_L\cdots W_1$, ``end_to_end_from(weights)``, ``end_to_end_and_cache(weights)`` and
    ``end_to_end_vjp(weights, cache, G)`` (the analytic gradients). This class provides

    - ``loss(batch)``: $\frac1B\sum_{i\in B}(\langle A_i, E\rangle - y_i)^2$ (no 1/2) on a
      [`MeasurementBatch`][lightning_flat.measurements.MeasurementBatch] (label noise, if any, is already in ``y``),
      summed over replicas (so their gradients never mix);
    - training by the engine ([`TrainingEngine`][lightning_flat.engine.TrainingEngine]): analytic SGD steps, several per
      ``training_step`` call (at most ``chunk_size``), each one exactly the step Lightning would take; the engine
      falls back to one step per call, or to Lightning's autograd path, where a Trainer needs it (``engine.mode``
      and ``engine.reason`` say which and why);
    - logging every ``Trainer(log_every_n_steps)`` steps, at the step whose weights are measured (the step Lightning
      itself logs at), finite values only: ``train/loss`` (the batch loss actually optimised), and when the datamodule
      has them ``train/full_loss`` (full data, no noise), ``test/error`` (``datamodule.test_error(E)``) and
      ``test/relative_error`` (``test_error`` over ``datamodule.test_error_scale()``); with replicas the mean over the
      active replicas under these keys plus ``key/r{k}`` for the first ``replicas.log_limit`` replicas, and
      ``replicas/active``;
    - ``configure_optimizers``: [`ReplicaSGD`][lightning_flat.engine.ReplicaSGD] (``lr``, ``momentum``,
      ``weight_decay``, per-replica values, frozen replicas), or L-BFGS. Ridge is weight decay: ``weight_decay=lam`` is
      the update ``W <- W - lr (grad + lam W)``, i.e. the objective $L + \frac\lambda2\sum_j\|W_j\|_F^2$.

    **Replicas.** ``replicas`` (a [`Replicas`][lightning_flat.engine.Replicas]) holds the ``R`` runs of the module.
    With ``R > 1`` every factor has a leading dimension ``R`` and ``end_to_end()`` is ``(R, d_out, d_in)``. Run
    ``r`` has its own seed ``replicas.seeds[r]`` (``seed + r`` unless a list is given): its initial draw, its
    minibatch indices (with a lightning_flat datamodule) and its label noise (with
    [`LabelNoise`][lightning_flat.callbacks.LabelNoise]) are those of a single run with that seed. A replica whose loss
    turns non-finite is frozen (``replicas.active[r] = False``), reported in ``diverged`` and by a warning, and never
    touches the others; [`FiniteLossGuard`][lightning_flat.callbacks.FiniteLossGuard] stops the run only when all
    replicas have diverged (by default). A single run is ``R = 1`` with the same argument forms (lists of one value are
    accepted).
    """

    replicas: Replicas
    lr: float | list[float]
    momentum: float
    weight_decay: float | list[float]
    #: ``"sgd"`` (the engine's [`ReplicaSGD`][lightning_flat.engine.ReplicaSGD]) or ``"lbfgs"``.
    optimizer: str = "sgd"
    #: $\lambda$ of the flatness regularizer $\lambda\operatorname{tr}\nabla^2L$ (0: none).
    trace_penalty: float = 0.0
    #: Most SGD steps one ``training_step`` call runs (fused chunks); 1 runs one step per call.
    chunk_size: int = 100
    #: ``"analytic"`` (default) or ``"autograd"`` (the reference; also used for what the analytic path lacks).
    gradients: str = "analytic"
    #: L-BFGS iterations per step (``optimizer="lbfgs"``).
    lbfgs_iterations: int = 20

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "training_step" in cls.__dict__:  # Lightning inspects its signature at every call
            cache_signature(cls.__dict__["training_step"])

    def __init__(self, replicas: int = 1, seed: int | Sequence[int] = 0) -> None:
        super().__init__()
        self.replicas = Replicas(replicas, seed)
        self.engine = TrainingEngine(self, base=LinearNetBase)
        self._full_data: tuple[Measurements, Tensor] | None = None
        self._test_error = None
        self._test_scale = 0.0

    @property
    def diverged(self) -> dict[int, tuple[int, float]]:
        """The frozen replicas: ``{replica: (step, loss)}`` (``replicas.diverged``)."""
        return self.replicas.diverged

    # ------------------------------------------------------------------------------------------ model interface
    def weights(self) -> list[Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def end_to_end(self) -> Tensor:
        return self.end_to_end_from(self.weights())

    def end_to_end_from(self, weights: list[Tensor]) -> Tensor:
        """The end-to-end matrix as a function of the trained factors (``W_L ... W_1`` here)."""
        return F.end_to_end(weights)

    def replica_end_to_end(self, replica: int | None = None) -> Any:
        """``weights -> E`` for the factors of one replica (``replica=None``: all of them, as
        [`end_to_end_from`][lightning_flat.models.LinearNetBase.end_to_end_from]); models with per-replica fixed parts
        (e.g. a buffer) bind replica ``replica``'s."""
        return self.end_to_end_from

    def end_to_end_and_cache(self, weights: list[Tensor]) -> tuple[Tensor, Any]:
        """``E`` and what [`end_to_end_vjp`][lightning_flat.models.LinearNetBase.end_to_end_vjp] reuses (here the prefix
        products ``W_j ... W_1``)."""
        prefixes = chain_prefixes(weights)
        return prefixes[-1], prefixes

    def end_to_end_vjp(self, weights: list[Tensor], cache: Any, G: Tensor) -> list[Tensor]:
        r"""Gradients $\partial\langle G, E(W)\rangle/\partial W_j$ (here $S_j^\top G P_j^\top$)."""
        return chain_vjp(weights, cache, G)

    def forward(self, measurements: Measurements) -> Tensor:
        r"""Predictions $\langle A_i, E\rangle$ for the given measurements."""
        return measurements(self.end_to_end())

    def replica_losses_from_weights(self, weights: list[Tensor], batch: Any) -> Tensor:
        """Per-replica batch losses, shape ``(R,)`` (``()`` without replicas), as a pure function of the factors."""
        measurements, targets = unpack_batch(batch)
        return (measurements(self.end_to_end_from(weights)) - targets).square().mean(-1)

    def training_losses_from_weights(self, weights: list[Tensor], batch: Any) -> Tensor:
        """What training minimises, per replica: the batch loss plus
        [`penalty`][lightning_flat.models.LinearNetBase.penalty] (autograd paths)."""
        losses = self.replica_losses_from_weights(weights, batch)
        extra = self.penalty(weights)
        return losses if extra is None else losses + extra

    def loss_from_weights(self, weights: list[Tensor], batch: Any) -> Tensor:
        """[`loss`][lightning_flat.models.LinearNetBase.loss] as a pure function of the factors (for ``torch.func``:
        per-example SAM, HVPs)."""
        return self.replica_losses_from_weights(weights, batch).sum()

    def loss(self, batch: Any) -> Tensor:
        r"""$\frac1B\sum_{i\in B}(\langle A_i, E\rangle - y_i)^2$, summed over replicas."""
        return self.loss_from_weights(self.weights(), batch)

    def hessian_trace(self, measurements: Measurements, targets: Tensor | None = None) -> Tensor:
        """Exact Hessian trace of the full measurement loss in the trained factors, per replica (the closed form of
        [`lightning_flat.functional.hessian_trace`][lightning_flat.functional.hessian_trace]; models with another
        structure override this)."""
        return F.hessian_trace(self.weights(), measurements, targets)

    def hessian_trace_terms(self, measurements: Measurements, targets: Tensor | None = None) -> Tensor:
        """The trace of each factor's diagonal block of the Hessian, ``(..., L)`` (they sum to
        [`hessian_trace`][lightning_flat.models.LinearNetBase.hessian_trace]): the closed form's layer terms."""
        return F.hessian_trace(self.weights(), measurements, targets, per_layer=True)

    def uses_analytic_gradients(self) -> bool:
        """Whether the engine's analytic oracle computes this model's gradients: ``gradients="analytic"``, no trace
        penalty, and a subclass that changes ``end_to_end_from`` also gives its vector-Jacobian product."""
        if self.gradients != "analytic" or self.trace_penalty:
            return False
        owners = set()
        for name in ("end_to_end_from", "end_to_end_and_cache", "end_to_end_vjp"):
            owners.add(next(k for k in type(self).__mro__ if name in k.__dict__))
        return len(owners) == 1

    def penalty(self, weights: list[Tensor]) -> Tensor | None:
        """Terms added to the training loss besides the data fit: ``trace_penalty * hessian_trace`` (the flatness
        regularizer, differentiable) and, with L-BFGS, the ridge ``weight_decay / 2 * sum_j ||W_j||^2``."""
        out = None
        lam = self.trace_penalty
        if lam:
            if self._full_data is None:
                raise RuntimeError("trace_penalty needs the training measurements: fit with a lightning_flat "
                                   "datamodule")
            meas, targets = self._full_data
            out = lam * self.hessian_trace_from(weights, meas, targets)
        if self.optimizer == "lbfgs" and self.weight_decay:
            ridge = 0.5 * self.weight_decay * sum(W.square().sum((-2, -1)) for W in weights)
            out = ridge if out is None else out + ridge
        return out

    def hessian_trace_from(self, weights: list[Tensor], measurements: Measurements, targets: Tensor) -> Tensor:
        """[`hessian_trace`][lightning_flat.models.LinearNetBase.hessian_trace] as a function of the factors (for the
        differentiable penalty)."""
        return F.hessian_trace(weights, measurements, targets)

    # ---------------------------------------------------------------------------- the engine's declared interface
    def engine_drives_step_hooks(self) -> bool:
        """True when the engine runs the per-step callbacks' [`StepHook`][lightning_flat.engine.StepHook] phases."""
        return self.engine.drives_step_hooks()

    def steps_in_call(self, step: int) -> int:
        """SGD steps of the ``training_step`` call starting at global step ``step`` (read by the sampler)."""
        return self.engine.steps_in_call(step)

    # ------------------------------------------------------------------------------------------ Lightning hooks
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Lightning loads the state dict before the precision plugin converts the module (e.g. to float64 for
        # precision="64-true"): cast first, so float64 weights are not rounded through float32 on resume.
        for value in checkpoint.get("state_dict", {}).values():
            if isinstance(value, Tensor) and value.is_floating_point():
                if value.dtype != self.dtype:
                    self.to(value.dtype)
                break
        self.replicas.diverged.clear()
        self.replicas.diverged.update({int(k): tuple(v)
                                       for k, v in checkpoint.get("lightning_flat_diverged", {}).items()})

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.diverged:
            checkpoint["lightning_flat_diverged"] = dict(self.diverged)

    def _check_init_finite(self, scale_name: str, scale: Any) -> None:
        """Refuse at construction an initial scale whose weights overflow the parameters' dtype."""
        for j, W in enumerate(self.weights()):
            if not bool(torch.isfinite(W).all()):
                raise ValueError(f"{scale_name}={scale!r} overflows {W.dtype}: factor {j + 1} of "
                                 f"{type(self).__name__} has non-finite initial entries (the largest finite "
                                 f"{W.dtype} is {torch.finfo(W.dtype).max:.3g})")

    def check_fit_start(self, datamodule: MeasurementProblem | None) -> None:
        """Refuse, before the first step, what would fail or silently mislead mid-run: an end-to-end matrix whose
        shape is not the datamodule's measurement shape, and weights or an end-to-end matrix that are not finite in
        the training dtype (an ``init_scale`` that overflows it; frozen replicas of a resumed run are exempt)."""
        with torch.no_grad():
            weights = self.weights()
            E = self.end_to_end_from(weights)
        shape = datamodule.measurements_as(self.dtype, self.device)[0].shape if datamodule is not None else None
        if shape is not None and tuple(E.shape[-2:]) != tuple(shape):
            raise ValueError(f"{type(self).__name__} maps to {E.shape[-2]}x{E.shape[-1]} matrices (d_out x d_in) "
                             f"but {type(datamodule).__name__}'s measurements act on {shape[0]}x{shape[1]} ones: make "
                             f"the model's first and last dims match the datamodule's d_in and d_out")
        reps = self.replicas
        for name, value in [(f"factor {j + 1}", w) for j, w in enumerate(weights)] + [("end-to-end matrix", E)]:
            finite = torch.isfinite(value).reshape(reps.count, -1).all(1)
            bad = ~finite & reps.active.to(finite.device)
            if bool(bad.any()):
                where = f" (replica {int(bad.nonzero()[0, 0])})" if reps.dims else ""
                resumed = self.trainer.ckpt_path
                if resumed:
                    raise ValueError(f"{type(self).__name__}'s {name}{where} is not finite in the checkpoint being "
                                     f"resumed ({resumed}): it holds a diverged run's weights; resume from an earlier "
                                     f"checkpoint, or start afresh")
                scale = self.hparams.get("init_scale", self.hparams.get("scale"))
                raise ValueError(f"{type(self).__name__}'s {name}{where} is not finite in {value.dtype} before "
                                 f"training: the initialisation (init_scale={scale!r}) overflows {value.dtype}; use a "
                                 f"smaller scale or a wider dtype (Trainer(precision='64-true'))")

    def on_fit_start(self) -> None:
        self._full_data = None
        self._test_error = None
        dm = self.trainer.datamodule
        dm = dm if isinstance(dm, MeasurementProblem) else None
        self.check_fit_start(dm)
        if dm is not None:
            self._full_data = dm.measurements_as(self.dtype, self.device)
            if dm.has_ground_truth():
                self._test_error = dm.test_error
                self._test_scale = float(dm.test_error_scale())
        self.engine.configure(self.trainer)

    def on_train_start(self) -> None:
        self.engine.prepare_step(self.trainer)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.engine.prepare_step(self.trainer)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        if self.engine.mode != "lightning":
            return self.engine.training_step(batch)
        losses = self.training_losses_from_weights(self.weights(), batch)
        self.replicas.freeze_nonfinite(losses.detach(), self.global_step)
        loss = self.replicas.masked_sum(losses)
        every = self.trainer.log_every_n_steps
        if every and (self.global_step + 1) % every == 0:
            self.log_training_step(losses.detach(), self.global_step)
        return loss

    def backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        if not self.engine.backward(loss):
            super().backward(loss, *args, **kwargs)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        if self.engine.mode == "fused":
            optimizer_closure()  # the chunk ran its updates inside training_step
        else:
            super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)

    @torch.no_grad()
    def log_training_step(self, losses: Tensor, step: int | None = None) -> None:
        """Log the metrics of SGD step ``step`` (default the current global step; see the class docstring): to every
        logger at that step, finite values only, and with ``self.log(..., logger=False)`` to the progress bar and
        ``trainer.callback_metrics`` (so ``EarlyStopping`` and ``ModelCheckpoint`` can monitor them)."""
        step = self.global_step if step is None else step
        reps = self.replicas
        metrics = reps.metrics("train/loss", losses)
        E = None
        if self._full_data is not None:
            E = self.end_to_end()
            meas, targets = self._full_data
            metrics.update(reps.metrics("train/full_loss", F.measurement_loss(E, meas, targets)))
        if self._test_error is not None:
            E = self.end_to_end() if E is None else E
            err = self._test_error(E)
            metrics.update(reps.metrics("test/error", err))
            if self._test_scale > 0:
                metrics.update(reps.metrics("test/relative_error", err / self._test_scale))
        if reps.dims:
            metrics["replicas/active"] = reps.active.sum().to(losses.dtype)
        # non-finite values (a diverged run) are left out by replica_metrics: no NaN point is drawn, and the loggers
        # are written directly so that Lightning cannot repeat a previous step's value in their place
        if self.trainer.is_global_zero:
            for logger in self.trainer.loggers:
                logger.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)
        if "train/loss" in metrics:
            self.log("train/loss", metrics.pop("train/loss"), on_step=True, on_epoch=False, prog_bar=True,
                     logger=False)
        if metrics:
            self.log_dict(metrics, on_step=True, on_epoch=False, logger=False)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer == "lbfgs":
            return torch.optim.LBFGS(self.parameters(), lr=self.lr, max_iter=self.lbfgs_iterations,
                                     history_size=100, tolerance_grad=1e-15, tolerance_change=1e-18,
                                     line_search_fn="strong_wolfe")
        return ReplicaSGD(self.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay,
                          replicas=self.replicas)


cache_signature(LinearNetBase.training_step)
