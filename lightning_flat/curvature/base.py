"""The declared interface between the curvature callbacks and the modules they measure.

A [`CurvatureSource`][lightning_flat.curvature.CurvatureSource] gives the curvature of a module's training loss (the
Hessian, or the generalized Gauss-Newton matrix where asked) as values a callback can read without knowing the
module's kind:

- ``trace()`` and ``layer_traces()``: exact where a closed form exists, Hutch++ estimates otherwise;
- ``operators()``: one [`Operator`][lightning_flat.curvature.Operator] per active run (``v -> H v`` on the flattened
  coordinates, with block products ``V -> H V``), ``hessians()`` the dense matrices where they are small, ``blocks(r)``
  the diagonal blocks of one run (one per layer: a factor of the lightning_flat models, a parameter tensor elsewhere);
- ``read(trainer)``: a context in which a read leaves no trace in the module or its training.

Two implementations: [`ClosedFormSource`][lightning_flat.curvature.closed_form.ClosedFormSource] on the lightning_flat
models (their closed forms and ``torch.func`` products, every replica at once where it can) and
[`ModuleSource`][lightning_flat.curvature.generic.ModuleSource] on any other LightningModule (Hessian-vector products of
``loss_fn(module, batch)`` on kept batches). [`curvature_source`][lightning_flat.curvature.curvature_source] picks one;
it is the only place that asks which kind of module it has.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from hessian_eigenthings import CurvatureOperator
from torch import Tensor

from lightning_flat._checks import check_bool, check_positive_int
from lightning_flat.engine.replicas import Replicas
from lightning_flat.measurements import Measurements

__all__ = ["CurvatureOptions", "Operator", "CurvatureSource", "LayerTraces"]


@dataclass(frozen=True)
class CurvatureOptions:
    r"""Where a curvature read's data comes from and what it reads, beyond the callbacks' ``loss_fn`` and ``batch``.

    Args:
        batches: on modules other than the lightning_flat models, the curvature of the mean loss over the first
            ``batches`` training batches (reads start once they are kept).
        eval_mode: on other modules, measure in eval mode (dropout off, batch norm on its running statistics); the
            train/eval flags are restored afterwards.
        gauss_newton: on other modules, ``(forward_fn(module, batch) -> output, loss_of_output_fn(output, batch) ->
            scalar)``: the generalized Gauss-Newton matrix $J^\top H_{loss} J$ instead of the Hessian (keys
            ``ggn/...``); ``forward_fn`` must call ``module(...)``.
        measurements: on the lightning_flat models, the training measurements (default: the datamodule's).
        targets: with ``measurements``, their targets.
        seed: base seed of the reads' random probes (Hutch++, Lanczos and LOBPCG starts, stochastic Lanczos
            quadrature): fresh probes at every read, keyed by the step, the same on every rank and after a resume.

    Raises:
        ValueError: ``batches`` not a positive int; ``measurements`` without ``targets`` or the reverse, or
            ``targets`` whose length is not the number of measurements.
        TypeError: ``eval_mode`` not a bool, ``gauss_newton`` not a pair of callables, ``measurements`` not a
            [`Measurements`][lightning_flat.measurements.Measurements].
    """

    batches: int = 1
    eval_mode: bool = True
    gauss_newton: tuple[Callable, Callable] | None = None
    measurements: Measurements | None = None
    targets: Tensor | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        check_positive_int("batches", self.batches)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {self.seed!r}")
        check_bool("eval_mode", self.eval_mode)
        gn = self.gauss_newton
        if gn is not None and (not isinstance(gn, (tuple, list)) or len(gn) != 2 or not all(callable(f) for f in gn)):
            raise TypeError("gauss_newton must be a pair (forward_fn(module, batch) -> output, "
                            f"loss_of_output_fn(output, batch) -> scalar), got {gn!r}")
        if gn is not None:
            object.__setattr__(self, "gauss_newton", tuple(gn))
        if self.measurements is not None and not isinstance(self.measurements, Measurements):
            raise TypeError(f"measurements must be a lightning_flat Measurements, got "
                            f"{type(self.measurements).__name__}")
        if (self.measurements is None) != (self.targets is None):
            raise ValueError("measurements and targets must be given together")
        if self.targets is not None and (not isinstance(self.targets, Tensor) or
                                         tuple(self.targets.shape) != (len(self.measurements),)):
            raise ValueError(f"targets must have one value per measurement: {len(self.measurements)} measurements, "
                             f"got targets of shape {tuple(getattr(self.targets, 'shape', ()))}")

    def key(self) -> dict[str, Any]:
        """The options as plain values, for a callback's state key."""
        gn = None if self.gauss_newton is None else [_name(f) for f in self.gauss_newton]
        return {"batches": self.batches, "eval_mode": self.eval_mode, "gauss_newton": gn,
                "measurements": None if self.measurements is None else repr(self.measurements), "seed": self.seed}

    def probe_seed(self, step: int) -> int:
        """The seed of a read's probes at global step ``step``."""
        from lightning_flat.engine.replicas import step_seed

        return step_seed(self.seed, 0x7C5, step) % (2**31)


