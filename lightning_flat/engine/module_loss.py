"""The loss of any LightningModule as a function of its parameters: what SAM's extra gradients and the curvature
reads of modules other than the lightning_flat models evaluate.

- [`training_step_loss`][lightning_flat.engine.training_step_loss]: ``training_step(batch, 0)`` (its ``"loss"`` entry if
  it returns a dict) with the module's logging silenced, the default ``loss_fn(module, batch)``;
- [`ModuleOracle`][lightning_flat.engine.ModuleOracle]: ``loss_and_grads`` at other parameter values (the values swapped
  in and restored bitwise) and ``loss_at``, a pure function of the parameters for ``torch.func`` (``functional_call``);
  on a module with a pure loss of its trained tensors ([`WeightLoss`][lightning_flat.engine.WeightLoss]) and no
  ``loss_fn`` that loss is used instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import contextlib

import torch
from torch import Tensor, nn

from lightning_flat.engine.compat import silenced_logging
from lightning_flat.engine.interfaces import WeightLoss
from lightning_flat.engine.snapshot import ModuleSnapshot

__all__ = ["training_step_loss", "ModuleOracle", "LossFn"]

#: ``loss_fn(module, batch) -> scalar``
LossFn = Callable[[Any, Any], Tensor]


def training_step_loss(module: Any, batch: Any) -> Tensor:
    """``training_step(batch, 0)`` (its ``"loss"`` entry if it returns a dict) with the module's logging silenced.

    Raises:
        ValueError: ``training_step`` returns ``None``, a dict without ``"loss"``, or no tensor (nothing to
            differentiate: pass ``loss_fn=``).
    """
    with silenced_logging(module):
        out = module.training_step(batch, 0)
    loss = out.get("loss") if isinstance(out, dict) else out
    if not isinstance(loss, Tensor):
        what = "None" if out is None else "a dict without 'loss'" if isinstance(out, dict) else type(out).__name__
        raise ValueError(f"{type(module).__name__}.training_step returned {what}, which has no loss to differentiate: "
                         "pass loss_fn=lambda module, batch: <the batch loss>")
    return loss


class _LossCall(nn.Module):
    """``loss_fn(module, batch)`` as a forward, so that ``torch.func.functional_call`` can swap the parameters."""

    def __init__(self, module: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.module = module
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> Tensor:
        return self.loss_fn(self.module, batch)


class ModuleOracle:
    """The loss of ``module`` at other values of ``params`` (tensors of the module, in the optimizer's order).

    ``loss_fn=None`` uses the module's own pure loss where it has one (the lightning_flat models), else
    [`training_step_loss`][lightning_flat.engine.training_step_loss]."""

    def __init__(self, module: Any, params: Sequence[Tensor], loss_fn: LossFn | None = None) -> None:
        self.module, self.params = module, list(params)
        self.pure = loss_fn is None and isinstance(module, WeightLoss)
        self.loss_fn = loss_fn or training_step_loss
        if self.pure:
            weights = module.weights()
            self._index = [next(i for i, w in enumerate(weights) if w is p) for p in self.params]
        else:
            names = {id(p): name for name, p in module.named_parameters()}
            self._keys = [f"module.{names[id(p)]}" for p in self.params]
            self._wrapper = _LossCall(module, self.loss_fn)

    def loss_at(self, weights: Sequence[Tensor], batch: Any) -> Tensor:
        """The loss on ``batch`` with ``weights`` in place of ``params``, a pure function (no module state is
        written)."""
        if self.pure:
            ws = list(self.module.weights())
            for i, w in zip(self._index, weights):
                ws[i] = w
            return self.module.loss_from_weights(ws, batch)
        return torch.func.functional_call(self._wrapper, dict(zip(self._keys, weights)), (batch,))

    @contextlib.contextmanager
    def preserving(self) -> Any:
        """Put back whatever the evaluations inside change in the module (a carried state, batch-norm running
        statistics, a metric's update, a list's items;
        [`ModuleSnapshot`][lightning_flat.curvature.isolation.ModuleSnapshot]); nothing to do for a pure loss."""
        if self.pure:
            yield
            return
        snapshot = ModuleSnapshot(self.module)
        try:
            yield
        finally:
            snapshot.restore(self.module)

    def loss_and_grads(self, weights: Sequence[Tensor], batches: Sequence[Any]) -> tuple[Tensor, list[Tensor]]:
        """The mean loss over ``batches`` at ``weights`` and its gradients (zero for a parameter the loss does not
        use). The values are written into ``params`` for the evaluation (so modules with hooks or state see their own
        parameters) and restored bitwise afterwards."""
        saved = [p.detach().clone() for p in self.params]
        try:
            with torch.no_grad():
                for p, w in zip(self.params, weights):
                    p.copy_(w)
            with torch.enable_grad():
                if self.pure:
                    loss = sum(self.module.loss_from_weights(self.module.weights(), b) for b in batches) / len(batches)
                else:
                    loss = sum(self.loss_fn(self.module, b) for b in batches) / len(batches)
                grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, saved):
                    p.copy_(s)
        return loss.detach(), [torch.zeros_like(p) if g is None else g for p, g in zip(self.params, grads)]
