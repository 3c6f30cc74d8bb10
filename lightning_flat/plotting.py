"""Matplotlib figures shared by the examples: one style, theory lines drawn in, atomic PNG writes."""

from __future__ import annotations

import os
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator, NullFormatter, ScalarFormatter  # noqa: E402

__all__ = ["figure", "series", "reference", "save", "density_heatmap"]

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
        ax.yaxis.set_minor_formatter(NullFormatter())  # decades only: minor labels (2x10^0, ...) clutter
    ax.set_xlabel("step")
    # step counts up to 1e6 on narrow panels: few ticks, powers of ten in the offset label, so they never overlap
    ax.xaxis.set_major_locator(MaxNLocator(5, integer=True))
    fmt = ScalarFormatter(useMathText=True)
    fmt.set_powerlimits((-3, 4))
    ax.xaxis.set_major_formatter(fmt)


def reference(ax, y: float, label: str, color: str = COLORS["theory"], ls: str = "--"):
    """A horizontal theory or baseline line with its value in the legend."""
    ax.axhline(y, color=color, ls=ls, lw=1.0, label=f"{label} = {y:.4g}")


def density_heatmap(ax, densities, lines: dict[str, tuple[Sequence[float], Sequence[float]]] | None = None,
                    grid_points: int = 200, sigma: float | None = None, floor: float = 1e-4):
    """The Hessian eigenvalue density over training as a heatmap: one column per measured step (``densities``: the
    ``(step, nodes, weights)`` of :class:`~lightning_flat.callbacks.SpectralDensity`), each a sum of Gaussians of
    width ``sigma`` (default 1% of the eigenvalue range) on a common grid, on a log colour scale with its colorbar;
    ``lines`` adds curves over it, e.g. ``{"2/lr": (steps, values)}``. Returns the image."""
    import numpy as np
    from matplotlib.colors import LogNorm

    steps = np.array([d[0] for d in densities], dtype=float)
    nodes = [np.asarray(d[1], dtype=float) for d in densities]
    weights = [np.asarray(d[2], dtype=float) for d in densities]
    lo = min(float(n.min()) for n in nodes)
    hi = max(float(n.max()) for n in nodes)
    if lines:
        hi = max(hi, max(float(np.nanmax(v)) for _, v in lines.values()))
    pad = 0.05 * max(hi - lo, 1e-12)
    grid = np.linspace(lo - pad, hi + pad, grid_points)
    sigma = sigma or 0.01 * max(hi - lo, 1e-12)
    image = np.stack([(w[None, :] * np.exp(-0.5 * ((grid[:, None] - n[None, :]) / sigma) ** 2)).sum(1)
                      / (sigma * np.sqrt(2 * np.pi)) for n, w in zip(nodes, weights)], axis=1)
    top = image.max()
    edges = np.concatenate([[steps[0]], 0.5 * (steps[1:] + steps[:-1]), [steps[-1]]]) if len(steps) > 1 else \
        np.array([steps[0] - 0.5, steps[0] + 0.5])
    dy = grid[1] - grid[0]
    yedges = np.concatenate([grid - dy / 2, [grid[-1] + dy / 2]])
    im = ax.pcolormesh(edges, yedges, np.maximum(image, floor * top), norm=LogNorm(vmin=floor * top, vmax=top),
                       cmap="magma", shading="flat")
    ax.figure.colorbar(im, ax=ax, label="eigenvalue density (log scale)")
    for (label, (x, y)), color in zip((lines or {}).items(), ("cyan", "lime", "white")):
        ax.plot(x, y, color=color, lw=1.2, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("Hessian eigenvalue")
    if lines:
        ax.legend(fontsize=8, loc="upper left")
    return im


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