def _name(f: Any) -> str:
    return getattr(f, "__qualname__", None) or repr(f)


class Operator(CurvatureOperator):
    """A symmetric operator on flat vectors of length ``size`` (a hessian-eigenthings ``CurvatureOperator``, so its
    algorithms take it), with block products: ``matmat(V)`` for ``V (size, k)`` (column by column unless the source
    batches them)."""

    def __init__(self, matvec: Callable[[Tensor], Tensor], size: int, dtype: torch.dtype, device: torch.device,
                 matmat: Callable[[Tensor], Tensor] | None = None) -> None:
        self._matvec, self._matmat = matvec, matmat
        self._size, self._dtype, self._device = int(size), dtype, torch.device(device)

    @property
    def size(self) -> int:
        return self._size

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    def matvec(self, v: Tensor) -> Tensor:
        return self._matvec(v.to(dtype=self._dtype, device=self._device).reshape(-1))

    def matmat(self, V: Tensor) -> Tensor:
        V = V.to(dtype=self._dtype, device=self._device)
        if self._matmat is not None:
            return self._matmat(V)
        return torch.stack([self._matvec(V[:, j]) for j in range(V.shape[1])], dim=1)

    def dense(self) -> Tensor:
        """The operator as a dense symmetric matrix (``size`` products: small operators only)."""
        H = self.matmat(torch.eye(self._size, dtype=self._dtype, device=self._device))
        return 0.5 * (H + H.T)


#: ``{key: per-replica values}`` of the layer traces (keys ``layer{j}``, ``j = 1..``), and the estimates'
#: standard errors (empty where exact).
LayerTraces = tuple[dict[str, Any], dict[str, Any]]


class CurvatureSource(ABC):
    """The curvature of one module's training loss (see the module docstring). ``replicas`` are the module's runs
    (one run for a module that is not a lightning_flat model); per-replica values have shape ``(R,)`` when
    ``replicas.count > 1``, else they are scalars; a frozen replica's entries are NaN."""

    replicas: Replicas
    #: ``"hessian"`` or ``"ggn"``: what the operators multiply by (the logged keys' group).
    matrix: str = "hessian"
    #: Whether ``trace()`` is exact (a closed form) rather than an estimate.
    exact_trace: bool = False
    #: Up to how many coordinates per run ``hessians()`` is cheap enough to replace an iterative eigen-solver by
    #: default (0: dense matrices are built only when asked, e.g. ``Sharpness(method="exact")``).
    exact_max_params: int = 0

    @abstractmethod
    def ready(self) -> bool:
        """Whether a read can happen now (e.g. the batches to read on are kept)."""

    def setup(self, trainer: Any) -> None:
        """Refuse, at setup, what a read of this module cannot do."""

    def observe(self, trainer: Any, batch: Any) -> bool:
        """Look at a training batch before its step (e.g. keep it); True when the source became ready with it."""
        return False

    @contextmanager
    def read(self, trainer: Any) -> Iterator[CurvatureSource]:
        """The context of one read: everything it changes in the module is restored afterwards."""
        yield self

    @abstractmethod
    def size(self) -> int:
        """Coordinates of one run's operator."""

    @abstractmethod
    def operators(self) -> list[Operator | None]:
        """One operator per run (``None`` for a frozen replica)."""

    @abstractmethod
    def hessians(self) -> Tensor:
        """The dense matrices, ``(R, p, p)`` or ``(p, p)`` for one run (small operators only; frozen replicas'
        entries are not meaningful)."""

    @abstractmethod
    def trace(self, num_matvecs: int, seed: int) -> tuple[Any, Any]:
        """``(trace, standard error)`` per replica (standard error ``None`` where exact)."""

    @abstractmethod
    def blocks(self, r: int) -> list[tuple[str, Operator]]:
        """The diagonal blocks of run ``r``'s operator, as ``(layer{j}, operator)`` in module order."""

    @abstractmethod
    def layer_traces(self, num_matvecs: int, seed: int) -> LayerTraces:
        """The trace of every diagonal block, per replica (they sum to the trace)."""

    def layer_names(self) -> dict[str, str]:
        """``{layer{j}: what it is}`` (a factor of a lightning_flat model, a parameter name elsewhere)."""
        return {}

    def parameters(self) -> list[tuple[str, Tensor]]:
        """The tensors whose coordinates the operators act on, in order, as ``(name, tensor)``."""
        return []

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs (kept batches)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore [`state_dict`][lightning_flat.curvature.CurvatureSource.state_dict]."""
