"""Lay out a grid of seeds x hyperparameters as the replicas of one model, and read results back as a table."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch  # noqa: F401  (used by the doctest)
from torch import Tensor

__all__ = ["ReplicaGrid"]


class ReplicaGrid:
    """The rows of ``seeds x axis_1 x axis_2 x ...`` (seed varying slowest), one replica each.

    ``model_kwargs()`` gives what a lightning_flat model takes to train them all at once (``replicas``, ``seed``,
    and each axis as a per-replica list, e.g. ``lr``, ``weight_decay``, ``init_scale``); ``table(**values)`` puts
    per-replica results next to the grid's columns (a dict of lists, or a pandas DataFrame with ``to_dataframe``).

    Examples:
        >>> grid = ReplicaGrid(seeds=[0, 1], lr=[0.1, 0.01])
        >>> len(grid), grid.model_kwargs()
        (4, {'replicas': 4, 'seed': [0, 0, 1, 1], 'lr': [0.1, 0.01, 0.1, 0.01]})
        >>> grid.table(loss=torch.tensor([1.0, 2.0, 3.0, 4.0]))["loss"]
        [1.0, 2.0, 3.0, 4.0]
    """

    def __init__(self, seeds: Sequence[int], **axes: Sequence[Any]) -> None:
        if isinstance(seeds, int) or len(seeds) == 0:
            raise ValueError(f"seeds must be a non-empty list of ints, got {seeds!r}")
        for name, values in axes.items():
            if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) == 0:
                raise ValueError(f"{name} must be a non-empty list of values, got {values!r}")
        self.axes = {"seed": [int(s) for s in seeds], **{k: list(v) for k, v in axes.items()}}
        self.rows = [dict(zip(self.axes, combo)) for combo in itertools.product(*self.axes.values())]

    def __len__(self) -> int:
        return len(self.rows)

    def column(self, name: str) -> list[Any]:
        return [row[name] for row in self.rows]

    def model_kwargs(self) -> dict[str, Any]:
        return {"replicas": len(self), **{name: self.column(name) for name in self.axes}}

    def table(self, **values: Tensor | Sequence[float]) -> dict[str, list[Any]]:
        """The grid's columns plus one column per named per-replica result (tensors ``(R,)`` or lists)."""
        out = {name: self.column(name) for name in self.axes}
        for key, v in values.items():
            v = v.detach().cpu().tolist() if isinstance(v, Tensor) else list(v)
            if len(v) != len(self):
                raise ValueError(f"{key} has {len(v)} values, the grid has {len(self)} replicas")
            out[key] = v
        return out

    def to_dataframe(self, **values: Tensor | Sequence[float]):
        """[`table`][lightning_flat.engine.ReplicaGrid.table] as a pandas DataFrame (pandas must be installed)."""
        import pandas as pd

        return pd.DataFrame(self.table(**values))
