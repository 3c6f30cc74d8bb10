r"""The curvature source of any LightningModule: Hessian-vector products of ``loss_fn(module, batch)`` on kept batches.

- **Data.** The curvature batch is the first training batch (a shallow copy without what step hooks put in it, e.g.
  label noise, whatever the callbacks' order), or the given one; with ``batches=k`` the first ``k`` training batches
  (the Hessian of their mean loss). Kept batches are saved in the callback's checkpoint state.
- **Loss.** ``loss_fn(module, batch)``, by default ``training_step(batch, 0)`` (its ``"loss"`` entry if a dict) with
  logging silenced ([`training_step_loss`][lightning_flat.engine.training_step_loss]). A loss that is not a tensor
  (``training_step`` returning ``None``, a dict without ``"loss"``) is refused when the first batch is kept, before
  the first update.
- **Restore, don't refuse.** A read runs the loss's forward once, with the module as it is at the read (a carried
  hidden state as training left it, batch norm on its running statistics in eval mode or on the batch's with
  ``eval_mode=False``), and keeps its gradient graph: every product then differentiates that graph again, so no
  forward runs twice. Whatever the forward changed (attributes, lists and dicts, buffers such as running
  statistics, torchmetrics states, lazily built caches and attributes, random states, train/eval flags) is put back
  afterwards ([`ModuleSnapshot`][lightning_flat.curvature.isolation.ModuleSnapshot], `isolated`), so training is bitwise
  the same with or without the reads.
- **Products.** $Hv = \nabla(\nabla L\cdot v)$ from the kept gradient (reverse over reverse), a block of
  vectors in one batched backward (``is_grads_batched``), or column by column where an operation has no batching
  rule; under DDP averaged across ranks (the curvature of the union of the ranks' batches). The Gauss-Newton matrix
  (``CurvatureOptions(gauss_newton=...)``) comes from hessian-eigenthings' ``GGNOperator``. A parameter the loss does
  not use has zero curvature and is left out; no ``.grad`` is written and no parameter moves.
- **Blocks.** ``layer{j}`` is the ``j``-th parameter tensor the loss uses, in module order (`layer_names`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from lightning_flat.curvature.base import CurvatureOptions, CurvatureSource, LayerTraces, Operator
from lightning_flat.curvature.isolation import ModuleSnapshot, copy_batch, isolated
from lightning_flat.engine import compat
from lightning_flat.engine.hooks import StepHook
from lightning_flat.engine.module_loss import LossFn, training_step_loss
from lightning_flat.engine.replicas import Replicas
from lightning_flat.functional.stochastic import hutchpp

__all__ = ["ModuleSource"]


class ModuleSource(CurvatureSource):
    """[`CurvatureSource`][lightning_flat.curvature.base.CurvatureSource] of any LightningModule (see the module
    docstring).

    Args:
        module: the LightningModule.
        options: [`CurvatureOptions`][lightning_flat.curvature.base.CurvatureOptions].
        loss_fn: ``loss_fn(module, batch) -> scalar``; ``None`` reads through ``training_step``.
        batch: the curvature batch; ``None`` keeps the first training batch.
        who: the callback's name, for messages.
    """

    def __init__(self, module: Any, options: CurvatureOptions, loss_fn: LossFn | None = None, batch: Any = None,
                 who: str = "this callback") -> None:
        self.module, self.options, self.who = module, options, who
        self.replicas = Replicas(1, seed=None)
        self.matrix = "ggn" if options.gauss_newton is not None else "hessian"
        self.custom_loss = loss_fn is not None
        self.loss_fn = loss_fn or training_step_loss
        self._batch: Any = copy_batch(batch) if batch is not None else None
        self._more: list[Any] = []  # batches 2..k of the curvature data (batches=k)
        self._used: list[str] | None = None  # the parameters the loss depends on, in module order (first read)
        self._trainer: Any = None
        self._op: Operator | None = None
        self._graph: tuple[list[Tensor], list[Tensor]] | None = None
        self._batched = True  # block products in one batched backward until an operation refuses

    # ------------------------------------------------------------------------------------------------ set-up
    def setup(self, trainer: Any) -> None:
        """Refuse at setup what a read cannot do: ``torch.compile``'d submodules (their backward cannot be
        differentiated twice) or manual optimization (its ``training_step`` steps the optimizers) without
        ``loss_fn``; the Gauss-Newton matrix under DDP."""
        compiled = compat.compiled_submodules(self.module)
        if compiled and not self.custom_loss:
            raise ValueError(f"{self.who}: the submodule(s) {compiled} are torch.compile'd, and compiled backward "
                             "functions cannot be differentiated twice (Hessian-vector products): pass a loss_fn that "
                             "calls the uncompiled module (its ._orig_mod), or measure before compiling")
        if not self.module.automatic_optimization and not self.custom_loss:
            raise ValueError(f"{self.who}: with manual optimization, training_step steps the optimizers itself, so "
                             "reading the curvature through it would train the model: pass "
                             "loss_fn=lambda module, batch: <the batch loss>")
        if self.options.gauss_newton is not None and trainer.world_size > 1:
            raise ValueError(f"{self.who}: CurvatureOptions(gauss_newton=...) runs on one device")

    def observe(self, trainer: Any, batch: Any) -> bool:
        """Keep the training batch if it is one of the curvature batches; True when the source became ready with
        it."""
        if self.ready():
            return False
        kept = copy_batch(batch)
        for cb in trainer.callbacks:
            if isinstance(cb, StepHook):
                kept = cb.undo_targets(kept)
        if self._batch is None:
            self._check_loss(kept)
            self._batch = kept
        else:
            self._more.append(kept)
        return self.ready()

    def _check_loss(self, batch: Any) -> None:
        """Refuse, before the first update, a loss that is not a tensor (e.g. ``training_step`` returning ``None``):
        one evaluation on the first kept batch, whose traces are undone."""
        snapshot = ModuleSnapshot(self.module)
        try:
            with isolated(self.module, self.options.eval_mode), torch.no_grad():
                self._loss(self._batches([batch])[0])
        finally:
            snapshot.restore(self.module)

    def ready(self) -> bool:
        return self._batch is not None and len(self._more) + 1 >= self.options.batches

    # -------------------------------------------------------------------------------------------------- a read
    @contextmanager
    def read(self, trainer: Any) -> Iterator[ModuleSource]:
        module = self.module
        snapshot = ModuleSnapshot(module)
        self._trainer = trainer
        try:
            with isolated(module, self.options.eval_mode):
                if self.options.gauss_newton is not None:
                    self._op = self._ggn()
                else:
                    self._graph = self._gradient_graph()
                    self._op = self._products(self._graph)
                yield self
        finally:
            self._op, self._graph, self._trainer = None, None, None
            snapshot.restore(module)

    def _batches(self, batches: list[Any] | None = None) -> list[Any]:
        """The kept batches (or ``batches``) on the module's device, in float32 when the module is (a half-precision
        module upcast for the read)."""
        from lightning.fabric.utilities.apply_func import apply_to_collection, move_data_to_device

        batches = [self._batch, *self._more] if batches is None else batches
        batches = [move_data_to_device(b, self.module.device) for b in batches]
        dtype = next((p.dtype for p in self.module.parameters() if p.is_floating_point()), None)
        if dtype == torch.float32:  # a half-precision module upcast for the read (isolated): its batches too
            batches = apply_to_collection(batches, Tensor, lambda t: t.float() if t.dtype in (
                torch.float16, torch.bfloat16) else t)
        return batches

    def _gradient_graph(self) -> tuple[list[Tensor], list[Tensor]]:
        """``(params, gradients)``: the used parameters and the gradient of the mean loss over the kept batches,
        with its graph kept for the products."""
        batches = self._batches()
        named = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
        loss = sum(self._loss(b) for b in batches) / len(batches)
        grads = torch.autograd.grad(loss, [p for _, p in named], create_graph=True, allow_unused=True)
        if self._used is None:  # a parameter the loss does not use has zero curvature: left out of the operator
            self._used = [n for (n, _), g in zip(named, grads) if g is not None]
        keep = set(self._used)
        pairs = [(p, g) for (n, p), g in zip(named, grads) if n in keep]
        return [p for p, _ in pairs], [g for _, g in pairs]

    def _loss(self, batch: Any) -> Tensor:
        loss = self.loss_fn(self.module, batch)
        if not isinstance(loss, Tensor):
            raise ValueError(f"{self.who}: loss_fn returned {type(loss).__name__}, not a tensor")
        return loss

    def _products(self, graph: tuple[list[Tensor], list[Tensor]], only: int | None = None) -> Operator:
        """The Hessian (or the diagonal block of parameter ``only``) as products with the kept gradient."""
        params, grads = graph
        cols = range(len(params)) if only is None else [only]
        inputs = [params[j] for j in cols]
        live = [(g, j) for j, g in enumerate(grads) if g is not None and g.requires_grad]
        sizes = [params[j].numel() for j in cols]
        dtype, device = params[0].dtype, params[0].device
        world = self._trainer.world_size if self._trainer is not None else 1

        def vector_parts(V: Tensor, batched: bool) -> list[Tensor]:
            parts, k = [], 0
            full = {j: None for j, _ in enumerate(grads)}
            for j, n in zip(cols, sizes):
                full[j] = V[k:k + n]
                k += n
            for _, j in live:
                x = full[j]
                if x is None:
                    shape = (V.shape[1], *params[j].shape) if batched else params[j].shape
                    parts.append(torch.zeros(shape, dtype=dtype, device=device))
                else:
                    parts.append(x.T.reshape(V.shape[1], *params[j].shape) if batched else x.reshape(params[j].shape))
            return parts

        def product(V: Tensor, batched: bool) -> Tensor:
            if not live:
                return torch.zeros_like(V)
            out = torch.autograd.grad([g for g, _ in live], inputs, grad_outputs=vector_parts(V, batched),
                                      retain_graph=True, allow_unused=True, is_grads_batched=batched)
            flat = [torch.zeros((V.shape[1], n) if batched else (n,), dtype=dtype, device=device) if h is None
                    else h.reshape(V.shape[1], -1) if batched else h.reshape(-1) for h, n in zip(out, sizes)]
            hv = torch.cat(flat, dim=-1)
            hv = hv.T if batched else hv
            if world > 1:
                torch.distributed.all_reduce(hv)
                hv = hv / world
            return hv

        def matmat(V: Tensor) -> Tensor:
            if self._batched:
                try:
                    return product(V, True)
                except RuntimeError:  # an operation without a batching rule: one product at a time from now on
                    self._batched = False
            return torch.stack([product(V[:, j], False) for j in range(V.shape[1])], dim=1)

        return Operator(lambda v: product(v, False), sum(sizes), dtype, device, matmat=matmat)

    def _ggn(self, only: str | None = None) -> Operator:
        from hessian_eigenthings import GGNOperator

        if self._used is None:
            self._gradient_graph()
        used = set(self._used) if only is None else {only}
        op = GGNOperator(self.module, self._batches(), *self.options.gauss_newton, full_dataset=True,
                         param_filter=lambda name, p: name in used)
        return Operator(op.matvec, op.size, op.dtype, op.device)

    def size(self) -> int:
        return self._op.size

    def operators(self) -> list[Operator | None]:
        return [self._op]

    def hessians(self) -> Tensor:
        return self._op.dense()

    def trace(self, num_matvecs: int, seed: int) -> tuple[Any, Any]:
        op = self._op
        return hutchpp(op.matmat, op.size, num_matvecs, dtype=op.dtype, device=op.device, seed=seed)

    def blocks(self, r: int) -> list[tuple[str, Operator]]:
        if self._graph is None:  # the Gauss-Newton matrix
            return [(f"layer{j + 1}", self._ggn(only=name)) for j, name in enumerate(self._used)]
        return [(f"layer{j + 1}", self._products(self._graph, only=j)) for j in range(len(self._used))]

    def layer_traces(self, num_matvecs: int, seed: int) -> LayerTraces:
        values, errors = {}, {}
        for key, op in self.blocks(0):
            values[key], errors[key] = hutchpp(op.matmat, op.size, num_matvecs, dtype=op.dtype, device=op.device,
                                               seed=seed)
        return values, errors

    def layer_names(self) -> dict[str, str]:
        return {f"layer{j + 1}": name for j, name in enumerate(self._used or [])}

    def parameters(self) -> list[tuple[str, Tensor]]:
        """The parameters the loss uses, in module order, as ``(name, tensor)`` (known after the first read)."""
        params = dict(self.module.named_parameters())
        return [(name, params[name]) for name in self._used or []]

    # ------------------------------------------------------------------------------------------------- resume
    def state_dict(self) -> dict[str, Any]:
        return {"batch": self._batch, "more_batches": self._more}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("batch") is not None:
            self._batch = state["batch"]
        self._more = list(state.get("more_batches") or [])
