"""Curvature callbacks: Hessian trace and sharpness of the full training loss."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
from torch import Tensor

from lightning_flat import functional as F
from lightning_flat._checks import check_bool, check_choice, check_positive_int, check_real
from lightning_flat.callbacks.base import MeasuringCallback, is_linear_net, problem_data
from lightning_flat.datamodules.base import step_seed
from lightning_flat.engine.compat import silenced_logging
from lightning_flat.engine.hooks import hparams_at
from lightning_flat.measurements import MeasurementBatch, Measurements

__all__ = ["HessianTrace", "Sharpness", "SpectralDensity"]


def default_loss_fn(pl_module: L.LightningModule, batch: Any) -> Tensor:
    """``training_step(batch, 0)`` (its ``"loss"`` entry if it returns a dict) with the module's logging silenced."""
    with silenced_logging(pl_module):
        out = pl_module.training_step(batch, 0)
    return out["loss"] if isinstance(out, dict) else out


def _copy_batch(batch: Any) -> Any:
    """A shallow copy of the batch container (tensors shared), so later in-place changes of the training batch
    (e.g. by LabelNoise at the next steps) do not reach the kept curvature batch."""
    if isinstance(batch, MeasurementBatch):
        return MeasurementBatch(batch.measurements, batch.targets, batch.index)
    if isinstance(batch, dict):
        return {k: _copy_batch(v) for k, v in batch.items()}
    if isinstance(batch, list):
        return [_copy_batch(v) for v in batch]
    if isinstance(batch, tuple):
        return type(batch)(*(_copy_batch(v) for v in batch)) if hasattr(batch, "_fields") else \
            tuple(_copy_batch(v) for v in batch)
    return batch


def _math_attention():
    """Scaled-dot-product attention through its math kernel (twice differentiable) during a read."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


@contextmanager
def isolated(pl_module: L.LightningModule, eval_mode: bool):
    """Run a measurement without leaving a trace: every submodule's train/eval flag and the global CPU and CUDA
    random states are restored afterwards (so dropout masks drawn while measuring do not change training); with
    ``eval_mode`` the module is measured in eval mode (dropout off, a deterministic Hessian; batch norm then uses
    its running statistics, so the Hessian is that of the function the module computes at inference, and its
    running statistics are not updated by the read). Attention runs its math kernel (differentiable twice)."""
    modes = [(m, m.training) for m in pl_module.modules()]
    # half-precision weights (precision="bf16-true"/"16-true") are measured in float32: the module is upcast for
    # the read and cast back, which is exact (every half value is a float32 value), parameters keep their identity
    dtypes = {p.dtype for p in pl_module.parameters() if p.is_floating_point()}
    half = next((d for d in dtypes if d in (torch.float16, torch.bfloat16)), None)
    cpu_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        if half is not None:
            pl_module.float()
        if eval_mode:
            pl_module.eval()
        with _math_attention():  # Hessian-vector products differentiate twice: fused attention kernels cannot
            yield
    finally:
        if half is not None:
            pl_module.to(half)
        for m, mode in modes:
            m.training = mode
        torch.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


def _parse_threshold(value: float | str | None):
    """``track_above``: ``None``, a number, or ``"2/lr"`` / ``"c*2/lr"`` (a multiple of 2/lr, read every step)."""
    import re

    if value is None:
        return None
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(?:([0-9.eE+-]+)\s*\*\s*)?2\s*/\s*lr\s*", value)
        if m is None:
            raise ValueError(f"track_above must be a number, '2/lr' or 'c*2/lr' (e.g. '0.9*2/lr'), got {value!r}")
        return ("two_over_lr", float(m.group(1)) if m.group(1) else 1.0)
    return ("value", check_real("track_above", value))


def _layer_traces(pl_module: L.LightningModule, meas: Measurements, targets: Tensor) -> Tensor:
    """The Hessian trace of each factor's diagonal block, ``(..., L)``, exact: the closed form's terms where the
    model has them (``hessian_trace_terms``), else the diagonals of the dense Hessian (small models)."""
    terms = getattr(pl_module, "hessian_trace_terms", None)
    if callable(terms):
        return terms(meas, targets)
    weights = [w.detach() for w in pl_module.weights()]
    R = getattr(pl_module, "replicas", 1)
    H = F.replica_loss_hessians(weights, meas, targets, end_to_end=pl_module.end_to_end_from) if R > 1 else \
        F.loss_hessian(weights, meas, targets, end_to_end=pl_module.end_to_end_from)
    diag = H.diagonal(dim1=-2, dim2=-1)
    sizes = [w[0].numel() if R > 1 else w.numel() for w in weights]
    return torch.stack([part.sum(-1) for part in diag.split(sizes, dim=-1)], dim=-1)


def _first_active(pl_module: L.LightningModule):
    """``(weights, end_to_end)`` of a lightning_flat model's first active replica (the model itself without
    replicas), or ``None`` when every replica is frozen."""
    R = getattr(pl_module, "replicas", 1)
    active = getattr(pl_module, "replica_active", None)
    if active is not None and not bool(active.any()):
        return None
    r = 0 if active is None else int(active.nonzero()[0, 0])
    weights = [w[r] for w in pl_module.weights()] if R > 1 else pl_module.weights()
    return weights, pl_module.replica_end_to_end(r if R > 1 else None)


def _block_hvp(hvp, sizes: list[int], j: int):
    """``v_j -> (H [0, .., v_j, .., 0])_j``: the operator of the j-th diagonal block of ``hvp``."""
    start = sum(sizes[:j])

    def block(v: Tensor) -> Tensor:
        full = v.new_zeros(sum(sizes))
        full[start:start + sizes[j]] = v
        return hvp(full)[start:start + sizes[j]]

    return block


class _ModuleSnapshot:
    """What a read through ``training_step`` could change, for the first read's side-effect check: parameters and
    buffers, the public attributes of every submodule (tensors by value, lists/dicts/sets by their items, other
    objects by identity) and torchmetrics states."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.tensors = {k: v.detach().clone() for k, v in module.state_dict(keep_vars=True).items()}
        self.attrs = []
        for name, m in module.named_modules():
            for k, v in vars(m).items():
                if k.startswith("_") or k in ("training",):
                    continue
                self.attrs.append((name, m, k, v, self._copy(v)))
            state = getattr(m, "metric_state", None)  # a torchmetrics Metric's accumulated state
            if isinstance(state, dict):
                for k, v in state.items():
                    self.attrs.append((name, m, k, v, self._copy(v)))

    @staticmethod
    def _copy(v: Any) -> Any:
        if isinstance(v, Tensor):
            return v.detach().clone()
        if isinstance(v, (list, dict, set)):
            return type(v)(v)
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

    def changes(self, module: torch.nn.Module) -> list[str]:
        out = []
        for k, v in module.state_dict(keep_vars=True).items():
            if k not in self.tensors or not torch.equal(v.detach(), self.tensors[k]):
                out.append(f"parameter/buffer {k}")
        for name, m, k, old, copy in self.attrs:
            now = m.metric_state.get(k) if k in getattr(m, "metric_state", {}) else getattr(m, k, None)
            if not self._same(old, copy, now):
                out.append(f"attribute {name + '.' if name else ''}{k}")
        return out

    def restore(self, module: torch.nn.Module) -> None:
        with torch.no_grad():
            for k, v in module.state_dict(keep_vars=True).items():
                if k in self.tensors:
                    v.copy_(self.tensors[k])
        for _, m, k, old, copy in self.attrs:
            if isinstance(old, Tensor):
                with torch.no_grad():
                    old.copy_(copy)
            elif isinstance(old, list):
                old[:] = copy
            elif isinstance(old, (dict, set)):
                old.clear()
                old.update(copy)
            try:
                setattr(m, k, old)
            except (AttributeError, TypeError):
                pass


