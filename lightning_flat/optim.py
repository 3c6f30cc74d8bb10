"""SGD for replica-stacked parameters: per-replica learning rate and ridge, and frozen (diverged) replicas."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from lightning_flat._checks import check_real

__all__ = ["ReplicaSGD"]


def _per_replica(value: Any, p: Tensor) -> Any:
    """A float as is; a ``(R,)`` tensor shaped to broadcast over ``p (R, ...)``."""
    if isinstance(value, Tensor):
        return value.to(dtype=p.dtype, device=p.device).reshape(-1, *([1] * (p.ndim - 1)))
    return value


class ReplicaSGD(torch.optim.Optimizer):
    r"""``torch.optim.SGD`` (momentum, weight decay; no dampening or Nesterov) for parameters whose leading
    dimension indexes ``R`` independent replicas.

    ``lr`` and ``weight_decay`` may be floats or tensors of shape ``(R,)`` (one value per replica; a
    :class:`~lightning_flat.callbacks.HyperparameterSchedule` may set either kind in a param group). Per replica the
    update is torch's:

    .. math:: d = g + \lambda_r W, \quad b \leftarrow \mu b + d \ (b = d \text{ at the first step}), \quad
              W \leftarrow W - \eta_r b.

    ``active`` (a bool tensor ``(R,)``, typically the model's ``replica_active`` buffer, read at every step) freezes
    the replicas that are ``False``: their weights and momentum stay as they are, whatever their gradient holds.
    """

    def __init__(self, params: Iterable, lr: float | Tensor, momentum: float = 0.0, weight_decay: float | Tensor = 0.0,
                 active: Tensor | None = None) -> None:
        for name, value in (("lr", lr), ("weight_decay", weight_decay)):
            if isinstance(value, Tensor):
                if value.ndim != 1 or bool((value < 0).any()) or not bool(torch.isfinite(value).all()):
                    raise ValueError(f"{name} must be a float or a 1-D tensor of non-negative values, got {value}")
            else:
                check_real(name, value, low=0.0)
        check_real("momentum", momentum, low=0.0, high=1.0, high_open=True)
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        self.active = active

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        active = self.active
        if active is not None and bool(active.all()):
            active = None  # nobody is frozen: skip the masking
        for group in self.param_groups:
            momentum = group["momentum"]
            shaped: dict[tuple, tuple] = {}  # per (ndim, dtype, device): lr and weight decay shaped to broadcast
            for p in group["params"]:
                if p.grad is None:
                    continue
                key = (p.ndim, p.dtype, p.device)
                if key not in shaped:
                    shaped[key] = (_per_replica(group["lr"], p), _per_replica(group["weight_decay"], p))
                lr, wd = shaped[key]
                d_p = p.grad
                if isinstance(wd, Tensor) or wd != 0:
                    d_p = d_p + wd * p
                state = self.state[p]
                if momentum != 0:
                    buf = state.get("momentum_buffer")
                    buf = d_p.clone() if buf is None else buf * momentum + d_p
                    if active is not None and "momentum_buffer" in state:
                        buf = torch.where(active.reshape(-1, *([1] * (p.ndim - 1))), buf, state["momentum_buffer"])
                    state["momentum_buffer"] = buf
                    d_p = buf
                new = p - lr * d_p
                if active is not None:
                    new = torch.where(active.reshape(-1, *([1] * (p.ndim - 1))), new, p)
                p.copy_(new)
        return loss
