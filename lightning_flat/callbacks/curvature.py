"""Curvature callbacks: the Hessian trace and the sharpness of the training loss, through a curvature source.

Each callback is a thin shell: it asks [`curvature_source`][lightning_flat.curvature.curvature_source] for the module's
source (closed forms on the lightning_flat models, Hessian-vector products of ``loss_fn`` on any other LightningModule),
reads it through ``lightning_flat.functional`` and logs. It never asks which kind of module it has.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import Tensor

from lightning_flat import functional as F
from lightning_flat._checks import check_bool, check_choice, check_positive_int, check_real
from lightning_flat.callbacks.base import MeasuringCallback
from lightning_flat.curvature import CurvatureOptions, CurvatureSource, curvature_source
from lightning_flat.engine.hooks import scheduled_hparams

__all__ = ["CurvatureCallback", "HessianTrace", "Sharpness", "two_over_lr"]


def two_over_lr(trainer: L.Trainer) -> Any:
    """``2 / lr`` for the step about to run (the stability threshold of its update): the scheduled value
    ([`HyperparameterSchedule`][lightning_flat.callbacks.HyperparameterSchedule]) or the first param group's, per
    replica when the learning rate is."""
    lr = scheduled_hparams(trainer, trainer.global_step).get("lr", trainer.optimizers[0].param_groups[0]["lr"])
    if isinstance(lr, list):
        lr = torch.tensor(lr, dtype=torch.float64)
    if isinstance(lr, Tensor):
        return 2.0 / lr.detach().to(torch.float64).reshape(-1)
    return 2.0 / lr if lr > 0 else float("inf")


class CurvatureCallback(MeasuringCallback):
    """Shared shell of the curvature callbacks: the source, its kept batches and its state; measurements happen in
    ``measure(trainer, source)`` inside the source's read context.

    Args:
        every_n_steps: measuring period in optimizer steps.
        loss_fn: on modules other than the lightning_flat models, ``loss_fn(pl_module, batch) -> scalar``; default
            ``training_step(batch, 0)`` (its ``"loss"`` entry if it returns a dict) with logging silenced.
        batch: on other modules, the curvature batch; default the first training batch (kept, saved in the state).
        options: [`CurvatureOptions`][lightning_flat.curvature.CurvatureOptions] (kept batches, eval mode, Gauss-Newton,
            the data of a lightning_flat model, the probes' seed).

    Raises:
        TypeError: ``loss_fn`` not callable, ``options`` not a ``CurvatureOptions``.
        ValueError: at setup, an option that does not apply to the module (see
            [`curvature_source`][lightning_flat.curvature.curvature_source]), or a module the read cannot differentiate.
    """

    def __init__(self, every_n_steps: int = 100, loss_fn: Callable[[L.LightningModule, Any], Tensor] | None = None,
                 batch: Any = None, options: CurvatureOptions | None = None) -> None:
        super().__init__(every_n_steps)
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable as loss_fn(pl_module, batch), got {loss_fn!r}")
        if options is not None and not isinstance(options, CurvatureOptions):
            raise TypeError(f"options must be a lightning_flat.curvature.CurvatureOptions, got {options!r}")
        self.loss_fn, self.batch = loss_fn, batch
        self.options = options or CurvatureOptions()
        self.source: CurvatureSource | None = None
        self._source_state: dict[str, Any] = {}

    def config(self) -> dict[str, Any]:
        return {**super().config(), "loss_fn": self.loss_fn, "batch": None if self.batch is None else "given",
                **self.options.key()}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.source = curvature_source(pl_module, self.options, self.loss_fn, self.batch, type(self).__name__)
        self.source.setup(trainer)
        self.source.load_state_dict(self._source_state)

    def ready(self) -> bool:
        return self.source is not None and self.source.ready()

    def observe(self, trainer: L.Trainer, batch: Any) -> bool:
        return self.source is not None and self.source.observe(trainer, batch)

    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        with self.source.read(trainer) as source:
            out = self.read(trainer, source)
        if source.matrix == "ggn":
            out = {("ggn/" + k[len("hessian/"):] if k.startswith("hessian/") else k): v for k, v in out.items()}
        return out

    def read(self, trainer: L.Trainer, source: CurvatureSource) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def probe_seed(self, trainer: L.Trainer) -> int:
        """The seed of this read's probes (fresh at every read, the same on every rank and after a resume)."""
        return self.options.probe_seed(trainer.global_step)

    def state_dict(self) -> dict[str, Any]:
        source = self.source.state_dict() if self.source is not None else self._source_state
        return {**super().state_dict(), "source": source}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._source_state = dict(state_dict.get("source") or {})
        if self.source is not None:
            self.source.load_state_dict(self._source_state)


class HessianTrace(CurvatureCallback):
    r"""Log the trace of the Hessian of the training loss every ``every_n_steps``.

    On the lightning_flat models the value is exact:
    [`lightning_flat.functional.hessian_trace`][lightning_flat.functional.hessian_trace], the closed form
    $\frac2n\sum_j\mathrm{curvature}(P_j^\top P_j, S_jS_j^\top)$ of the full measurement loss (no label noise, no
    ridge), per replica. On any other LightningModule it is a Hutch++ estimate (hessian-eigenthings) with
    ``num_matvecs`` Hessian-vector products of ``loss_fn`` on the kept batch (exact once ``num_matvecs`` reaches about
    3x the parameter count). ``per_layer=True`` also logs the trace of each diagonal block.

    Logged keys: ``hessian/trace``; ``hessian/trace/layer{j}`` with ``per_layer`` (a factor of a lightning_flat model,
    the ``j``-th parameter tensor elsewhere; they sum to the trace); on Hutch++ also ``hessian/trace_stderr`` (the
    standard error of its residual Hutchinson part). Supported modules: every LightningModule.

    Args:
        every_n_steps: measuring period in optimizer steps.
        num_matvecs: the Hutch++ budget (modules other than the lightning_flat models), at least 6.
        per_layer: also log the layer traces.
        loss_fn: see [`CurvatureCallback`][lightning_flat.callbacks.CurvatureCallback].
        batch: see [`CurvatureCallback`][lightning_flat.callbacks.CurvatureCallback].
        options: see [`CurvatureCallback`][lightning_flat.callbacks.CurvatureCallback].

    Raises:
        ValueError: ``every_n_steps`` or ``num_matvecs`` out of range; see
            [`CurvatureCallback`][lightning_flat.callbacks.CurvatureCallback].
        TypeError: ``per_layer`` not a bool; see [`CurvatureCallback`][lightning_flat.callbacks.CurvatureCallback].
    """

    def __init__(self, every_n_steps: int = 100, num_matvecs: int = 99, per_layer: bool = False,
                 loss_fn: Callable | None = None, batch: Any = None, options: CurvatureOptions | None = None) -> None:
        super().__init__(every_n_steps, loss_fn, batch, options)
        self.per_layer = check_bool("per_layer", per_layer)
        self.num_matvecs = check_positive_int("num_matvecs", num_matvecs)
        if self.num_matvecs < 6:  # Hutch++: a third for the sketch, a third for its range, a third (>= 2) residual
            raise ValueError(f"num_matvecs must be >= 6 (Hutch++ needs at least 2 residual probes for a standard "
                             f"error), got {num_matvecs}")

    def config(self) -> dict[str, Any]:
        return {**super().config(), "num_matvecs": self.num_matvecs, "per_layer": self.per_layer}

    def read(self, trainer: L.Trainer, source: CurvatureSource) -> dict[str, Any]:
        seed = self.probe_seed(trainer)
        value, stderr = source.trace(self.num_matvecs, seed)
        out = {"hessian/trace": value}
        if stderr is not None:
            out["hessian/trace_stderr"] = stderr
        if self.per_layer:
            values, _ = source.layer_traces(self.num_matvecs, seed)
            out.update({f"hessian/trace/{key}": v for key, v in values.items()})
        return out


class Sharpness(CurvatureCallback):
    r"""Log the sharpness (the largest algebraic eigenvalue of the Hessian of the training loss, residual term
    included) every ``every_n_steps``.

    Exact (``eigvalsh`` of the dense Hessian) where the source builds it cheaply (``method="auto"``: on the
    lightning_flat models up to `lightning_flat.functional.EXACT_MAX_PARAMS` parameters per run, every
    replica's Hessian in one batched computation), or with ``method="exact"``; otherwise Lanczos over Hessian-vector
    products with an error bound, warm-started from the previous read's vector
    ([`lightning_flat.functional.top_hessian_eigenpair`][lightning_flat.functional.top_hessian_eigenpair]), so a read
    during training costs a few products. ``top_k > 1`` also logs the ``top_k`` largest eigenvalues of the first active
    run (exact, or LOBPCG to ``tol`` warm-started by the previous read's block). ``per_layer=True`` logs the top
    eigenvalue of each diagonal block. ``edge_of_stability=True`` also logs ``hessian/two_over_lr``, $2/\eta$ for the
    step about to run (`two_over_lr`): gradient descent cannot settle where the sharpness exceeds it, and at the edge of
    stability the sharpness hovers around it (read it as a median over 20 or more consecutive measurements).

    Logged keys: ``hessian/sharpness``; ``hessian/sharpness_hvps`` (Hessian-vector products of the read, Lanczos
    only); ``hessian/eigenvalue_{i}`` for ``i < top_k`` (and ``hessian/eigenvalue_hvps`` by LOBPCG);
    ``hessian/sharpness/layer{j}``; ``hessian/two_over_lr``. With replicas each has its own Hessian, Lanczos run and
    warm start; diverged replicas are not measured. Supported modules: every LightningModule. See also
    [`EigenvaluesAbove`][lightning_flat.callbacks.EigenvaluesAbove],
    [`PreconditionedSharpness`][lightning_flat.callbacks.PreconditionedSharpness].

    Args:
        every_n_steps: measuring period in optimizer steps.
        top_k: how many of the largest eigenvalues to log (1: the sharpness only).
        tol: relative accuracy of the eigenvalues (Lanczos error bound, LOBPCG residual).
        method: ``"auto"``, ``"exact"`` or ``"lanczos"``.
        per_layer: also log each diagonal block's top eigenvalue.
        edge_of_stability: also log ``2/lr``.
        loss_fn: see [`CurvatureCallback`][lightning_flat.callbacks.CurvatureCallback].
        batch: see [`CurvatureCallback`][lightning_flat.callbacks.CurvatureCallback].
        options: see [`CurvatureCallback`][lightning_flat.callbacks.CurvatureCallback].

    Raises:
        ValueError: ``every_n_steps``/``top_k`` not positive ints, ``tol`` not positive, ``method`` unknown; see
            [`CurvatureCallback`][lightning_flat.callbacks.CurvatureCallback].
        TypeError: ``per_layer``/``edge_of_stability`` not bools; see
            [`CurvatureCallback`][lightning_flat.callbacks.CurvatureCallback].
    """

    def __init__(self, every_n_steps: int = 100, top_k: int = 1, tol: float = 1e-8, method: str = "auto",
                 per_layer: bool = False, edge_of_stability: bool = False, loss_fn: Callable | None = None,
                 batch: Any = None, options: CurvatureOptions | None = None) -> None:
        super().__init__(every_n_steps, loss_fn, batch, options)
        self.top_k = check_positive_int("top_k", top_k)
        self.tol = check_real("tol", tol, low=0.0, low_open=True)
        self.method = check_choice("method", method, ("auto", "exact", "lanczos"))
        self.per_layer = check_bool("per_layer", per_layer)
        self.edge_of_stability = check_bool("edge_of_stability", edge_of_stability)
        self._v: dict[Any, Tensor] = {}  # warm-start vectors: per replica, per (replica, block), "top_k"

    def config(self) -> dict[str, Any]:
        return {**super().config(), "top_k": self.top_k, "tol": self.tol, "method": self.method,
                "per_layer": self.per_layer, "edge_of_stability": self.edge_of_stability}

    def _lanczos(self, op: Any, key: Any, seed: int) -> tuple[float, int]:
        v0 = self._v.get(key)
        theta, v, hvps = F.top_hessian_eigenpair(op.matvec, op.size, dtype=op.dtype, device=op.device,
                                                 v0=v0 if v0 is not None and v0.numel() == op.size else None,
                                                 tol=self.tol, seed=seed)
        self._v[key] = v.detach()
        return float(theta), hvps

    def _per_replica(self, values: list[float]) -> Any:
        return values[0] if len(values) == 1 else torch.tensor(values, dtype=torch.float64)

    def read(self, trainer: L.Trainer, source: CurvatureSource) -> dict[str, Any]:
        out: dict[str, Any] = {}
        R = source.replicas.count
        exact = self.method == "exact" or (self.method == "auto" and source.size() <= source.exact_max_params)
        first = source.replicas.first_active()
        if exact:
            H = source.hessians()
            top = F.dense_top_eigenvalues(H, self.top_k)  # (..., k)
            out["hessian/sharpness"] = top[..., 0]
            if self.top_k > 1 and first is not None:
                row = top[first] if R > 1 else top
                out.update({f"hessian/eigenvalue_{i}": float(v) for i, v in enumerate(row)})
        else:
            thetas, counts = [], []
            for r, op in enumerate(source.operators()):
                theta, hvps = (float("nan"), 0) if op is None else self._lanczos(op, r, self.options.seed + r)
                thetas.append(theta)
                counts.append(hvps)
            out["hessian/sharpness"] = self._per_replica(thetas)
            out["hessian/sharpness_hvps"] = self._per_replica([float(c) for c in counts])
            if self.top_k > 1 and first is not None:
                op = source.operators()[first]
                X0 = self._v.get("top_k")
                theta, X, hvps = F.top_eigenpairs(op.matmat, op.size, self.top_k, dtype=op.dtype, device=op.device,
                                                  X0=X0, tol=self.tol, seed=self.probe_seed(trainer), blocks=True)
                self._v["top_k"] = X.detach()
                out.update({f"hessian/eigenvalue_{i}": float(v) for i, v in enumerate(theta)})
                out["hessian/eigenvalue_hvps"] = float(hvps)
        if self.per_layer:
            rows = [{key: self._lanczos(op, (r, key), self.options.seed)[0] for key, op in source.blocks(r)}
                    if bool(source.replicas.active[r]) else None for r in range(R)]
            keys = next((list(row) for row in rows if row), [])
            out.update({f"hessian/sharpness/{key}": self._per_replica([row[key] if row else float("nan")
                                                                       for row in rows]) for key in keys})
        if self.edge_of_stability:
            out["hessian/two_over_lr"] = two_over_lr(trainer)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "v": self._v}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._v = dict(state_dict.get("v") or {})