class _CurvatureCallback(MeasuringCallback):
    """Shared parts: the exact path on lightning_flat models, the hessian-eigenthings path elsewhere.

    Generic path: the curvature batch is the first training batch (a shallow copy, kept on its device and saved in
    the callback's state for resume) unless ``batch`` is given; the loss is ``loss_fn(pl_module, batch)``; the
    module is measured in eval mode by default (``eval_mode``) and every train/eval flag and the global random state
    are restored afterwards; Hessian-vector products come from ``torch.autograd.grad`` (no ``.grad`` is written, no
    parameter moves). Under DDP the HVPs are averaged across ranks (hessian-eigenthings' ``DDPHessianOperator``), so
    the curvature is that of the union of the ranks' batches, identical on every rank, and logged once.
    """

    def __init__(self, every_n_steps: int, measurements: Measurements | None, targets: Tensor | None,
                 loss_fn: Callable[[L.LightningModule, Any], Tensor] | None, batch: Any, eval_mode: bool,
                 seed: int, batches: int = 1, gauss_newton: tuple[Callable, Callable] | None = None) -> None:
        super().__init__(every_n_steps)
        self.num_batches = check_positive_int("batches", batches)
        if gauss_newton is not None and (not isinstance(gauss_newton, (tuple, list)) or len(gauss_newton) != 2
                                         or not all(callable(f) for f in gauss_newton)):
            raise TypeError("gauss_newton must be a pair (forward_fn(module, batch) -> output, "
                            f"loss_of_output_fn(output, batch) -> scalar), got {gauss_newton!r}")
        self.gauss_newton = tuple(gauss_newton) if gauss_newton is not None else None
        if measurements is not None and not isinstance(measurements, Measurements):
            raise TypeError(f"measurements must be a lightning_flat Measurements, got {type(measurements).__name__}")
        if (measurements is None) != (targets is None):
            raise ValueError("measurements and targets must be given together")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable as loss_fn(pl_module, batch), got {loss_fn!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        self.measurements, self.targets = measurements, targets
        self.loss_fn = loss_fn or default_loss_fn
        self.eval_mode = check_bool("eval_mode", eval_mode)
        self.seed = seed
        self._batch: Any = _copy_batch(batch) if batch is not None else None
        self._more: list[Any] = []  # batches 2..k of the curvature data (batches=k)
        self._used: list[str] | None = None  # the parameters the loss depends on, in module order (first read)
        self._checked = False  # the first read through training_step was checked for side effects

    fused_safe_hooks = ("on_train_batch_start",)  # generic modules only: lightning_flat models return at once

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if is_linear_net(pl_module):
            return
        if self._batch is None:
            # the fixed curvature batch: the first training batch, without label noise whatever the callbacks' order
            self._batch = self._clean_copy(trainer, batch)
        elif not self._ready:
            self._more.append(self._clean_copy(trainer, batch))
        if not self._ready:
            return  # reads start once the batches=k curvature batches are kept
        if trainer.global_step % self.every_n_steps == 0:
            self._run(trainer, pl_module, monitor=True)  # weights of step global_step, before its update

    @staticmethod
    def _clean_copy(trainer: L.Trainer, batch: Any) -> Any:
        """A shallow copy of a training batch without label noise, whatever the callbacks' order."""
        from lightning_flat.callbacks.label_noise import LabelNoise

        kept = _copy_batch(batch)
        for cb in trainer.callbacks:
            if isinstance(cb, LabelNoise):
                kept = cb.clean(kept)
        return kept

    @property
    def _ready(self) -> bool:
        """Generic path: all ``batches=k`` curvature batches are kept."""
        return self._batch is not None and len(self._more) + 1 >= self.num_batches

    def _run(self, trainer: L.Trainer, pl_module: L.LightningModule, monitor: bool = False) -> None:
        if is_linear_net(pl_module):
            return super()._run(trainer, pl_module, monitor)
        if not self._ready:
            return
        if self._checked or self.loss_fn is not default_loss_fn:
            return super()._run(trainer, pl_module, monitor)
        # The first read through the user's training_step: it must leave the module as it was (a carried hidden
        # state, a metric's update, a list of collected losses would change training or logged values).
        snapshot = _ModuleSnapshot(pl_module)
        super()._run(trainer, pl_module, monitor)
        changed = snapshot.changes(pl_module)
        if changed:
            snapshot.restore(pl_module)
            raise ValueError(f"{type(self).__name__}: reading the curvature through training_step changed the module "
                             f"({', '.join(changed[:5])}{', ...' if len(changed) > 5 else ''}), so it would change "
                             "training: pass loss_fn=lambda module, batch: <the batch loss, without side effects>")
        self._checked = True

    def rename(self, metrics: dict[str, Any]) -> dict[str, Any]:
        if self.gauss_newton is None:
            return metrics
        return {("ggn/" + k[len("hessian/"):] if k.startswith("hessian/") else k): v for k, v in metrics.items()}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.gauss_newton is not None and is_linear_net(pl_module):
            raise ValueError(f"{type(self).__name__}(gauss_newton=...) is for generic modules; on the lightning_flat "
                             "models the exact Hessian is measured")
        compiled = [name or type(pl_module).__name__ for name, m in pl_module.named_modules()
                    if hasattr(m, "_orig_mod")]  # torch.compile's wrapper (OptimizedModule) keeps the module there
        if compiled and not is_linear_net(pl_module) and self.loss_fn is default_loss_fn:
            raise ValueError(f"{type(self).__name__}: the submodule(s) {compiled} are torch.compile'd, and compiled "
                             "backward functions cannot be differentiated twice (Hessian-vector products): pass a "
                             "loss_fn that calls the uncompiled module (its ._orig_mod), or measure before compiling")
        if not is_linear_net(pl_module) and not pl_module.automatic_optimization and \
                self.loss_fn is default_loss_fn:
            raise ValueError(f"{type(self).__name__}: with manual optimization, training_step steps the optimizers "
                             "itself, so reading the curvature through it would train the model: pass "
                             "loss_fn=lambda module, batch: <the batch loss>")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if is_linear_net(pl_module) or self._ready:
            super().on_train_start(trainer, pl_module)

    def _operator(self, trainer: L.Trainer, pl_module: L.LightningModule, only: str | None = None):
        from hessian_eigenthings import DDPHessianOperator, HessianOperator

        from lightning.fabric.utilities.apply_func import move_data_to_device

        # e.g. batches restored from a checkpoint
        batches = [move_data_to_device(b, pl_module.device) for b in [self._batch, *self._more]]
        dtype = next((p.dtype for p in pl_module.parameters() if p.is_floating_point()), None)
        if dtype == torch.float32:  # a half-precision module upcast for the read (isolated): its batches too
            from lightning.fabric.utilities.apply_func import apply_to_collection

            batches = apply_to_collection(batches, Tensor, lambda t: t.float() if t.dtype in (
                torch.float16, torch.bfloat16) else t)
        if self._used is None:
            # a parameter the loss does not use has zero curvature: leave it out of the operator (autograd would
            # refuse it) instead of crashing
            params = [(n, p) for n, p in pl_module.named_parameters() if p.requires_grad]
            grads = torch.autograd.grad(self.loss_fn(pl_module, batches[0]), [p for _, p in params],
                                        allow_unused=True)
            self._used = [n for (n, _), g in zip(params, grads) if g is not None]
        used = set(self._used) if only is None else {only}
        if self.gauss_newton is not None:  # J^T H_loss J instead of the Hessian (PSD for convex losses)
            from hessian_eigenthings import GGNOperator

            if trainer.world_size > 1:
                raise ValueError(f"{type(self).__name__}(gauss_newton=...) runs on one device")
            return GGNOperator(pl_module, batches, *self.gauss_newton, full_dataset=True,
                               param_filter=lambda name, p: name in used)
        cls = DDPHessianOperator if trainer.world_size > 1 else HessianOperator
        # batches=k: the HVPs are averaged over the k batches (the Hessian of the mean loss), and under DDP over the
        # ranks too
        return cls(pl_module, batches, self.loss_fn, full_dataset=True, param_filter=lambda name, p: name in used)

    def _first_active(self, trainer: L.Trainer, pl_module: L.LightningModule):
        """``(weights, end_to_end, measurements, targets)`` of a lightning_flat model's first active replica, or
        ``None`` when every replica is frozen."""
        first = _first_active(pl_module)
        if first is None:
            return None
        meas, targets = problem_data(trainer, pl_module, self.measurements, self.targets, type(self).__name__)
        return (*first, meas, targets)

    def _state_key_config(self) -> dict[str, Any]:
        return {**super()._state_key_config(), "seed": self.seed, "eval_mode": self.eval_mode,
                **{k: getattr(self, k) for k in ("num_matvecs", "method", "top_k", "warm_start") if hasattr(self, k)}}

    def _probe_seed(self, trainer: L.Trainer) -> int:
        # fresh probes at every read, the same on every rank and after a resume
        return step_seed(self.seed, 0x7C5, trainer.global_step) % (2**31)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "batch": self._batch, "more_batches": self._more}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if state_dict.get("batch") is not None:
            self._batch = state_dict["batch"]
        self._more = list(state_dict.get("more_batches") or [])


