"""Curvature callbacks: Hessian trace and sharpness of the full training loss."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import Tensor

from lightning_flat import functional as F
from lightning_flat._checks import check_choice, check_positive_int, check_real
from lightning_flat.callbacks.base import MeasuringCallback, is_linear_net, problem_data
from lightning_flat.measurements import Measurements

__all__ = ["HessianTrace", "Sharpness"]


def default_loss_fn(pl_module: L.LightningModule, batch: Any) -> Tensor:
    """``training_step(batch, 0)`` (its ``"loss"`` entry if it returns a dict) with the module's logging silenced."""
    pl_module.__dict__["log"] = lambda *a, **k: None
    pl_module.__dict__["log_dict"] = lambda *a, **k: None
    try:
        out = pl_module.training_step(batch, 0)
    finally:
        pl_module.__dict__.pop("log", None)
        pl_module.__dict__.pop("log_dict", None)
    return out["loss"] if isinstance(out, dict) else out


class _CurvatureCallback(MeasuringCallback):
    """Shared parts: the exact path on lightning_flat models, the hessian-eigenthings path elsewhere."""

    def __init__(self, every_n_steps: int, measurements: Measurements | None, targets: Tensor | None,
                 loss_fn: Callable[[L.LightningModule, Any], Tensor] | None, seed: int) -> None:
        super().__init__(every_n_steps)
        if measurements is not None and not isinstance(measurements, Measurements):
            raise TypeError(f"measurements must be a lightning_flat Measurements, got {type(measurements).__name__}")
        if (measurements is None) != (targets is None):
            raise ValueError("measurements and targets must be given together")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable as loss_fn(pl_module, batch), got {loss_fn!r}")
        self.measurements, self.targets = measurements, targets
        self.loss_fn = loss_fn or default_loss_fn
        self.seed = seed
        self._batch: Any = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._batch is None and not is_linear_net(pl_module):
            self._batch = batch  # the fixed curvature batch of the generic path: the first training batch

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if is_linear_net(pl_module):  # the generic path has no batch before the first step
            super().on_train_start(trainer, pl_module)

    def _operator(self, pl_module: L.LightningModule):
        from hessian_eigenthings import HessianOperator
        return HessianOperator(pl_module, [self._batch], self.loss_fn, full_dataset=True)


class HessianTrace(_CurvatureCallback):
    r"""Log the trace of the Hessian of the full training loss (no label noise, no ridge) every ``every_n_steps``.

    On lightning_flat models the value is exact: :func:`lightning_flat.functional.hessian_trace`, the closed form
    :math:`\frac2n\sum_j\mathrm{curvature}(P_j^\top P_j, S_jS_j^\top)`, which is cheap (at the Gatmiry size, one
    product with the cached fourth-moment matrix). On any other LightningModule it is a Hutch++ estimate
    (hessian-eigenthings) with ``num_matvecs`` Hessian-vector products of ``loss_fn(pl_module, batch)`` on the first
    training batch.

    Logged keys: ``hessian/trace``; on the Hutch++ path also ``hessian/trace_stderr``.

    Args:
        every_n_steps: measuring period in optimizer steps.
        measurements, targets: the training data; default: the datamodule's.
        loss_fn: generic path only; default ``training_step(batch, 0)`` with logging silenced.
        num_matvecs: generic path only; Hutch++ budget.
        seed: generic path only; seed of the Hutch++ probes.
    """

    def __init__(self, every_n_steps: int = 100, measurements: Measurements | None = None,
                 targets: Tensor | None = None, loss_fn: Callable | None = None, num_matvecs: int = 99,
                 seed: int = 0) -> None:
        super().__init__(every_n_steps, measurements, targets, loss_fn, seed)
        self.num_matvecs = check_positive_int("num_matvecs", num_matvecs)

    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        if is_linear_net(pl_module):
            meas, _ = problem_data(trainer, pl_module, self.measurements, self.targets, "HessianTrace")
            return {"hessian/trace": F.hessian_trace(pl_module.weights(), meas)}
        from hessian_eigenthings import trace
        with torch.enable_grad():
            res = trace(self._operator(pl_module), num_matvecs=self.num_matvecs, method="hutch++", seed=self.seed)
        return {"hessian/trace": res.estimate, "hessian/trace_stderr": res.stderr}


