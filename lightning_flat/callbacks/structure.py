"""Structure callbacks: balancedness of the factors, ranks and norms of the end-to-end matrix."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import lightning as L
import torch
from torch import Tensor

from lightning_flat import functional as F
from lightning_flat._checks import check_bool, check_choice, check_positive_int, check_real
from lightning_flat.callbacks.base import MeasuringCallback
from lightning_flat.functional.spectral import _scaled_schatten

__all__ = ["ApproximateRank", "Balancedness", "EffectiveRank", "MatrixNorms", "SingularValues"]


@runtime_checkable
class Factored(Protocol):
    """A module whose map is an end-to-end matrix of trained factors (the lightning_flat models)."""

    def weights(self) -> list[Tensor]: ...

    def end_to_end(self) -> Tensor: ...


class StructureCallback(MeasuringCallback):
    """Base of the callbacks that read a lightning_flat model's factors and end-to-end matrix; any other module is
    refused at setup."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not isinstance(pl_module, Factored):
            raise TypeError(f"{type(self).__name__} needs a module with weights() -> [W_1, ..., W_L] and "
                            f"end_to_end() (the lightning_flat models), got {type(pl_module).__name__}")


class Balancedness(StructureCallback):
    r"""Log $\sum_j\|W_{j+1}^\top W_{j+1} - W_jW_j^\top\|_F$ every ``every_n_steps``.

    Logged keys: ``balance/total`` and, with ``per_layer=True``, ``balance/layer{j}`` for ``j = 1..L-1`` (the term
    between layers j and j+1). Note that the flattest factorization is *not* balanced for depth >= 3.
    """

    def __init__(self, every_n_steps: int = 100, per_layer: bool = False) -> None:
        super().__init__(every_n_steps)
        self.per_layer = check_bool("per_layer", per_layer)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "per_layer": self.per_layer}

    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        weights = pl_module.weights()
        if any(weights[j].shape[-1] != weights[j - 1].shape[-2] for j in range(1, len(weights))):
            raise TypeError(f"Balancedness needs a chain of factors E = W_L ... W_1 (e.g. DeepLinearNet); "
                            f"{type(pl_module).__name__}'s weights are not one")
        terms = F.balancedness(weights, per_layer=True)
        out = {"balance/total": terms.sum(-1)}
        if self.per_layer:
            for j in range(terms.shape[-1]):
                out[f"balance/layer{j + 1}"] = terms[..., j]
        return out


class EffectiveRank(StructureCallback):
    r"""Log ranks of the end-to-end matrix ``E`` (and optionally of each factor) every ``every_n_steps``.

    ``kinds`` among ``"entropy"`` (exp of the entropy of the normalised singular values), ``"stable"``
    ($\|E\|_F^2/\|E\|_2^2$) and ``"numerical"`` ($\#\{s_k > \mathrm{tol}\cdot s_1\}$), see
    [`lightning_flat.functional.effective_rank`][lightning_flat.functional.effective_rank].

    Logged keys: ``rank/effective_end_to_end`` (entropy), ``rank/stable_end_to_end``, ``rank/numerical_end_to_end``;
    with ``layers=True`` the same with ``layer{j}`` in place of ``end_to_end``.
    """

    _NAMES = {"entropy": "effective", "stable": "stable", "numerical": "numerical"}

    def __init__(self, every_n_steps: int = 100, kinds: Sequence[str] = ("entropy", "stable", "numerical"),
                 tol: float | None = None, layers: bool = False) -> None:
        super().__init__(every_n_steps)
        if isinstance(kinds, str):
            kinds = (kinds,)
        if len(kinds) == 0:
            raise ValueError("kinds must name at least one of 'entropy', 'stable', 'numerical', got an empty list")
        self.kinds = tuple(check_choice("kinds", k, tuple(self._NAMES)) for k in kinds)
        self.tol = None if tol is None else check_real("tol", tol, low=0.0)
        self.layers = check_bool("layers", layers)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "kinds": list(self.kinds), "tol": self.tol, "layers": self.layers}

    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        mats = {"end_to_end": pl_module.end_to_end()}
        if self.layers:
            for j, W in enumerate(pl_module.weights()):
                mats[f"layer{j + 1}"] = W
        out = {}
        for name, M in mats.items():
            for kind in self.kinds:
                out[f"rank/{self._NAMES[kind]}_{name}"] = F.effective_rank(M, kind, tol=self.tol)
        return out


