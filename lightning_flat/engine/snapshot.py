"""What running a module's own code (its ``training_step``, a user's ``loss_fn``) can change, and how to put it back:
used around every curvature read and every extra forward of SAM on modules other than the lightning_flat models, so
that training is bitwise the same with or without them."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["ModuleSnapshot"]


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
