"""Sharpness-aware minimization as a callback: works with automatic optimization on any LightningModule."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from lightning_flat._checks import check_bool, check_positive_int, check_real
from lightning_flat.callbacks.base import is_linear_net
from lightning_flat.callbacks.curvature import default_loss_fn
from lightning_flat.engine.hooks import StepContext, StepHook, engine_drives, hparams_at
from lightning_flat.functional.sam import sam_gradient, sam_perturbation
from lightning_flat.measurements import MeasurementBatch

__all__ = ["SAM"]


class _LossCall(nn.Module):
    """Wraps ``loss_fn(module, batch)`` as a forward, so ``torch.func.functional_call`` can swap the parameters."""

    def __init__(self, module: nn.Module, loss_fn: Callable) -> None:
        super().__init__()
        self.module = module
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> Tensor:
        return self.loss_fn(self.module, batch)


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


@contextmanager
def _frozen_norm_statistics(module: nn.Module):
    """Restore every batch-norm running statistic after SAM's extra forwards: the step's own forward already
    updated them once."""
    norms = [m for m in module.modules() if getattr(m, "track_running_stats", False)]  # BatchNorm*, InstanceNorm*
    saved = [{k: v.clone() for k, v in m.named_buffers(recurse=False)} for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, buffers in zip(norms, saved):
                for k, v in buffers.items():
                    getattr(m, k).copy_(v)


class SAM(StepHook, Callback):
    r"""Sharpness-aware minimization: the optimizer steps with the gradient at an ascent-perturbed point.

    The callback replaces the gradient of each step:

    - ``m=None`` (n-SAM): :math:`g = \nabla L_B(W)` (the gradient Lightning just computed),
      :math:`\varepsilon = \rho g/\|g\|`, new gradient :math:`\nabla L_B(W + \varepsilon)`: one extra forward and
      backward per step. The weights are restored bitwise afterwards.
    - ``m=k`` (m-SAM): the batch is split into chunks of ``k`` examples, each with its own ascent;
      ``m=1`` is 1-SAM (per-example ascent). The chunks go through ``torch.func.vmap(grad(...))``, not a Python loop.
    - ``adaptive=True`` (ASAM): :math:`\varepsilon = \rho T^2 g/\|Tg\|`, :math:`T = |W| + \eta`;
      ``normalize=False``: :math:`\varepsilon = \rho T^2 g` (unnormalized SAM).

    On the lightning_flat models the training engine asks for the SAM gradient at every SGD step (also inside fused
    chunks, see :class:`~lightning_flat.engine.StepHook`), with its gradient oracle (analytic by default) for the
    ascent point. On any other LightningModule the callback replaces each parameter's ``.grad`` in
    ``on_before_optimizer_step`` (after Lightning's backward, before the update); its loss is then
    ``loss_fn(pl_module, batch)``, by default ``training_step(batch, 0)`` (its ``"loss"`` entry if a dict) with
    logging silenced. The batch is the one of the current step *as training sees it*: with :class:`LabelNoise` the
    noisy targets, so the label noise enters the ascent and the descent gradient the same way (the same draw). Ridge
    (weight decay) stays in the optimizer and is applied at the unperturbed weights. With replicas (a lightning_flat
    model with ``replicas > 1``) each replica has its own ascent: norms per replica, chunks within each replica's
    minibatch. Gradient clipping, if configured, applies to the SAM gradient. Steps whose gradients were dropped
    (e.g. by :class:`FiniteLossGuard`) are left alone; a parameter without a gradient (unused by the loss, frozen)
    keeps none and SAM acts on the others. With ``accumulate_grad_batches = k`` the ascent uses the accumulated
    gradient and the new gradient is the mean over the ``k`` micro-batches at that one ascent point: the SAM step
    on the whole accumulated batch. Batch-norm running statistics are restored after SAM's extra forwards (the
    step's own forward updates them once). Refused at setup: manual optimization without ``loss_fn`` (its
    ``training_step`` steps the optimizers), and several optimizers. Under DDP the new gradients are averaged across
    ranks. A
    :class:`HyperparameterSchedule` with ``sam_rho=...`` sets the radius of each step (``rho`` is then the value
    without a schedule and is not changed).

    Args:
        rho: ascent radius (>= 0; may be scheduled by :class:`HyperparameterSchedule` ``sam_rho``).
        m: ``None`` for n-SAM, else the chunk size (1 for 1-SAM).
        adaptive: ASAM.
        normalize: divide the ascent by the gradient norm.
        eta: ASAM's offset in :math:`T = |W| + \eta`.
        loss_fn: ``loss_fn(pl_module, batch) -> scalar``, see above.

    See Also:
        :func:`lightning_flat.functional.sam_perturbation`, :func:`lightning_flat.functional.sam_gradient`.
    """

    fused_safe_hooks = ("on_train_batch_start", "on_before_optimizer_step")

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
        self._batches: list[Any] = []  # the micro-batches of the current optimizer step (gradient accumulation)
        self._step_rho = self._rho
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
            self._state_key = self._generate_state_key(m=self.m, adaptive=self.adaptive, normalize=self.normalize)
        return self._state_key

    def _loss_fn(self, pl_module: L.LightningModule) -> Callable:
        if self.loss_fn is not None:
            return self.loss_fn
        if is_linear_net(pl_module):
            return lambda module, batch: module.loss(batch)
        return default_loss_fn

    def step_gradients(self, ctx: StepContext) -> None:
        rho = ctx.hparams.get("sam_rho", self._rho)
        if rho == 0.0:
            return
        if self.m is None:
            eps = sam_perturbation(ctx.grads, rho, params=ctx.weights, adaptive=self.adaptive,
                                   normalize=self.normalize, eta=self.eta, replica_dims=ctx.replica_dims)
            _, ctx.grads = ctx.loss_and_grads([w.detach() + e for w, e in zip(ctx.weights, eps)], ctx.batch)
        else:
            with torch.enable_grad():
                ctx.grads = self._msam(ctx.module, ctx.weights, ctx.batch, rho)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.m == 1 and not is_linear_net(pl_module) and _has_running_statistics(pl_module):
            raise ValueError("SAM(m=1): 1-SAM runs a forward on one example at a time, and batch norm cannot "
                             "normalize a batch of one in training mode; use m >= 2 (m-SAM) or n-SAM (m=None)")
        if not is_linear_net(pl_module) and not pl_module.automatic_optimization and self.loss_fn is None:
            raise ValueError("SAM: with manual optimization, training_step steps the optimizers itself, so it cannot "
                             "serve as SAM's loss: pass loss_fn=lambda module, batch: <the batch loss>")

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if len(trainer.optimizers) > 1:
            raise ValueError(f"SAM: the module has {len(trainer.optimizers)} optimizers and SAM cannot know which "
                             "steps should use the sharpness-aware gradient; use one optimizer (with param groups)")

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if engine_drives(pl_module):
            self._batches = []
            return
        # the batch as training sees it (LabelNoise's targets, whenever it runs, are in it); with
        # accumulate_grad_batches > 1, every micro-batch of the step
        self._batches.append(batch)
        self._step_rho = hparams_at(trainer, trainer.global_step).get("sam_rho", self._rho)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        batches, self._batches = self._batches, []
        rho = getattr(self, "_step_rho", self._rho)
        if rho == 0.0 or not batches:
            return
        # the parameters this step trains: those with a gradient (a parameter the loss does not use, or a frozen
        # one, keeps its None gradient; gradients dropped by FiniteLossGuard leave nothing to do)
        params = [p for group in optimizer.param_groups for p in group["params"]
                  if p.requires_grad and p.grad is not None]
        if not params:
            return
        with torch.enable_grad(), _frozen_norm_statistics(pl_module):
            # Lightning's accumulated gradient is the mean over the micro-batches (each loss divided by their
            # number): the SAM gradient is the mean of the micro-batches' gradients at the one ascent point
            if self.m is None:
                grads = self._nsam(pl_module, params, rho, batches)
            else:
                per = [self._msam(pl_module, params, b, rho) for b in batches]
                grads = [sum(gs) / len(per) for gs in zip(*per)] if len(per) > 1 else per[0]
        if trainer.world_size > 1:
            grads = [trainer.strategy.reduce(g, reduce_op="mean") for g in grads]
        for p, g in zip(params, grads):
            p.grad = g.to(p.dtype)

    @staticmethod
    def _replica_dims(pl_module: L.LightningModule) -> int:
        return 1 if is_linear_net(pl_module) and getattr(pl_module, "replicas", 1) > 1 else 0

    def _nsam(self, pl_module: L.LightningModule, params: list[Tensor], rho: float, batches: list[Any],
              grads: list[Tensor] | None = None) -> list[Tensor]:
        """The gradient of the mean loss over ``batches`` at the ascent point ``W + eps(grads)`` (``grads``: the
        parameters' ``.grad`` unless given); the weights are restored bitwise afterwards."""
        grads = [p.grad for p in params] if grads is None else grads
        eps = sam_perturbation(grads, rho, params=params, adaptive=self.adaptive, normalize=self.normalize,
                               eta=self.eta, replica_dims=self._replica_dims(pl_module))
        saved = [p.detach().clone() for p in params]
        try:
            with torch.no_grad():
                for p, e in zip(params, eps):
                    p.add_(e)
            loss_fn = self._loss_fn(pl_module)
            loss = sum(loss_fn(pl_module, b) for b in batches) / len(batches)
            out = torch.autograd.grad(loss, params, allow_unused=True)
        finally:
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(params, out)]

    def _msam_loop(self, pl_module: L.LightningModule, params: list[Tensor], batch: Any, rho: float) -> list[Tensor]:
        """m-SAM chunk by chunk with plain autograd: for modules whose forward mutates state (batch norm's running
        statistics), which torch.func transforms refuse. The same sum of |c|/B times each chunk's SAM gradient:
        each chunk's ascent from its own gradient (:meth:`_nsam` on the chunk)."""
        fields, rebuild = _batch_fields(batch)
        B = next(iter(fields.values())).shape[0]
        loss_fn = self._loss_fn(pl_module)
        total = [torch.zeros_like(p) for p in params]
        for start in range(0, B, self.m):
            part = {k: v[start:start + self.m] for k, v in fields.items()}
            chunk = rebuild(part)
            g = torch.autograd.grad(loss_fn(pl_module, chunk), params, allow_unused=True)
            g = [torch.zeros_like(p) if gi is None else gi for p, gi in zip(params, g)]
            size = next(iter(part.values())).shape[0]
            total = [t + (size / B) * gi for t, gi in zip(total, self._nsam(pl_module, params, rho, [chunk], g))]
        return total

    def _msam(self, pl_module: L.LightningModule, params: list[Tensor], batch: Any, rho: float) -> list[Tensor]:
        if not is_linear_net(pl_module) and _has_running_statistics(pl_module):
            return self._msam_loop(pl_module, params, batch, rho)
        fields, rebuild = _batch_fields(batch)
        replica_dims = self._replica_dims(pl_module)
        if replica_dims and isinstance(batch, MeasurementBatch) and batch.targets.ndim == 2:
            # per-replica targets (R, B) (per-replica minibatches, or per-replica label noise on a shared one): chunk
            # along the examples, dim 1 of the per-replica fields
            per_replica_rows = batch.index is not None and batch.index.ndim == 2
            per = {k for k in fields if k == "targets" or per_replica_rows}
            inner = rebuild
            fields = {k: v.movedim(1, 0) if k in per else v for k, v in fields.items()}
            rebuild = lambda f: inner({k: v.movedim(0, 1) if k in per else v for k, v in f.items()})  # noqa: E731
        loss_fn = self._loss_fn(pl_module)
        if is_linear_net(pl_module) and self.loss_fn is None:
            weights = pl_module.weights()
            index = [next(i for i, w in enumerate(weights) if w is p) for p in params]

            def loss_at(ps, batch):
                ws = list(weights)
                for i, p in zip(index, ps):
                    ws[i] = p
                return pl_module.loss_from_weights(ws, batch)
        else:
            names = {id(p): name for name, p in pl_module.named_parameters()}
            keys = [f"module.{names[id(p)]}" for p in params]
            wrapper = _LossCall(pl_module, loss_fn)

            def loss_at(ps, batch):
                return torch.func.functional_call(wrapper, dict(zip(keys, ps)), (batch,))

        return sam_gradient(loss_at, params, fields, rebuild, rho, self.m, adaptive=self.adaptive,
                            normalize=self.normalize, eta=self.eta, replica_dims=replica_dims)

    def state_dict(self) -> dict[str, Any]:
        return {"rho": self._rho}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rho = state_dict.get("rho", self._rho)