class MatrixNorms(StructureCallback):
    r"""Log norms of the end-to-end matrix ``E`` every ``every_n_steps``.

    Logged keys: ``norm/nuclear`` ($\|E\|_*$), ``norm/frobenius``, ``norm/spectral`` and, when the module
    has ``weights()``, ``norm/weights_sq`` ($\sum_j\|W_j\|_F^2$, the ridge penalty without the
    $\lambda/2$) and ``norm/representation_cost`` ($L\sum_i s_i(E)^{2/L}$ for ``L`` factors, the smallest
    ``weights_sq`` of any factorisation of ``E``: the two meet at balanced factors, e.g. at critical points of
    training with weight decay).
    """

    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        E = pl_module.end_to_end()
        s = F.singular_values(E)
        out = {"norm/nuclear": s.sum(-1), "norm/frobenius": _scaled_schatten(s, 2.0), "norm/spectral": s[..., 0]}
        weights = pl_module.weights()
        out["norm/weights_sq"] = sum(W.square().sum((-2, -1)) for W in weights)
        out["norm/representation_cost"] = F.representation_cost(E, len(weights))
        return out


class SingularValues(StructureCallback):
    r"""Log the singular values of the end-to-end matrix ``E`` and their ratios every ``every_n_steps``.

    Logged keys: ``sv/s{k}`` ($s_k(E)$, descending, ``k = 1..top``) and ``sv/ratio{k}``
    ($s_k/s_1$, ``k = 2..top``; NaN when $E = 0$). ``top`` defaults to all of them. A rank jump shows
    as ``sv/ratio2`` falling from order one to round-off in a few steps;
    [`lightning_flat.functional.jump_time`][lightning_flat.functional.jump_time] reads the step from
    ``replica_history["sv/ratio2"]``.
    """

    def __init__(self, every_n_steps: int = 10, top: int | None = None) -> None:
        super().__init__(every_n_steps)
        self.top = None if top is None else check_positive_int("top", top)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "top": self.top}

    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        s = F.singular_values(pl_module.end_to_end())
        k = s.shape[-1] if self.top is None else min(self.top, s.shape[-1])
        out = {f"sv/s{i + 1}": s[..., i] for i in range(k)}
        for i in range(1, k):
            out[f"sv/ratio{i + 1}"] = s[..., i] / s[..., 0]
        return out


class ApproximateRank(StructureCallback):
    r"""Log the approximate rank of the parameters,
    [`lightning_flat.functional.approximate_rank`][lightning_flat.functional.approximate_rank], every ``every_n_steps``:
    $\max_j\sum_i f_\alpha(s_i(W_j)^2)$, each squared singular value of a factor counting 1 above ``alpha`` and less
    below. With weight decay it falls from the hidden width at init to the rank of ``E`` as the unused directions decay.

    Logged keys: ``rank/approx`` and, with ``per_layer=True``, ``rank/approx_layer{j}``. It takes one SVD per factor
    (the hidden ``w x w`` ones dominate): measure it less often than ``E``'s singular values.
    """

    def __init__(self, every_n_steps: int = 100, alpha: float = 1e-3, per_layer: bool = False) -> None:
        super().__init__(every_n_steps)
        self.alpha = check_real("alpha", alpha, low=0.0, low_open=True)
        self.per_layer = check_bool("per_layer", per_layer)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "alpha": self.alpha, "per_layer": self.per_layer}

    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        ranks = [F.soft_rank(W, self.alpha) for W in pl_module.weights()]
        out = {"rank/approx": torch.stack(ranks).amax(0)}
        if self.per_layer:
            out.update({f"rank/approx_layer{j + 1}": r for j, r in enumerate(ranks)})
        return out