class HessianTrace(_CurvatureCallback):
    r"""Log the trace of the Hessian of the full training loss (no label noise, no ridge) every ``every_n_steps``.

    On lightning_flat models the value is exact: :func:`lightning_flat.functional.hessian_trace`, the closed form
    :math:`\frac2n\sum_j\mathrm{curvature}(P_j^\top P_j, S_jS_j^\top)`, which is cheap (at the Gatmiry size, one
    product with the cached fourth-moment matrix). On any other LightningModule it is a Hutch++ estimate
    (hessian-eigenthings) with ``num_matvecs`` Hessian-vector products of ``loss_fn(pl_module, batch)`` on a fixed
    batch (see ``_CurvatureCallback`` for what the generic path guarantees: no trace left in the model or its
    training, DDP, resume). Hutch++ is exact once ``num_matvecs`` reaches about 3x the parameter count.

    Logged keys: ``hessian/trace``; on the Hutch++ path also ``hessian/trace_stderr`` (the standard error of its
    residual Hutchinson part).

    Args:
        every_n_steps: measuring period in optimizer steps.
        measurements, targets: the training data; default: the datamodule's (lightning_flat models).
        loss_fn: generic path; ``loss_fn(pl_module, batch) -> scalar``, default ``training_step(batch, 0)`` (its
            ``"loss"`` entry if it returns a dict) with logging silenced.
        batch: generic path; the curvature batch, default the first training batch.
        num_matvecs: generic path; Hutch++ budget.
        eval_mode: generic path; measure in eval mode (dropout off), restoring the flags afterwards.
        seed: generic path; base seed of the Hutch++ probes (fresh probes at every read, keyed by the step).
        batches: generic path; the curvature of the mean loss over the first ``batches`` training batches (HVPs
            averaged over them; reads start once they are kept). Default 1.
    """

    def __init__(self, every_n_steps: int = 100, measurements: Measurements | None = None,
                 targets: Tensor | None = None, loss_fn: Callable | None = None, batch: Any = None,
                 num_matvecs: int = 99, eval_mode: bool = True, seed: int = 0, batches: int = 1,
                 per_layer: bool = False, gauss_newton: tuple[Callable, Callable] | None = None) -> None:
        super().__init__(every_n_steps, measurements, targets, loss_fn, batch, eval_mode, seed, batches, gauss_newton)
        self.per_layer = check_bool("per_layer", per_layer)
        self.num_matvecs = check_positive_int("num_matvecs", num_matvecs)
        if self.num_matvecs < 6:  # Hutch++: a third for the sketch, a third for its range, a third (>= 2) residual
            raise ValueError(f"num_matvecs must be >= 6 (Hutch++ needs at least 2 residual probes for a standard "
                             f"error), got {num_matvecs}")

    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        if is_linear_net(pl_module):
            meas, targets = problem_data(trainer, pl_module, self.measurements, self.targets, "HessianTrace")
            out = {"hessian/trace": pl_module.hessian_trace(meas, targets)}
            if self.per_layer:
                terms = _layer_traces(pl_module, meas, targets)  # (..., L): the closed form's terms
                out.update({f"hessian/trace/layer{j + 1}": terms[..., j] for j in range(terms.shape[-1])})
            return out
        from hessian_eigenthings import trace
        with isolated(pl_module, self.eval_mode), torch.enable_grad():
            res = trace(self._operator(trainer, pl_module), num_matvecs=self.num_matvecs, method="hutch++",
                        seed=self._probe_seed(trainer))
            out = {"hessian/trace": res.estimate, "hessian/trace_stderr": res.stderr}
            if self.per_layer:  # one Hutch++ per parameter tensor (the diagonal blocks); they sum to the trace
                for name in self._used:
                    block = trace(self._operator(trainer, pl_module, only=name), num_matvecs=self.num_matvecs,
                                  method="hutch++", seed=self._probe_seed(trainer))
                    out[f"hessian/trace/{name}"] = block.estimate
        return out


