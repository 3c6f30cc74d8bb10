"""A curvature read through a LightningModule's own code must leave no trace: what it may change and how it is put
back.

- [`isolated`][lightning_flat.curvature.isolation.isolated]: the train/eval flags (optionally eval mode during the
  read), the global CPU and CUDA random states (dropout masks drawn while measuring do not change training),
  half-precision weights measured in float32 (upcast for the read and cast back, which is exact), attention through its
  math kernel (differentiable twice).
- [`ModuleSnapshot`][lightning_flat.curvature.isolation.ModuleSnapshot] (re-exported here): everything ``training_step``
  can change in the module, and how to put it back.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from lightning_flat.engine.snapshot import ModuleSnapshot

__all__ = ["isolated", "ModuleSnapshot", "copy_batch"]

_HALF = (torch.float16, torch.bfloat16)


def _math_attention():
    """Scaled-dot-product attention through its math kernel (twice differentiable) during a read."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


@contextmanager
def isolated(module: nn.Module, eval_mode: bool) -> Iterator[None]:
    """Run a read without leaving a trace in the module's flags, its dtype or the global random state (see the module
    docstring). With ``eval_mode`` the module is read in eval mode (dropout off, a deterministic Hessian; batch norm
    then uses its running statistics, so the Hessian is that of the function the module computes at inference)."""
    modes = [(m, m.training) for m in module.modules()]
    dtypes = {p.dtype for p in module.parameters() if p.is_floating_point()}
    half = next((d for d in dtypes if d in _HALF), None)
    cpu_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        if half is not None:
            module.float()
        if eval_mode:
            module.eval()
        with _math_attention(), torch.enable_grad():
            yield
    finally:
        if half is not None:
            module.to(half)
        for m, mode in modes:
            m.training = mode
        torch.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


def copy_batch(batch: Any) -> Any:
    """A shallow copy of the batch container (tensors shared), so later in-place changes of the training batch
    (e.g. label noise at the next steps) do not reach a kept batch."""
    from lightning_flat.measurements import MeasurementBatch

    if isinstance(batch, MeasurementBatch):
        return MeasurementBatch(batch.measurements, batch.targets, batch.index)
    if isinstance(batch, dict):
        return {k: copy_batch(v) for k, v in batch.items()}
    if isinstance(batch, list):
        return [copy_batch(v) for v in batch]
    if isinstance(batch, tuple):
        return type(batch)(*(copy_batch(v) for v in batch)) if hasattr(batch, "_fields") else \
            tuple(copy_batch(v) for v in batch)
    return batch
