"""Structure callbacks: balancedness of the factors, ranks and norms of the end-to-end matrix."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L

from lightning_flat import functional as F
from lightning_flat._checks import check_choice, check_real
from lightning_flat.callbacks.base import MeasuringCallback

__all__ = ["Balancedness", "EffectiveRank", "MatrixNorms"]


def _weights(pl_module: L.LightningModule, who: str) -> list:
    if not callable(getattr(pl_module, "weights", None)):
        raise TypeError(
            f"{who} needs a module with weights() -> [W_1, ..., W_L] (the lightning_flat models have it), "
            f"got {type(pl_module).__name__}"
        )
    return pl_module.weights()


def _end_to_end(pl_module: L.LightningModule, who: str):
    if callable(getattr(pl_module, "end_to_end", None)):
        return pl_module.end_to_end()
    return F.end_to_end(_weights(pl_module, who))


class Balancedness(MeasuringCallback):
    r"""Log :math:`\sum_j\|W_{j+1}^\top W_{j+1} - W_jW_j^\top\|_F` every ``every_n_steps``.

    Logged keys: ``balance/total`` and, with ``per_layer=True``, ``balance/layer{j}`` for ``j = 1..L-1`` (the term
    between layers j and j+1). Note that the flattest factorization is *not* balanced for depth >= 3.
    """

    def __init__(self, every_n_steps: int = 100, per_layer: bool = False) -> None:
        super().__init__(every_n_steps)
        self.per_layer = bool(per_layer)

    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        weights = _weights(pl_module, "Balancedness")
        if any(weights[j].shape[-1] != weights[j - 1].shape[-2] for j in range(1, len(weights))):
            raise TypeError(f"Balancedness needs a chain of factors E = W_L ... W_1 (e.g. DeepLinearNet); "
                            f"{type(pl_module).__name__}'s weights are not one")
        terms = F.balancedness(weights, per_layer=True)
        out = {"balance/total": terms.sum(-1)}
        if self.per_layer:
            for j in range(terms.shape[-1]):
                out[f"balance/layer{j + 1}"] = terms[..., j]
        return out


class EffectiveRank(MeasuringCallback):
    r"""Log ranks of the end-to-end matrix ``E`` (and optionally of each factor) every ``every_n_steps``.

    ``kinds`` among ``"entropy"`` (exp of the entropy of the normalised singular values), ``"stable"``
    (:math:`\|E\|_F^2/\|E\|_2^2`) and ``"numerical"`` (:math:`\#\{s_k > \mathrm{tol}\cdot s_1\}`), see
    :func:`lightning_flat.functional.effective_rank`.

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
        self.layers = bool(layers)

    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        mats = {"end_to_end": _end_to_end(pl_module, "EffectiveRank")}
        if self.layers:
            for j, W in enumerate(_weights(pl_module, "EffectiveRank")):
                mats[f"layer{j + 1}"] = W
        out = {}
        for name, M in mats.items():
            for kind in self.kinds:
                out[f"rank/{self._NAMES[kind]}_{name}"] = F.effective_rank(M, kind, tol=self.tol)
        return out


class MatrixNorms(MeasuringCallback):
    r"""Log norms of the end-to-end matrix ``E`` every ``every_n_steps``.

    Logged keys: ``norm/nuclear`` (:math:`\|E\|_*`), ``norm/frobenius``, ``norm/spectral`` and
    ``norm/weights_sq`` (:math:`\sum_j\|W_j\|_F^2`, the ridge penalty without the :math:`\lambda/2`) when the module
    has ``weights()``.
    """

    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        E = _end_to_end(pl_module, "MatrixNorms")
        s = F.singular_values(E)
        out = {"norm/nuclear": s.sum(-1), "norm/frobenius": s.square().sum(-1).sqrt(), "norm/spectral": s[..., 0]}
        if callable(getattr(pl_module, "weights", None)):
            out["norm/weights_sq"] = sum(W.square().sum((-2, -1)) for W in pl_module.weights())
        return out