class Sharpness(_CurvatureCallback):
    r"""Log the sharpness (largest algebraic eigenvalue of the Hessian of the full training loss, residual term
    included) every ``every_n_steps``.

    Lanczos over Hessian-vector products (``torch.func`` on lightning_flat models, hessian-eigenthings'
    ``HessianOperator`` on any other module, see ``_CurvatureCallback``), with early stopping and warm-started from
    the previous top eigenvector, so a read during training costs a few HVPs; ``method="exact"`` uses ``eigvalsh``
    of the dense Hessian (lightning_flat models with at most a few thousand parameters). ``top_k > 1`` also logs
    the ``top_k`` largest eigenvalues (hessian-eigenthings' Lanczos, ``which="LA"``).

    ``edge_of_stability=True`` also logs ``hessian/two_over_lr``, :math:`2/\eta` for the step about to run (the
    scheduled learning rate, else the optimizer's; per replica with per-replica rates): gradient descent cannot
    settle where the sharpness exceeds it, and at the edge of stability the sharpness hovers around it (read it as a
    median over 20 or more consecutive measurements, never one).

    On a generic module, ``batches=k`` measures the Hessian of the mean loss over the first ``k`` training batches.

    ``track_above`` (a number, ``"2/lr"`` or ``"c*2/lr"``) also finds every eigenvalue above that threshold by
    LOBPCG warm-started from the previous read (on the lightning_flat models, of the first active replica): kept
    in ``tracked`` as ``(step, [values])`` and logged as ``hessian/above/count``, ``hessian/above/{i}`` (the
    first 10), ``hessian/above/threshold`` and ``hessian/above/hvps``. ``per_layer=True`` logs the top eigenvalue
    of each diagonal block, ``hessian/sharpness/layer{j}`` (a parameter tensor's on other modules).
    ``preconditioned=True`` (generic modules trained with Adam, AdamW or RMSprop) logs
    ``hessian/preconditioned_sharpness``, the top eigenvalue of :math:`P^{-1/2}HP^{-1/2}` with the optimizer's
    second-moment preconditioner. ``gauss_newton=(forward_fn, loss_of_output_fn)`` (generic modules; ``forward_fn``
    must call ``module(...)``, the module's ``forward``, into which the parameters are swapped) measures the
    generalized Gauss-Newton matrix :math:`J^\top H_{loss} J` instead of the Hessian, under ``ggn/...`` keys (also
    for :class:`HessianTrace` and :class:`SpectralDensity`).

    Logged keys: ``hessian/sharpness``, ``hessian/sharpness_hvps`` (HVPs used by this read, Lanczos only),
    ``hessian/eigenvalue_{i}`` for ``i < top_k`` when ``top_k > 1``, ``hessian/two_over_lr``. With replicas, each
    replica has its own Hessian (the dense ones all at once, :func:`lightning_flat.functional.replica_loss_hessians`),
    Lanczos run and warm-start vector; diverged replicas are not measured (NaN, left out of the mean).
    """

    def __init__(self, every_n_steps: int = 100, method: str = "auto", max_iter: int = 100, tol: float = 1e-8,
                 warm_start: bool = True, top_k: int = 1, measurements: Measurements | None = None,
                 targets: Tensor | None = None, loss_fn: Callable | None = None, batch: Any = None,
                 eval_mode: bool = True, seed: int = 0, edge_of_stability: bool = False, batches: int = 1,
                 per_layer: bool = False, track_above: float | str | None = None,
                 gauss_newton: tuple[Callable, Callable] | None = None, preconditioned: bool = False) -> None:
        super().__init__(every_n_steps, measurements, targets, loss_fn, batch, eval_mode, seed, batches, gauss_newton)
        self.per_layer = check_bool("per_layer", per_layer)
        self.preconditioned = check_bool("preconditioned", preconditioned)
        self.track_above = _parse_threshold(track_above)
        self.tracked: list[tuple[int, list[float]]] = []  # (step, every eigenvalue above the threshold)
        self._track_x: Tensor | None = None
        self.edge_of_stability = check_bool("edge_of_stability", edge_of_stability)
        self.top_k = check_positive_int("top_k", top_k)
        self.method = check_choice("method", method, ("auto", "exact", "lanczos"))
        self.max_iter = check_positive_int("max_iter", max_iter)
        self.tol = check_real("tol", tol, low=0.0, low_open=True)
        self.warm_start = check_bool("warm_start", warm_start)
        self._v: dict[int, Tensor] = {}  # warm-start vector per replica

    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        out = self._measure(trainer, pl_module)
        if self.per_layer:
            out.update(self._per_layer(trainer, pl_module))
        if self.track_above is not None:
            out.update(self._track(trainer, pl_module))
        if self.preconditioned:
            out["hessian/preconditioned_sharpness"] = self._preconditioned(trainer, pl_module)
        return out

    def _preconditioned(self, trainer: L.Trainer, pl_module: L.LightningModule) -> float:
        r"""The top eigenvalue of :math:`P^{-1/2}HP^{-1/2}`, the curvature an adaptive optimizer's step sees:
        :math:`P = \sqrt{\hat v} + \epsilon` from Adam/AdamW's bias-corrected ``exp_avg_sq`` (RMSprop:
        ``square_avg``). NaN before the optimizer's first step (no second moments yet)."""
        if is_linear_net(pl_module):
            raise ValueError("Sharpness(preconditioned=True) needs an adaptive optimizer's state; the lightning_flat "
                             "models train with SGD")
        opt = trainer.optimizers[0]
        with isolated(pl_module, self.eval_mode), torch.enable_grad():
            op = self._operator(trainer, pl_module)
            params = dict(pl_module.named_parameters())
            scales = []
            for name in self._used:
                p = params[name]
                state = opt.state.get(p, {})
                group = next(g for g in opt.param_groups if any(q is p for q in g["params"]))
                if "exp_avg_sq" in state:
                    step = float(state["step"])
                    v = state["exp_avg_sq"] / (1 - group["betas"][1] ** step)
                elif "square_avg" in state:
                    v = state["square_avg"]
                else:
                    return float("nan")
                scales.append((v.sqrt() + group["eps"]).rsqrt().reshape(-1))
            s = torch.cat(scales).to(op.dtype)
            theta, _ = self._lanczos(lambda x: s * op.matvec(s * x), op.size, op.dtype, op.device, "preconditioned")
        return float(theta)

    def _threshold(self, trainer: L.Trainer) -> float:
        kind, c = self.track_above
        if kind == "value":
            return c
        two = self._two_over_lr(trainer)
        two = float(two.min()) if isinstance(two, Tensor) else float(two)
        return c * two

    def _track(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """Every eigenvalue above the threshold: LOBPCG for the top k, warm-started from the previous read's
        vectors, k grown until the k-th falls below the threshold."""
        threshold = self._threshold(trainer)
        with torch.enable_grad():
            if is_linear_net(pl_module):
                first = self._first_active(trainer, pl_module)
                if first is None:
                    return {}
                ws, e2e, meas, targets = first
                hvp, w0 = F.loss_hvp(ws, meas, targets, end_to_end=e2e)
                size, dtype, device = w0.numel(), w0.dtype, w0.device
                values, hvps = self._above(hvp, size, dtype, device, threshold)
            else:
                with isolated(pl_module, self.eval_mode):
                    op = self._operator(trainer, pl_module)
                    values, hvps = self._above(op.matvec, op.size, op.dtype, op.device, threshold)
        self.tracked.append((trainer.global_step, values))
        out: dict[str, Any] = {"hessian/above/count": float(len(values)), "hessian/above/threshold": threshold,
                               "hessian/above/hvps": float(hvps)}
        out.update({f"hessian/above/{i}": v for i, v in enumerate(values[:10])})
        return out

    def _above(self, hvp, size: int, dtype: torch.dtype, device: torch.device, threshold: float):
        X0 = self._track_x
        k = min(size, max(3, (X0.shape[1] if X0 is not None else 0)))
        hvps = 0
        while True:
            # the last two vectors are guards; residual sqrt(tol) gives eigenvalues to about tol
            theta, X, n = F.top_eigenpairs(hvp, size, k, dtype=dtype, device=device, X0=X0, tol=self.tol ** 0.5,
                                           seed=self.seed, nconv=max(1, k - 2), above=threshold)
            hvps += n
            if float(theta[max(0, k - 3)]) <= threshold or k >= size:  # a converged one is below: all found
                break
            X0, k = X, min(size, 2 * k)  # all k above: look further, from what was found
        above = [float(t) for t in theta if float(t) > threshold]
        self._track_x = X[:, :len(above) + 2].detach()  # the next read's start: these and two more
        return above, hvps

    def _per_layer(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """The top eigenvalue of each diagonal block of the Hessian (a factor's, or a parameter tensor's)."""
        out: dict[str, Any] = {}
        if not is_linear_net(pl_module):
            with isolated(pl_module, self.eval_mode), torch.enable_grad():
                self._operator(trainer, pl_module)  # finds the used parameters
                for name in self._used:
                    op = self._operator(trainer, pl_module, only=name)
                    theta, _ = self._lanczos(op.matvec, op.size, op.dtype, op.device, f"block:{name}")
                    out[f"hessian/sharpness/{name}"] = float(theta)
            return out
        with torch.enable_grad():
            meas, targets = problem_data(trainer, pl_module, self.measurements, self.targets, "Sharpness")
            weights = pl_module.weights()
            R = getattr(pl_module, "replicas", 1)
            active = getattr(pl_module, "replica_active", None)
            per = [[W[r] for W in weights] for r in range(R)] if R > 1 else [weights]
            values = [[float("nan")] * R for _ in weights]
            for r, ws in enumerate(per):
                if active is not None and not bool(active[r]):
                    continue
                hvp, w0 = F.loss_hvp(ws, meas, targets, end_to_end=pl_module.replica_end_to_end(r if R > 1 else None))
                sizes = [w.numel() for w in ws]
                for j in range(len(ws)):
                    theta, _ = self._lanczos(_block_hvp(hvp, sizes, j), sizes[j], w0.dtype, w0.device, f"{r}:{j}")
                    values[j][r] = float(theta)
        for j, vals in enumerate(values):
            out[f"hessian/sharpness/layer{j + 1}"] = vals[0] if R == 1 else torch.tensor(vals, dtype=torch.float64)
        return out

    def _measure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        if not is_linear_net(pl_module):
            with isolated(pl_module, self.eval_mode), torch.enable_grad():
                op = self._operator(trainer, pl_module)
                theta, hvps = self._lanczos(op.matvec, op.size, op.dtype, op.device, 0)
                out = {"hessian/sharpness": theta, "hessian/sharpness_hvps": hvps}
                if self.top_k > 1:
                    out.update(self._top_k(op, trainer))
            if self.edge_of_stability:
                out["hessian/two_over_lr"] = self._two_over_lr(trainer)
            return out
        with torch.enable_grad():
            meas, targets = problem_data(trainer, pl_module, self.measurements, self.targets, "Sharpness")
            weights = pl_module.weights()
            R = getattr(pl_module, "replicas", 1)
            active = getattr(pl_module, "replica_active", None)
            size = sum(W[0].numel() if R > 1 else W.numel() for W in weights)
            exact = self.method == "exact" or (self.method == "auto" and size <= 1024)
            if exact and R > 1:  # every replica's dense Hessian in one batched computation
                top = F.replica_sharpness(weights, meas, targets, end_to_end=pl_module.end_to_end_from,
                                          active=active)
                thetas = [float(x) for x in top]
                counts = [0] * R
            else:
                per = [[W[r] for W in weights] for r in range(R)] if R > 1 else [weights]
                thetas, counts = [], []
                for r, ws in enumerate(per):
                    e2e = pl_module.replica_end_to_end(r if R > 1 else None)
                    if exact:
                        thetas.append(float(F.sharpness(ws, meas, targets, method="exact", end_to_end=e2e)))
                        counts.append(0)
                    elif active is not None and not bool(active[r]):
                        thetas.append(float("nan"))
                        counts.append(0)
                    else:
                        hvp, w0 = F.loss_hvp(ws, meas, targets, end_to_end=e2e)
                        theta, hvps = self._lanczos(hvp, size, w0.dtype, w0.device, r)
                        thetas.append(float(theta))
                        counts.append(hvps)
            if active is not None:  # a diverged replica is not measured
                thetas = [t if bool(a) else float("nan") for t, a in zip(thetas, active)]
        out: dict[str, Any] = {}
        if self.edge_of_stability:
            out["hessian/two_over_lr"] = self._two_over_lr(trainer)
        if R == 1:
            out["hessian/sharpness"] = thetas[0]
            if counts[0]:
                out["hessian/sharpness_hvps"] = counts[0]
            if self.top_k > 1:
                from hessian_eigenthings import LambdaOperator
                with torch.enable_grad():
                    hvp, w0 = F.loss_hvp(weights, meas, targets, end_to_end=pl_module.end_to_end_from)
                    out.update(self._top_k(LambdaOperator(hvp, size, w0.device, w0.dtype), trainer))
            return out
        out["hessian/sharpness"] = torch.tensor(thetas, dtype=torch.float64)
        if any(counts):
            out["hessian/sharpness_hvps"] = torch.tensor(counts, dtype=torch.float64)
        return out

    @staticmethod
    def _two_over_lr(trainer: L.Trainer) -> Any:
        """``2 / lr`` for the step about to run (the stability threshold of its update): the scheduled value
        (:class:`HyperparameterSchedule`) or the first param group's, per replica when the learning rate is."""
        lr = hparams_at(trainer, trainer.global_step).get("lr", trainer.optimizers[0].param_groups[0]["lr"])
        if isinstance(lr, list):
            lr = torch.tensor(lr, dtype=torch.float64)
        if isinstance(lr, Tensor):
            return 2.0 / lr.detach().to(torch.float64).reshape(-1)
        return 2.0 / lr if lr > 0 else float("inf")

    def _top_k(self, op, trainer: L.Trainer) -> dict[str, float]:
        from hessian_eigenthings import lanczos

        k = min(self.top_k, op.size)
        res = lanczos(op, k=k, max_iter=min(max(3 * k, 30), op.size), which="LA", seed=self._probe_seed(trainer))
        return {f"hessian/eigenvalue_{i}": float(v) for i, v in enumerate(res.eigenvalues)}

    def _lanczos(self, hvp, size: int, dtype: torch.dtype, device: torch.device, key: int | str):
        v0 = self._v.get(key) if self.warm_start else None
        if v0 is not None and v0.numel() != size:
            v0 = None
        theta, v, hvps = F.top_hessian_eigenpair(hvp, size, dtype=dtype, device=device, v0=v0,
                                                 max_iter=self.max_iter, tol=self.tol,
                                                 seed=self.seed + (key if isinstance(key, int) else 0))
        self._v[key] = v.detach()
        return theta, hvps

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "v": self._v, "tracked": self.tracked, "track_x": self._track_x}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._v = dict(state_dict.get("v") or {})
        self.tracked = list(state_dict.get("tracked") or [])
        self._track_x = state_dict.get("track_x")


class SpectralDensity(_CurvatureCallback):
    r"""The eigenvalue density of the Hessian of the full training loss every ``every_n_steps``.

    Exact where the parameter count allows (``method="auto"`` with at most ``exact_max_params`` parameters, or
    ``"exact"``): the eigenvalues of the dense Hessian, each with weight ``1/p``. Otherwise stochastic Lanczos
    quadrature (``"slq"``, hessian-eigenthings' ``spectral_density``): ``num_probes`` Rademacher probes,
    ``lanczos_steps`` Lanczos steps each; the nodes are the Ritz values of every probe and the weights the squared
    first components of their eigenvectors divided by ``num_probes``, so that
    :math:`\sum_k w_k\theta_k^j \approx \operatorname{tr}(H^j)/p` (exactly in expectation for ``j`` below
    ``2 * lanczos_steps``). On the lightning_flat models the Hessian is the closed form's (``torch.func``); with
    replicas, the first active replica's. On any other module, ``loss_fn`` on the kept batches, as
    :class:`HessianTrace`.

    Kept in ``densities``: a list of ``(step, nodes, weights)`` (CPU float64 tensors); a wandb logger also gets
    the density as a histogram, ``spectrum/density``. Logged keys:
    ``spectrum/max`` and ``spectrum/min`` (the extreme nodes), ``spectrum/mean`` (:math:`\operatorname{tr}H/p`),
    ``spectrum/second_moment`` (:math:`\operatorname{tr}H^2/p`) and ``spectrum/negative_mass`` (the weight of the
    negative nodes). :func:`lightning_flat.plotting.density_heatmap` draws the densities over training.
    """

    def __init__(self, every_n_steps: int = 100, method: str = "auto", num_probes: int = 10, lanczos_steps: int = 80,
                 exact_max_params: int = 1024, measurements: Measurements | None = None,
                 targets: Tensor | None = None, loss_fn: Callable | None = None, batch: Any = None,
                 eval_mode: bool = True, seed: int = 0, batches: int = 1,
                 gauss_newton: tuple[Callable, Callable] | None = None) -> None:
        super().__init__(every_n_steps, measurements, targets, loss_fn, batch, eval_mode, seed, batches, gauss_newton)
        self.method = check_choice("method", method, ("auto", "exact", "slq"))
        self.num_probes = check_positive_int("num_probes", num_probes)
        self.lanczos_steps = check_positive_int("lanczos_steps", lanczos_steps)
        self.exact_max_params = check_positive_int("exact_max_params", exact_max_params)
        self.densities: list[tuple[int, Tensor, Tensor]] = []

    def _state_key_config(self) -> dict[str, Any]:
        return {**super()._state_key_config(), "method": self.method, "num_probes": self.num_probes,
                "lanczos_steps": self.lanczos_steps}

    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        with torch.enable_grad():
            if is_linear_net(pl_module):
                first = self._first_active(trainer, pl_module)
                if first is None:
                    return {}
                ws, e2e, meas, targets = first
                size = sum(w.numel() for w in ws)
                if self._exact(size):
                    H = F.loss_hessian([w.detach() for w in ws], meas, targets, end_to_end=e2e)
                    nodes, weights = self._exact_density(H)
                else:
                    from hessian_eigenthings import LambdaOperator

                    hvp, w0 = F.loss_hvp(ws, meas, targets, end_to_end=e2e)
                    nodes, weights = self._slq(LambdaOperator(hvp, size, w0.device, w0.dtype), trainer)
            else:
                with isolated(pl_module, self.eval_mode):
                    op = self._operator(trainer, pl_module)
                    if self._exact(op.size):
                        eye = torch.eye(op.size, dtype=op.dtype, device=op.device)
                        H = torch.stack([op.matvec(e) for e in eye])
                        nodes, weights = self._exact_density(0.5 * (H + H.T))
                    else:
                        nodes, weights = self._slq(op, trainer)
        nodes, weights = nodes.detach().to("cpu", torch.float64), weights.detach().to("cpu", torch.float64)
        if not bool(torch.isfinite(nodes).all()):
            return {}
        self.densities.append((trainer.global_step, nodes, weights))
        self._log_histogram(trainer, nodes, weights)
        return {"spectrum/max": float(nodes.max()), "spectrum/min": float(nodes.min()),
                "spectrum/mean": float((weights * nodes).sum()),
                "spectrum/second_moment": float((weights * nodes.square()).sum()),
                "spectrum/negative_mass": float(weights[nodes < 0].sum())}

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

    def _exact(self, size: int) -> bool:
        return self.method == "exact" or (self.method == "auto" and size <= self.exact_max_params)

    @staticmethod
    def _exact_density(H: Tensor) -> tuple[Tensor, Tensor]:
        if not bool(torch.isfinite(H).all()):
            return torch.full((1,), float("nan")), torch.ones(1)
        nodes = torch.linalg.eigvalsh(H)
        return nodes, torch.full_like(nodes, 1.0 / nodes.numel())

    def _slq(self, op, trainer: L.Trainer) -> tuple[Tensor, Tensor]:
        from hessian_eigenthings import spectral_density

        res = spectral_density(op, num_runs=self.num_probes, lanczos_steps=min(self.lanczos_steps, op.size),
                               num_grid_points=2, seed=self._probe_seed(trainer))
        keep = torch.isfinite(res.raw_eigenvalues)
        return res.raw_eigenvalues[keep], res.raw_weights[keep] / self.num_probes

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "densities": self.densities}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.densities = list(state_dict.get("densities") or [])
