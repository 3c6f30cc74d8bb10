"""A curvature read through a LightningModule's own code must leave no trace: what it may change and how it is put
back.

- :func:`isolated`: the train/eval flags (optionally eval mode during the read), the global CPU and CUDA random
  states (dropout masks drawn while measuring do not change training), half-precision weights measured in float32
  (upcast for the read and cast back, which is exact), attention through its math kernel (differentiable twice).
- :class:`ModuleSnapshot`: everything ``training_step`` can change in the module: parameters and buffers, the
  public attributes of every submodule (tensors by value, lists/dicts/sets by their items, other objects by
  identity) and torchmetrics states; :meth:`ModuleSnapshot.changes` names what changed, :meth:`ModuleSnapshot.restore`
  puts it back.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

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


class ModuleSnapshot:
    """What a read through a module's own code can change, and how to put it back: the buffers (by value, e.g.
    batch-norm running statistics), every attribute of every submodule (tensors by value, lists, dicts and sets by
    their items, other objects by identity; private ones included, e.g. a torchmetrics metric's update count and
    forward cache), torchmetrics states, and which attributes and buffers exist (ones created during the read, such
    as lazily built caches, are removed again). Parameters are not copied: a read differentiates through them and
    never writes them."""

    _REGISTRIES = ("_parameters", "_buffers", "_modules", "training")

    def __init__(self, module: nn.Module) -> None:
        self.buffers = {k: v.detach().clone() for k, v in module.named_buffers()}
        self.modules = []
        for name, m in module.named_modules():
            attrs = {k: (v, self._copy(v)) for k, v in vars(m).items() if k not in self._REGISTRIES}
            state = getattr(m, "metric_state", None)  # a torchmetrics Metric's accumulated state
            metric = {k: (v, self._copy(v)) for k, v in state.items()} if isinstance(state, dict) else {}
            own_buffers = {k for k, _ in m.named_buffers(recurse=False)}
            self.modules.append((name, m, attrs, metric, own_buffers))

    @staticmethod
    def _copy(v: Any) -> Any:
        if isinstance(v, Tensor):
            return v.detach().clone()
        if isinstance(v, (list, dict, set)):
            return type(v)(v) if not hasattr(v, "default_factory") else v.copy()
        if isinstance(v, tuple):
            return tuple(x.detach().clone() if isinstance(x, Tensor) else x for x in v)
        return None

    @staticmethod
    def _same(old: Any, copy: Any, now: Any) -> bool:
        if now is not old:
            return False
        if isinstance(now, Tensor):
            return now.shape == copy.shape and bool(torch.equal(now.detach(), copy))
        if isinstance(now, list):
            return len(now) == len(copy) and all(a is b for a, b in zip(now, copy))
        if isinstance(now, dict):
            return now.keys() == copy.keys() and all(now[k] is copy[k] for k in now)
        if isinstance(now, set):
            return now == copy
        if isinstance(now, tuple):
            return all(torch.equal(a, b) if isinstance(a, Tensor) else a is b for a, b in zip(now, copy))
        return True

    def changes(self, module: nn.Module) -> list[str]:
        """What differs now from the snapshot (buffers, attributes, new names), by name."""
        out = [f"buffer {k}" for k, v in module.named_buffers()
               if k not in self.buffers or not torch.equal(v.detach(), self.buffers[k])]
        for name, m, attrs, metric, own_buffers in self.modules:
            prefix = f"{name}." if name else ""
            for k, (old, copy) in attrs.items():
                if not self._same(old, copy, vars(m).get(k, _MISSING)):
                    out.append(f"attribute {prefix}{k}")
            out += [f"new attribute {prefix}{k}" for k in vars(m) if k not in attrs and k not in self._REGISTRIES]
            state = getattr(m, "metric_state", {})
            out += [f"metric state {prefix}{k}" for k, (old, copy) in metric.items()
                    if not self._same(old, copy, state.get(k, _MISSING))]
        return out

    def restore(self, module: nn.Module) -> None:
        """Put back what the snapshot holds (see the class docstring)."""
        for name, m, attrs, metric, own_buffers in self.modules:
            for k in [k for k, _ in m.named_buffers(recurse=False) if k not in own_buffers]:
                delattr(m, k)  # a buffer registered during the read
            for k in [k for k in vars(m) if k not in attrs and k not in self._REGISTRIES]:
                object.__delattr__(m, k)  # an attribute created during the read
            for k, (old, copy) in attrs.items():
                self._put_back(old, copy)
                if vars(m).get(k, _MISSING) is not old:
                    object.__setattr__(m, k, old)
            for k, (old, copy) in metric.items():
                self._put_back(old, copy)
                try:
                    setattr(m, k, old)
                except (AttributeError, TypeError):
                    pass
        with torch.no_grad():
            for k, v in module.named_buffers():
                if k in self.buffers:
                    v.copy_(self.buffers[k])

    @staticmethod
    def _put_back(old: Any, copy: Any) -> None:
        """Restore a container's items or a tensor's values in place (the object itself keeps its identity)."""
        if isinstance(old, Tensor):
            if old.shape == copy.shape:
                with torch.no_grad():
                    old.copy_(copy)
        elif isinstance(old, list):
            old[:] = copy
        elif isinstance(old, (dict, set)):
            old.clear()
            old.update(copy)


_MISSING = object()