class Sharpness(_CurvatureCallback):
    r"""Log the sharpness (largest algebraic eigenvalue of the Hessian of the full training loss, residual term
    included) every ``every_n_steps``.

    Restarted Lanczos over Hessian-vector products (``torch.func`` on lightning_flat models, hessian-eigenthings'
    ``HessianOperator`` elsewhere), warm-started from the previous top eigenvector, so a read during training
    costs a few HVPs; ``method="exact"`` uses ``eigvalsh`` of the dense Hessian (small models only).

    Logged keys: ``hessian/sharpness``, ``hessian/sharpness_hvps`` (HVPs used by this read, Lanczos only). With
    replicas, each replica has its own Hessian, Lanczos run and warm-start vector.
    """

    def __init__(self, every_n_steps: int = 100, method: str = "auto", max_iter: int = 100, tol: float = 1e-8,
                 warm_start: bool = True, measurements: Measurements | None = None, targets: Tensor | None = None,
                 loss_fn: Callable | None = None, seed: int = 0) -> None:
        super().__init__(every_n_steps, measurements, targets, loss_fn, seed)
        self.method = check_choice("method", method, ("auto", "exact", "lanczos"))
        self.max_iter = check_positive_int("max_iter", max_iter)
        self.tol = check_real("tol", tol, low=0.0, low_open=True)
        self.warm_start = bool(warm_start)
        self._v: dict[int, Tensor] = {}  # warm-start vector per replica

    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        with torch.enable_grad():
            if not is_linear_net(pl_module):
                op = self._operator(pl_module)
                theta, hvps = self._lanczos(op.matvec, op.size, op.dtype, op.device, 0)
                return {"hessian/sharpness": theta, "hessian/sharpness_hvps": hvps}
            meas, targets = problem_data(trainer, pl_module, self.measurements, self.targets, "Sharpness")
            weights = pl_module.weights()
            R = getattr(pl_module, "replicas", 1)
            active = getattr(pl_module, "replica_active", None)
            per = [[W[r] for W in weights] for r in range(R)] if R > 1 else [weights]
            size = sum(W.numel() for W in per[0])
            thetas, counts = [], []
            for r, ws in enumerate(per):
                if active is not None and not bool(active[r]):
                    thetas.append(float("nan"))  # a diverged replica is not measured
                    counts.append(0)
                elif self.method == "exact" or (self.method == "auto" and size <= 1024):
                    thetas.append(float(F.sharpness(ws, meas, targets, method="exact")))
                    counts.append(0)
                else:
                    hvp, w0 = F.loss_hvp(ws, meas, targets)
                    theta, hvps = self._lanczos(hvp, size, w0.dtype, w0.device, r)
                    thetas.append(float(theta))
                    counts.append(hvps)
        if R == 1:
            out = {"hessian/sharpness": thetas[0]}
            if counts[0]:
                out["hessian/sharpness_hvps"] = counts[0]
            return out
        out = {"hessian/sharpness": torch.tensor(thetas, dtype=torch.float64)}
        if any(counts):
            out["hessian/sharpness_hvps"] = torch.tensor(counts, dtype=torch.float64)
        return out

    def _lanczos(self, hvp, size: int, dtype: torch.dtype, device: torch.device, key: int):
        v0 = self._v.get(key) if self.warm_start else None
        if v0 is not None and v0.numel() != size:
            v0 = None
        theta, v, hvps = F.top_hessian_eigenpair(hvp, size, dtype=dtype, device=device, v0=v0,
                                                 max_iter=self.max_iter, tol=self.tol, seed=self.seed + key)
        self._v[key] = v.detach()
        return theta, hvps

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "v": self._v}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._v = dict(state_dict.get("v") or {})
