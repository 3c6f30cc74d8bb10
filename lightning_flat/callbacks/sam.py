"""Sharpness-aware minimization as a callback: works with automatic optimization on any LightningModule."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from lightning_flat._checks import check_bool, check_positive_int, check_real
from lightning_flat.engine.hooks import StepContext, StepHook, StepOracle
from lightning_flat.functional.sam import sam_gradient, sam_perturbation
from lightning_flat.measurements import MeasurementBatch

__all__ = ["SAM"]


def _batch_fields(batch: Any) -> tuple[dict[str, Tensor], Callable[[dict[str, Tensor]], Any]]:
    """The batch as a dict of tensors (examples along dim 0) and the function that rebuilds a batch from one."""
    if isinstance(batch, MeasurementBatch):
        return batch.fields(), batch.with_fields
    if isinstance(batch, Tensor):
        return {"0": batch}, lambda f: f["0"]
    if isinstance(batch, dict) and all(isinstance(v, Tensor) for v in batch.values()):
        return dict(batch), lambda f: dict(f)
    if isinstance(batch, (list, tuple)) and all(isinstance(v, Tensor) for v in batch):
        kind = type(batch)
        return {str(i): v for i, v in enumerate(batch)}, lambda f: kind(f[str(i)] for i in range(len(f)))
    raise TypeError(
        "SAM with m (m-SAM, 1-SAM) splits the batch along dim 0: it needs a MeasurementBatch, a tensor, or a "
        f"list/tuple/dict of tensors, got {type(batch).__name__}"
    )


def _has_running_statistics(module: nn.Module) -> bool:
    """Whether a forward in training mode updates buffers in place (BatchNorm*, InstanceNorm with running stats)."""
    return any(getattr(m, "track_running_stats", False) and getattr(m, "running_mean", None) is not None
               for m in module.modules())


class SAM(StepHook):
    r"""Sharpness-aware minimization: the optimizer steps with the gradient at an ascent-perturbed point.

    The callback replaces the gradient of each step:

    - ``m=None`` (n-SAM): $g = \nabla L_B(W)$ (the step's gradient),
      $\varepsilon = \rho g/\|g\|$, new gradient $\nabla L_B(W + \varepsilon)$: one extra forward and
      backward per step. The weights are restored bitwise afterwards.
    - ``m=k`` (m-SAM): the batch is split into chunks of ``k`` examples, each with its own ascent;
      ``m=1`` is 1-SAM (per-example ascent). The chunks go through ``torch.func.vmap(grad(...))``, not a Python loop.
    - ``adaptive=True`` (ASAM): $\varepsilon = \rho T^2 g/\|Tg\|$, $T = |W| + \eta$;
      ``normalize=False``: $\varepsilon = \rho T^2 g$ (unnormalized SAM).

    It acts at every SGD step through the ``step_gradients`` phase ([`StepHook`][lightning_flat.engine.StepHook]):
    inside the engine's fused chunks on the lightning_flat models (the ascent point's gradient from the engine's oracle,
    analytic by default), in ``on_before_optimizer_step`` on any other LightningModule (each parameter's ``.grad``
    replaced after Lightning's backward, before the update; the loss is then ``loss_fn(pl_module, batch)``, by
    default ``training_step(batch, 0)``, its ``"loss"`` entry if a dict, with logging silenced). The batch is the one
    of the current step *as training sees it*: with [`LabelNoise`][lightning_flat.callbacks.LabelNoise] the noisy
    targets, so the label noise enters the ascent and the descent gradient the same way (the same draw). Ridge (weight
    decay) stays in the optimizer and is applied at the unperturbed weights. With replicas each replica has its own
    ascent: norms per replica, chunks within each replica's minibatch. Gradient clipping, if configured, applies to the
    SAM gradient. Steps whose gradients were dropped are left alone; a parameter without a gradient (unused by the loss,
    frozen) keeps none and SAM acts on the others. With ``accumulate_grad_batches = k`` the ascent uses the accumulated
    gradient and the new gradient is the mean over the ``k`` micro-batches at that one ascent point: the SAM step on the
    whole accumulated batch. Batch-norm running statistics are restored after SAM's extra forwards (the step's own
    forward updates them once); m-SAM on such a module runs its chunks one by one with autograd. Under DDP the new
    gradients are averaged across ranks. A [`HyperparameterSchedule`][lightning_flat.callbacks.HyperparameterSchedule]
    with ``sam_rho=...`` sets the radius of each step (``rho`` is then the value without a schedule and is not changed).

    Args:
        rho: ascent radius (>= 0; may be scheduled by
            [`HyperparameterSchedule`][lightning_flat.callbacks.HyperparameterSchedule] ``sam_rho``).
        m: ``None`` for n-SAM, else the chunk size (1 for 1-SAM).
        adaptive: ASAM.
        normalize: divide the ascent by the gradient norm.
        eta: ASAM's offset in $T = |W| + \eta$.
        loss_fn: ``loss_fn(pl_module, batch) -> scalar`` on modules the engine does not train, see above.

    Raises:
        ValueError: a negative ``rho`` or ``eta``, ``m`` not a positive int; at setup: 1-SAM (``m=1``) on a module
            with batch norm (a batch of one cannot be normalized), manual optimization without ``loss_fn`` (its
            ``training_step`` steps the optimizers), several optimizers.
        TypeError: ``adaptive``/``normalize`` not bools, ``loss_fn`` not callable.

    See Also:
        [`lightning_flat.functional.sam_perturbation`][lightning_flat.functional.sam_perturbation],
            [`lightning_flat.functional.sam_gradient`][lightning_flat.functional.sam_gradient].
    """

    def __init__(self, rho: float = 0.05, m: int | None = None, adaptive: bool = False, normalize: bool = True,
                 eta: float = 0.01, loss_fn: Callable[[L.LightningModule, Any], Tensor] | None = None) -> None:
        self.rho = rho
        self.m = None if m is None else check_positive_int("m", m)
        self.adaptive = check_bool("adaptive", adaptive)
        self.normalize = check_bool("normalize", normalize)
        self.eta = check_real("eta", eta, low=0.0)
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable as loss_fn(pl_module, batch), got {loss_fn!r}")
        self.loss_fn = loss_fn
        self._norms = False  # the module has batch-norm running statistics (set at setup)
        self._state_key: str | None = None

    @property
    def rho(self) -> float:
        return self._rho

    @rho.setter
    def rho(self, value: float) -> None:
        self._rho = check_real("rho", value, low=0.0)

    @property
    def state_key(self) -> str:
        if self._state_key is None:
            fn = None if self.loss_fn is None else getattr(self.loss_fn, "__qualname__", repr(self.loss_fn))
            self._state_key = (f"{type(self).__qualname__}{{'m': {self.m}, 'adaptive': {self.adaptive}, "
                               f"'normalize': {self.normalize}, 'eta': {self.eta}, 'loss_fn': {fn!r}}}")
        return self._state_key

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._norms = _has_running_statistics(pl_module)
        if self.m == 1 and self._norms:
            raise ValueError("SAM(m=1): 1-SAM runs a forward on one example at a time, and batch norm cannot "
                             "normalize a batch of one in training mode; use m >= 2 (m-SAM) or n-SAM (m=None)")
        if not pl_module.automatic_optimization and self.loss_fn is None:
            raise ValueError("SAM: with manual optimization, training_step steps the optimizers itself, so it cannot "
                             "serve as SAM's loss: pass loss_fn=lambda module, batch: <the batch loss>")

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if len(trainer.optimizers) > 1:
            raise ValueError(f"SAM: the module has {len(trainer.optimizers)} optimizers and SAM cannot know which "
                             "steps should use the sharpness-aware gradient; use one optimizer (with param groups)")

    def step_gradients(self, ctx: StepContext) -> None:
        rho = ctx.hparams.get("sam_rho", self._rho)
        if rho == 0.0:
            return
        oracle = ctx.oracle(self.loss_fn)
        with torch.enable_grad(), oracle.preserving():  # the extra forwards leave no trace (running statistics, ...)
            if self.m is None:
                eps = sam_perturbation(ctx.grads, rho, params=ctx.weights, adaptive=self.adaptive,
                                       normalize=self.normalize, eta=self.eta, replica_dims=ctx.replicas.dims)
                _, ctx.grads = oracle.loss_and_grads([w.detach() + e for w, e in zip(ctx.weights, eps)], ctx.batches)
                return
            # Lightning's accumulated gradient is the mean over the micro-batches: the SAM gradient is the mean of the
            # micro-batches' m-SAM gradients
            try:
                per = [self._msam(ctx, oracle, b, rho) for b in ctx.batches]
            except (RuntimeError, ValueError, IndexError) as err:
                raise ValueError(
                    f"SAM(m={self.m}) could not evaluate {type(ctx.module).__name__}'s loss on chunks of {self.m} "
                    f"example(s) ({type(err).__name__}: {str(err).splitlines()[0]}); a training_step that carries a "
                    "state across batches (e.g. an RNN's hidden state) has no loss for part of a batch: use n-SAM "
                    "(m=None) or pass loss_fn=lambda module, batch: <the loss of the batch alone>") from err
            ctx.grads = per[0] if len(per) == 1 else [sum(gs) / len(per) for gs in zip(*per)]

    def _msam_loop(self, ctx: StepContext, oracle: StepOracle, batch: Any, rho: float) -> list[Tensor]:
        """m-SAM chunk by chunk with plain autograd: for modules whose forward mutates state (batch norm's running
        statistics), which torch.func transforms refuse. The same sum of |c|/B times each chunk's SAM gradient."""
        fields, rebuild = _batch_fields(batch)
        B = next(iter(fields.values())).shape[0]
        weights = [w.detach() for w in ctx.weights]
        total = [torch.zeros_like(w) for w in weights]
        for start in range(0, B, self.m):
            part = {k: v[start:start + self.m] for k, v in fields.items()}
            chunk = [rebuild(part)]
            _, g = oracle.loss_and_grads(weights, chunk)
            eps = sam_perturbation(g, rho, params=weights, adaptive=self.adaptive, normalize=self.normalize,
                                   eta=self.eta, replica_dims=ctx.replicas.dims)
            _, g = oracle.loss_and_grads([w + e for w, e in zip(weights, eps)], chunk)
            size = next(iter(part.values())).shape[0]
            total = [t + (size / B) * gi for t, gi in zip(total, g)]
        return total

    def _msam(self, ctx: StepContext, oracle: StepOracle, batch: Any, rho: float) -> list[Tensor]:
        if self._norms:
            return self._msam_loop(ctx, oracle, batch, rho)
        fields, rebuild = _batch_fields(batch)
        replica_dims = ctx.replicas.dims
        if replica_dims and isinstance(batch, MeasurementBatch) and batch.targets.ndim == 2:
            # per-replica targets (R, B) (per-replica minibatches, or per-replica label noise on a shared one): chunk
            # along the examples, dim 1 of the per-replica fields
            per_replica_rows = batch.index is not None and batch.index.ndim == 2
            per = {k for k in fields if k == "targets" or per_replica_rows}
            inner = rebuild
            fields = {k: v.movedim(1, 0) if k in per else v for k, v in fields.items()}
            rebuild = lambda f: inner({k: v.movedim(0, 1) if k in per else v for k, v in f.items()})  # noqa: E731
        return sam_gradient(oracle.loss_at, ctx.weights, fields, rebuild, rho, self.m, adaptive=self.adaptive,
                            normalize=self.normalize, eta=self.eta, replica_dims=replica_dims)

    def state_dict(self) -> dict[str, Any]:
        return {"rho": self._rho}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rho = state_dict.get("rho", self._rho)
