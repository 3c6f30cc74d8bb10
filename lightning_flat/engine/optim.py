"""SGD for the lightning_flat models: per-replica learning rate and ridge, frozen replicas, and one update function
shared by ``step()`` (Lightning's path) and the engine's fused steps, so both are bitwise the same."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_flat._checks import check_real
from lightning_flat.engine.replicas import Replicas, per_replica_tensor

__all__ = ["ReplicaSGD", "write_hyperparameters"]


def _per_replica(value: Any, p: Tensor) -> Any:
    """A float as is; a ``(R,)`` tensor shaped to broadcast over ``p (R, ...)``."""
    if isinstance(value, Tensor):
        return value.to(dtype=p.dtype, device=p.device).reshape(-1, *([1] * (p.ndim - 1)))
    return value


def _check_hyperparameter(name: str, value: Any) -> None:
    if isinstance(value, Tensor):
        if value.ndim != 1 or bool((value < 0).any()) or not bool(torch.isfinite(value).all()):
            raise ValueError(f"{name} must be a float or a 1-D tensor of non-negative values, got {value}")
    else:
        check_real(name, value, low=0.0)


def write_hyperparameters(optimizers: Iterable[torch.optim.Optimizer], values: dict[str, Any]) -> None:
    """Put ``lr``/``weight_decay`` from ``values`` (a number, or a per-replica list, stored as a float64 tensor) into
    every param group of every optimizer; other keys are ignored."""
    for key in ("lr", "weight_decay"):
        if key in values:
            stored = per_replica_tensor(values[key])
            for opt in optimizers:
                for group in opt.param_groups:
                    group[key] = stored


class ReplicaSGD(torch.optim.Optimizer):
    r"""``torch.optim.SGD`` (momentum, weight decay; no dampening or Nesterov) for the lightning_flat models, whose
    parameters may carry a leading dimension indexing ``R`` independent replicas.

    ``lr`` and ``weight_decay`` may be floats or tensors of shape ``(R,)`` (one value per replica; a
    [`HyperparameterSchedule`][lightning_flat.callbacks.HyperparameterSchedule] may set either kind in a param group).
    Per replica the update is torch's:

    $$
    d = g + \lambda_r W, \quad b \leftarrow \mu b + d \ (b = d \text{ at the first step}), \quad
    W \leftarrow W - \eta_r b.
    $$

    ``replicas`` (the model's [`Replicas`][lightning_flat.engine.Replicas], whose ``active`` mask is read at every step)
    freezes the replicas that are not active: their weights and momentum stay as they are, whatever their gradient
    holds. ``lr`` and ``weight_decay`` may be given as per-replica lists.

    `step` reads ``p.grad`` (Lightning's path); [`apply_gradients`][lightning_flat.engine.ReplicaSGD.apply_gradients]
    takes the gradients as a list (the engine's fused path). Both run the same update, so a run is bitwise the same on
    either path.
    """

    def __init__(self, params: Iterable, lr: float | Tensor | list[float], momentum: float = 0.0,
                 weight_decay: float | Tensor | list[float] = 0.0, replicas: Replicas | None = None) -> None:
        lr, weight_decay = per_replica_tensor(lr), per_replica_tensor(weight_decay)
        _check_hyperparameter("lr", lr)
        _check_hyperparameter("weight_decay", weight_decay)
        check_real("momentum", momentum, low=0.0, high=1.0, high_open=True)
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        self.replicas = replicas
        # per (group, ndim, dtype, device): lr and weight decay shaped to broadcast, rebuilt when a group changes
        self._shaped: dict[tuple, tuple[Any, Any, Any, Any]] = {}

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._update(group, group["params"], [p.grad for p in group["params"]])
        return loss

    @torch.no_grad()
    def apply_gradients(self, grads: Sequence[Tensor | None]) -> None:
        """One update with the given gradients, in the order of the parameters across the param groups (``None``
        skips a parameter, as a missing ``.grad`` does in `step`)."""
        k = 0
        for group in self.param_groups:
            n = len(group["params"])
            self._update(group, group["params"], grads[k:k + n])
            k += n

    def _shape(self, group: dict, p: Tensor) -> tuple[Any, Any]:
        key = (id(group), p.ndim, p.dtype, p.device)
        lr, wd = group["lr"], group["weight_decay"]
        cached = self._shaped.get(key)
        if cached is None or cached[0] is not lr or cached[1] is not wd:
            cached = (lr, wd, _per_replica(lr, p), _per_replica(wd, p))
            self._shaped[key] = cached
        return cached[2], cached[3]

    def _update(self, group: dict, params: Sequence[Tensor], grads: Sequence[Tensor | None]) -> None:
        momentum = group["momentum"]
        active = self.replicas.active if self.replicas is not None and self.replicas.dims else None
        if active is not None and bool(active.all()):
            active = None  # nobody is frozen: skip the masking
        # W <- W - lr d in one kernel for a float lr (add_ with alpha), else W - (lr * d) per replica
        for p, g in zip(params, grads):
            if g is None:
                continue
            lr, wd = self._shape(group, p)
            d_p = g
            if isinstance(wd, Tensor) or wd != 0:
                d_p = d_p + wd * p
            if momentum != 0:
                state = self.state[p]
                old = state.get("momentum_buffer")
                if old is None:
                    buf = d_p.clone()
                elif active is None:
                    buf = old.mul_(momentum).add_(d_p)
                else:
                    buf = torch.where(active.reshape(-1, *([1] * (p.ndim - 1))), old * momentum + d_p, old)
                state["momentum_buffer"] = buf
                d_p = buf
            if active is None:
                if isinstance(lr, Tensor):
                    p.sub_(lr * d_p)
                else:
                    p.add_(d_p, alpha=-lr)
            else:
                p.copy_(torch.where(active.reshape(-1, *([1] * (p.ndim - 1))), p - lr * d_p, p))
