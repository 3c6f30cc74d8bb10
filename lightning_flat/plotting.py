"""Matplotlib figures shared by the examples: one style, theory lines drawn in, atomic PNG writes."""

from __future__ import annotations

import os
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator, ScalarFormatter  # noqa: E402

__all__ = ["figure", "series", "reference", "save"]

COLORS = {"label_noise": "tab:blue", "plain": "tab:orange", "theory": "k", "baseline": "tab:green"}


def figure(nrows: int, ncols: int, size: tuple[float, float] = (4.0, 3.0), title: str | None = None):
    """A grid of panels with the project style; returns ``(fig, axes)`` with ``axes`` always 2-D."""
    fig, axes = plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False,
                             constrained_layout=True)
    for ax in axes.flat:
        ax.grid(True, alpha=0.3)
    if title:
        fig.suptitle(title)
    return fig, axes


def series(ax, steps: Sequence[float], values: Sequence[float], label: str | None = None, logy: bool = False,
           **kwargs):
    """A training curve against the optimizer step."""
    kwargs.setdefault("lw", 1.2)
    ax.plot(steps, values, label=label, **kwargs)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    # step counts up to 1e6 on narrow panels: few ticks, powers of ten in the offset label, so they never overlap
    ax.xaxis.set_major_locator(MaxNLocator(5, integer=True))
    fmt = ScalarFormatter(useMathText=True)
    fmt.set_powerlimits((-3, 4))
    ax.xaxis.set_major_formatter(fmt)


def reference(ax, y: float, label: str, color: str = COLORS["theory"], ls: str = "--"):
    """A horizontal theory or baseline line with its value in the legend."""
    ax.axhline(y, color=color, ls=ls, lw=1.0, label=f"{label} = {y:.4g}")


def save(fig, path: str | os.PathLike) -> str:
    """Write the figure as PNG atomically (:func:`lightning_flat.io.atomic_path`), so a crash never leaves a broken
    file."""
    from lightning_flat.io import atomic_path

    try:
        with atomic_path(path, ".png") as tmp:
            fig.savefig(tmp, dpi=120, format="png")
    finally:
        plt.close(fig)
    return os.fspath(path)
