r"""The curvature source of the lightning_flat models: closed forms and ``torch.func`` products, every replica at once
where it can.

The loss is the full measurement loss $\frac1n\sum_i(\langle A_i, E\rangle - b_i)^2$ on the training data
(the datamodule's, or the measurements and targets given in the options), without label noise or ridge, in the
trained factors. The trace and the layer traces are the models' exact closed forms; the operators are
forward-over-reverse Hessian-vector products of that loss, one per active replica; the dense Hessians of all
replicas come from one batched computation. Half-precision weights are measured in float32.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from lightning_flat import functional as F
from lightning_flat.curvature.base import CurvatureOptions, CurvatureSource, LayerTraces, Operator
from lightning_flat.engine.interfaces import MeasurementProblem
from lightning_flat.engine.replicas import Replicas
from lightning_flat.measurements import Measurements

__all__ = ["ClosedFormCurvature", "ClosedFormSource"]

_HALF = (torch.float16, torch.bfloat16)


@runtime_checkable
class ClosedFormCurvature(Protocol):
    """What a module offers for exact curvature (the lightning_flat models): its runs, its trained factors, the map
    from one run's factors to ``E``, and the exact Hessian trace and its layer terms (``None`` where the model has no
    per-factor closed form)."""

    replicas: Replicas

    def weights(self) -> list[Tensor]: ...

    def replica_end_to_end(self, replica: int | None = None) -> Any: ...

    def hessian_trace(self, measurements: Measurements, targets: Tensor | None = None) -> Tensor: ...

    def hessian_trace_terms(self, measurements: Measurements, targets: Tensor | None = None) -> Tensor | None: ...


class ClosedFormSource(CurvatureSource):
    """[`CurvatureSource`][lightning_flat.curvature.base.CurvatureSource] of a lightning_flat model (see the module
    docstring)."""

    exact_trace = True
    exact_max_params = F.EXACT_MAX_PARAMS  # every replica's dense Hessian in one batched torch.func computation

    def __init__(self, module: ClosedFormCurvature, options: CurvatureOptions) -> None:
        self.module = module
        self.replicas = module.replicas
        self.options = options
        self._data: tuple[Measurements, Tensor] | None = None

    def ready(self) -> bool:
        return True

    @contextmanager
    def read(self, trainer: Any) -> Iterator[ClosedFormSource]:
        module = self.module
        dtype = next(w.dtype for w in module.weights())
        dtype = torch.float32 if dtype in _HALF else dtype
        device = module.weights()[0].device
        if self.options.measurements is not None:
            data = (self.options.measurements.to(device=device, dtype=dtype),
                    self.options.targets.to(device=device, dtype=dtype))
        elif isinstance(trainer.datamodule, MeasurementProblem):
            data = trainer.datamodule.measurements_as(dtype, device)
        else:
            raise ValueError("measuring the curvature of a lightning_flat model needs its training measurements: fit "
                             "with a lightning_flat datamodule or pass CurvatureOptions(measurements=..., targets=...)")
        self._data, self._dtype = data, dtype
        try:
            with torch.enable_grad():
                yield self
        finally:
            self._data = None

    def _weights(self) -> list[Tensor]:
        return [w.detach().to(self._dtype) for w in self.module.weights()]

    def size(self) -> int:
        return sum(w[0].numel() if self.replicas.dims else w.numel() for w in self.module.weights())

    def _end_to_end(self, r: int) -> Any:
        return self.module.replica_end_to_end(r if self.replicas.dims else None)

    def operators(self) -> list[Operator | None]:
        meas, targets = self._data
        out: list[Operator | None] = []
        for r, ws in enumerate(self.replicas.split(self._weights())):
            if not bool(self.replicas.active[r]):
                out.append(None)
                continue
            hvp, w0 = F.loss_hvp(ws, meas, targets, end_to_end=self._end_to_end(r))
            out.append(Operator(hvp, w0.numel(), w0.dtype, w0.device,
                                matmat=torch.func.vmap(hvp, in_dims=1, out_dims=1)))
        return out

    def hessians(self) -> Tensor:
        meas, targets = self._data
        weights = self._weights()
        if self.replicas.dims:  # frozen replicas at zero weights: huge or non-finite ones cannot spoil the batch
            active = self.replicas.active
            weights = [torch.where(active.reshape(-1, *([1] * (W.ndim - 1))), W, torch.zeros_like(W)) for W in weights]
            return F.replica_loss_hessians(weights, meas, targets, end_to_end=self.module.end_to_end_from)
        return F.loss_hessian(weights, meas, targets, end_to_end=self._end_to_end(0))

    def trace(self, num_matvecs: int, seed: int) -> tuple[Any, Any]:
        meas, targets = self._data
        return self.module.hessian_trace(meas, targets), None

    def blocks(self, r: int) -> list[tuple[str, Operator]]:
        meas, targets = self._data
        ws = self.replicas.split(self._weights())[r]
        hvp, w0 = F.loss_hvp(ws, meas, targets, end_to_end=self._end_to_end(r))
        sizes = [w.numel() for w in ws]
        return [(f"layer{j + 1}", Operator(F.block_operator(hvp, sizes, j), sizes[j], w0.dtype, w0.device))
                for j in range(len(ws))]

    def layer_traces(self, num_matvecs: int, seed: int) -> LayerTraces:
        meas, targets = self._data
        terms = self.module.hessian_trace_terms(meas, targets)
        if terms is None:  # no per-factor closed form: the diagonals of the dense Hessian (small models)
            diag = self.hessians().diagonal(dim1=-2, dim2=-1)
            sizes = [w[0].numel() if self.replicas.dims else w.numel() for w in self.module.weights()]
            terms = torch.stack([part.sum(-1) for part in diag.split(sizes, dim=-1)], dim=-1)
        return {f"layer{j + 1}": terms[..., j] for j in range(terms.shape[-1])}, {}

    def layer_names(self) -> dict[str, str]:
        return {f"layer{j + 1}": f"factor {j + 1}" for j in range(len(self.module.weights()))}

    def parameters(self) -> list[tuple[str, Tensor]]:
        return [(f"layer{j + 1}", w) for j, w in enumerate(self.module.weights())]
