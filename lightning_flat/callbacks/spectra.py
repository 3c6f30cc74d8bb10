"""Spectra beyond the top eigenvalue: the eigenvalue density, every eigenvalue above a level, and the sharpness an
adaptive optimizer sees. Thin shells over ``lightning_flat.functional`` and a curvature source, like
`lightning_flat.callbacks.curvature`."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import Tensor

from lightning_flat import functional as F
from lightning_flat._checks import check_choice, check_positive_int, check_real
from lightning_flat.callbacks.curvature import CurvatureCallback, two_over_lr
from lightning_flat.curvature import CurvatureOptions, CurvatureSource

__all__ = ["SpectralDensity", "EigenvaluesAbove", "PreconditionedSharpness"]


class SpectralDensity(CurvatureCallback):
    r"""The eigenvalue density of the Hessian of the training loss every ``every_n_steps`` (of the first active
    replica on a model with replicas).

    Exact where the read can afford it ([`exact`][lightning_flat.callbacks.SpectralDensity.exact]; ``method="exact"``
    always): the eigenvalues of the dense Hessian, each with weight ``1/p``. Otherwise stochastic Lanczos quadrature
    (``"slq"``, [`lightning_flat.functional.slq`][lightning_flat.functional.slq], the probes of hessian-eigenthings'
    ``spectral_density``, all advancing together in block products): ``num_probes`` Rademacher probes, ``lanczos_steps``
    Lanczos steps each; the nodes are the Ritz values of every probe and the weights the squared first components of
    their eigenvectors divided by ``num_probes``, so that
    $\sum_k w_k\theta_k^j \approx \operatorname{tr}(H^j)/p$ (exactly in expectation for ``j`` below
    ``2 * lanczos_steps``).

    Kept in ``densities``: a list of ``(step, nodes, weights)`` (CPU float64 tensors); a wandb logger also gets the
    density as a histogram, ``spectrum/density``. Logged keys
    ([`lightning_flat.functional.density_moments`][lightning_flat.functional.density_moments]): ``spectrum/max``,
    ``spectrum/min``, ``spectrum/mean`` ($\operatorname{tr}H/p$), ``spectrum/second_moment`` ($\operatorname{tr}H^2/p$),
    ``spectrum/negative_mass``. [`lightning_flat.plotting.density_heatmap`][lightning_flat.plotting.density_heatmap]
    draws the densities over training. Supported modules: every LightningModule.

    Args:
        every_n_steps: measuring period in optimizer steps.
        method: ``"auto"``, ``"exact"`` or ``"slq"``.
        num_probes: SLQ probes.
        lanczos_steps: Lanczos steps per probe.
        exact_max_params: the largest parameter count measured exactly by ``"auto"``.
        loss_fn: see [`CurvatureCallback`][lightning_flat.callbacks.CurvatureCallback].
        batch: see [`CurvatureCallback`][lightning_flat.callbacks.CurvatureCallback].
        options: see [`CurvatureCallback`][lightning_flat.callbacks.CurvatureCallback].

    Raises:
        ValueError: a count that is not a positive int, an unknown ``method``.
    """

    def __init__(self, every_n_steps: int = 100, method: str = "auto", num_probes: int = 10, lanczos_steps: int = 80,
                 exact_max_params: int = 1024, loss_fn: Callable | None = None, batch: Any = None,
                 options: CurvatureOptions | None = None) -> None:
        super().__init__(every_n_steps, loss_fn, batch, options)
        self.method = check_choice("method", method, ("auto", "exact", "slq"))
        self.num_probes = check_positive_int("num_probes", num_probes)
        self.lanczos_steps = check_positive_int("lanczos_steps", lanczos_steps)
        self.exact_max_params = check_positive_int("exact_max_params", exact_max_params)
        self.densities: list[tuple[int, Tensor, Tensor]] = []

    def config(self) -> dict[str, Any]:
        return {**super().config(), "method": self.method, "num_probes": self.num_probes,
                "lanczos_steps": self.lanczos_steps, "exact_max_params": self.exact_max_params}

    def exact(self, source: CurvatureSource, size: int) -> bool:
        """Whether a read takes the exact density: ``method="exact"``, or ``"auto"`` with at most
        ``exact_max_params`` parameters and, where the dense Hessian costs one product per parameter (modules other
        than the lightning_flat models), no more products than stochastic Lanczos quadrature
        (``num_probes * lanczos_steps``)."""
        if self.method != "auto":
            return self.method == "exact"
        budget = self.exact_max_params if size <= source.exact_max_params else \
            min(self.exact_max_params, self.num_probes * self.lanczos_steps)
        return size <= budget

    def read(self, trainer: L.Trainer, source: CurvatureSource) -> dict[str, Any]:
        first = source.replicas.first_active()
        if first is None:
            return {}
        op = source.operators()[first]
        if self.exact(source, op.size):
            nodes, weights = F.exact_density(op.dense())
        else:
            nodes, weights = F.slq(op.matmat, op.size, self.num_probes, self.lanczos_steps, dtype=op.dtype,
                                   device=op.device, seed=self.probe_seed(trainer))
        nodes, weights = nodes.detach().to("cpu", torch.float64), weights.detach().to("cpu", torch.float64)
        if nodes.numel() == 0 or not bool(torch.isfinite(nodes).all()):
            return {}
        self.densities.append((trainer.global_step, nodes, weights))
        self._log_histogram(trainer, nodes, weights)
        return {f"spectrum/{k}": v for k, v in F.density_moments(nodes, weights).items()}

    @staticmethod
    def _log_histogram(trainer: L.Trainer, nodes: Tensor, weights: Tensor, bins: int = 64) -> None:
        """The density as a wandb histogram (``spectrum/density``) for each WandbLogger of the trainer."""
        from lightning.pytorch.loggers import WandbLogger

        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not loggers or not trainer.is_global_zero:
            return
        import numpy as np
        import wandb

        counts, edges = np.histogram(nodes.numpy(), bins=bins, weights=weights.numpy())
        for logger in loggers:
            logger.log_metrics({"spectrum/density": wandb.Histogram(np_histogram=(counts, edges))},
                               step=trainer.global_step)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "densities": self.densities}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.densities = list(state_dict.get("densities") or [])


def _parse_level(value: float | str) -> tuple[str, float]:
    """``threshold``: a number, or ``"2/lr"`` / ``"c*2/lr"`` (a multiple of 2/lr, read at every measurement)."""
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(?:([0-9.eE+-]+)\s*\*\s*)?2\s*/\s*lr\s*", value)
        if m is None:
            raise ValueError(f"threshold must be a number, '2/lr' or 'c*2/lr' (e.g. '0.9*2/lr'), got {value!r}")
        return "two_over_lr", float(m.group(1)) if m.group(1) else 1.0
    return "value", check_real("threshold", value)


class EigenvaluesAbove(CurvatureCallback):
    r"""Every Hessian eigenvalue above a threshold, every ``every_n_steps`` (of the first active replica on a model
    with replicas): LOBPCG warm-started from the previous read's vectors, its block grown until a converged eigenvalue
    falls below the threshold
    ([`lightning_flat.functional.eigenvalues_above`][lightning_flat.functional.eigenvalues_above]).

    ``threshold``: a number, ``"2/lr"`` or ``"c*2/lr"`` (the smallest over replicas of $2/\eta$ for the step
    about to run, times ``c``): the directions in which gradient descent is unstable. Kept in ``tracked`` as
    ``(step, [values])``; logged keys: ``hessian/above/count``, ``hessian/above/{i}`` (the first 10, decreasing),
    ``hessian/above/threshold`` and ``hessian/above/hvps``. Supported modules: every LightningModule.

    Args:
        threshold: see above.
        every_n_steps: measuring period in optimizer steps.
        tol: accuracy of the eigenvalues.
        loss_fn: see [`CurvatureCallback`][lightning_flat.callbacks.CurvatureCallback].
        batch: see [`CurvatureCallback`][lightning_flat.callbacks.CurvatureCallback].
        options: see [`CurvatureCallback`][lightning_flat.callbacks.CurvatureCallback].

    Raises:
        ValueError: a ``threshold`` that is neither a number nor a multiple of ``2/lr``; ``tol`` not positive.
    """

    def __init__(self, threshold: float | str, every_n_steps: int = 100, tol: float = 1e-8,
                 loss_fn: Callable | None = None, batch: Any = None, options: CurvatureOptions | None = None) -> None:
        super().__init__(every_n_steps, loss_fn, batch, options)
        self.threshold = threshold
        self._level = _parse_level(threshold)
        self.tol = check_real("tol", tol, low=0.0, low_open=True)
        self.tracked: list[tuple[int, list[float]]] = []
        self._x: Tensor | None = None

    def config(self) -> dict[str, Any]:
        return {**super().config(), "threshold": self.threshold, "tol": self.tol}

    def level(self, trainer: L.Trainer) -> float:
        """The threshold at this step."""
        kind, c = self._level
        if kind == "value":
            return c
        two = two_over_lr(trainer)
        return c * (float(two.min()) if isinstance(two, Tensor) else float(two))

    def read(self, trainer: L.Trainer, source: CurvatureSource) -> dict[str, Any]:
        first = source.replicas.first_active()
        if first is None:
            return {}
        level = self.level(trainer)
        op = source.operators()[first]
        values, self._x, hvps = F.eigenvalues_above(op.matmat, op.size, level, dtype=op.dtype, device=op.device,
                                                    X0=self._x, tol=self.tol, seed=self.options.seed, blocks=True)
        self.tracked.append((trainer.global_step, values))
        out: dict[str, Any] = {"hessian/above/count": float(len(values)), "hessian/above/threshold": level,
                               "hessian/above/hvps": float(hvps)}
        out.update({f"hessian/above/{i}": v for i, v in enumerate(values[:10])})
        return out

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "tracked": self.tracked, "x": self._x}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.tracked = list(state_dict.get("tracked") or [])
        self._x = state_dict.get("x")


class PreconditionedSharpness(CurvatureCallback):
    r"""The top eigenvalue of $P^{-1/2}HP^{-1/2}$, the curvature an adaptive optimizer's step sees, every
    ``every_n_steps``: $P = \sqrt{\hat v} + \epsilon$ from Adam/AdamW's bias-corrected ``exp_avg_sq``
    (RMSprop: ``square_avg``), over the parameters the loss uses
    ([`lightning_flat.functional.preconditioned_operator`][lightning_flat.functional.preconditioned_operator], then
    warm-started Lanczos). NaN before the optimizer's first step (no second moments yet).

    Logged key: ``hessian/preconditioned_sharpness``. Supported modules: those trained with ``torch.optim.Adam``,
    ``AdamW`` or ``RMSprop`` (refused at the start of fitting otherwise, e.g. on the lightning_flat models, which
    train with SGD).

    Args:
        every_n_steps: measuring period in optimizer steps.
        tol: relative accuracy of the eigenvalue.
        loss_fn: see [`CurvatureCallback`][lightning_flat.callbacks.CurvatureCallback].
        batch: see [`CurvatureCallback`][lightning_flat.callbacks.CurvatureCallback].
        options: see [`CurvatureCallback`][lightning_flat.callbacks.CurvatureCallback].

    Raises:
        ValueError: ``tol`` not positive; at the start of fitting, an optimizer without second moments.
    """

    def __init__(self, every_n_steps: int = 100, tol: float = 1e-8, loss_fn: Callable | None = None,
                 batch: Any = None, options: CurvatureOptions | None = None) -> None:
        super().__init__(every_n_steps, loss_fn, batch, options)
        self.tol = check_real("tol", tol, low=0.0, low_open=True)
        self._v: Tensor | None = None

    def config(self) -> dict[str, Any]:
        return {**super().config(), "tol": self.tol}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        opt = trainer.optimizers[0] if trainer.optimizers else None
        if not isinstance(opt, (torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop)):
            raise ValueError(f"PreconditionedSharpness needs an adaptive optimizer's second moments (Adam, AdamW, "
                             f"RMSprop); {type(pl_module).__name__} trains with {type(opt).__name__}")

    def read(self, trainer: L.Trainer, source: CurvatureSource) -> dict[str, Any]:
        opt = trainer.optimizers[0]
        op = source.operators()[0]
        scales = []
        for _, p in source.parameters():
            state = opt.state.get(p, {})
            group = next(g for g in opt.param_groups if any(q is p for q in g["params"]))
            if "exp_avg_sq" in state:
                v = state["exp_avg_sq"] / (1 - group["betas"][1] ** float(state["step"]))
            elif "square_avg" in state:
                v = state["square_avg"]
            else:
                return {"hessian/preconditioned_sharpness": float("nan")}
            scales.append((v.sqrt() + group["eps"]).rsqrt().reshape(-1))
        s = torch.cat(scales).to(op.dtype)
        theta, v, _ = F.top_hessian_eigenpair(F.preconditioned_operator(op.matvec, s), op.size, dtype=op.dtype,
                                              device=op.device, v0=self._v, tol=self.tol, seed=self.options.seed)
        self._v = v.detach()
        return {"hessian/preconditioned_sharpness": float(theta)}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "v": self._v}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._v = state_dict.get("v")
