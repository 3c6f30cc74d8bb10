"""Matplotlib figures shared by the examples: one style, theory lines drawn in, atomic PNG writes."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import (  # noqa: E402
    LogFormatterSciNotation,
    LogLocator,
    MaxNLocator,
    NullFormatter,
    ScalarFormatter,
)

__all__ = ["figure", "series", "replica_series", "reference", "save", "cell_heatmap", "density_heatmap", "log_axis",
           "legend_outside", "figure_legend", "ReadableLogLocator", "ReadableLogFormatter"]

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


class ReadableLogLocator(LogLocator):
    """Log ticks that always give a few labels: the decades where at least two lie in view; else 1, 2 and 5 times
    the decades; else every integer multiple (a view narrower than a factor 2.5)."""

    def __init__(self, numticks: int | None = None) -> None:
        super().__init__(base=10.0, numticks=numticks)

    def tick_values(self, vmin, vmax):
        import numpy as np

        lo, hi = sorted((vmin, vmax))
        ticks = super().tick_values(vmin, vmax)
        for subs in ((1.0, 2.0, 5.0), np.arange(1.0, 10.0)):
            if ((ticks >= lo) & (ticks <= hi)).sum() >= 2:
                break
            ticks = LogLocator(base=10.0, subs=subs, numticks=self.numticks).tick_values(vmin, vmax)
        return ticks


class ReadableLogFormatter(LogFormatterSciNotation):
    """Labels every tick it is given ([`ReadableLogLocator`][lightning_flat.plotting.ReadableLogLocator] chooses few):
    plain numbers (0.05, 2, 500) when the whole view lies within [0.01, 10^4], else powers of ten as 10^k and other
    ticks as a x 10^k."""

    def __init__(self) -> None:
        super().__init__(labelOnlyBase=False, minor_thresholds=(math.inf, math.inf))

    def __call__(self, x, pos=None):
        lo, hi = sorted(self.axis.get_view_interval()) if self.axis is not None else (x, x)
        if 1e-2 <= lo and hi <= 1e4:
            return f"{x:g}"
        return super().__call__(x, pos)


def log_axis(ax, axis: str = "y") -> None:
    """Put ``ax``'s ``axis`` (``"x"`` or ``"y"``) on a log scale with readable ticks: at least two labels whatever
    the range ([`ReadableLogLocator`][lightning_flat.plotting.ReadableLogLocator],
    [`ReadableLogFormatter`][lightning_flat.plotting.ReadableLogFormatter]), unlabelled minor ticks."""
    getattr(ax, f"set_{axis}scale")("log")
    target = ax.yaxis if axis == "y" else ax.xaxis
    target.set_major_locator(ReadableLogLocator())
    target.set_major_formatter(ReadableLogFormatter())
    target.set_minor_formatter(NullFormatter())


def legend_outside(ax, **kwargs):
    """The legend of ``ax`` to the right of its panel, off the data (constrained layout makes room for it)."""
    kwargs.setdefault("fontsize", 7)
    return ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, **kwargs)


def figure_legend(fig, *axes, where: str = "lower center", ncol: int | None = None, **kwargs):
    """One legend for the whole figure, outside every panel (``where``: ``"lower center"``, ``"right upper"``,
    ...), from the labelled artists of ``axes`` (each label once)."""
    entries: dict[str, object] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    kwargs.setdefault("fontsize", 8)
    return fig.legend(list(entries.values()), list(entries), loc=f"outside {where}",
                      ncol=ncol or min(len(entries), 4), **kwargs)


def series(ax, steps: Sequence[float], values: Sequence[float], label: str | None = None, logy: bool = False,
           **kwargs):
    """A training curve against the optimizer step."""
    kwargs.setdefault("lw", 1.2)
    ax.plot(steps, values, label=label, **kwargs)
    if logy:
        log_axis(ax, "y")
    ax.set_xlabel("step")
    # step counts up to 1e6 on narrow panels: few ticks, powers of ten in the offset label, so they never overlap
    ax.xaxis.set_major_locator(MaxNLocator(5, integer=True))
    fmt = ScalarFormatter(useMathText=True)
    fmt.set_powerlimits((-3, 4))
    ax.xaxis.set_major_formatter(fmt)


def replica_series(ax, steps: Sequence[float], rows: Sequence[Sequence[float]], replicas: Sequence[int] | None = None,
                   label: str | None = None, logy: bool = False, **kwargs):
    """One curve per replica from per-step rows of per-replica values (as in a callback's ``replica_history``):
    those of ``replicas`` (default all), labelled once, in one style."""
    for i, r in enumerate(range(len(rows[0])) if replicas is None else replicas):
        series(ax, steps, [row[r] for row in rows], label=label if i == 0 else None, logy=logy, **kwargs)


def reference(ax, y: float, label: str, color: str = COLORS["theory"], ls: str = "--"):
    """A horizontal theory or baseline line with its value in the legend."""
    ax.axhline(y, color=color, ls=ls, lw=1.0, label=f"{label} = {y:.4g}")


def cell_heatmap(ax, values, xs: Sequence[float], ys: Sequence[float], xlabel: str, ylabel: str,
                 title: str | None = None, **kwargs):
    """One value per cell of a grid as a heatmap: ``values[i][j]`` at row ``ys[i]`` (up the vertical axis) and
    column ``xs[j]``, each tick labelled by its value, whatever the spacing. ``kwargs`` go to ``imshow`` (``cmap``,
    ``vmin``, ...). Returns the image (for a colorbar)."""
    im = ax.imshow(values, origin="lower", aspect="auto", extent=(-0.5, len(xs) - 0.5, -0.5, len(ys) - 0.5),
                   **kwargs)
    ax.set_xticks(range(len(xs)))
    ax.set_xticklabels([f"{x:g}" for x in xs], fontsize=6, rotation=90)
    ax.set_yticks(range(len(ys)))
    ax.set_yticklabels([f"{y:g}" for y in ys])
    ax.set_xlabel(xlabel), ax.set_ylabel(ylabel), ax.grid(False)
    if title:
        ax.set_title(title, fontsize=9)
    return im


def density_heatmap(ax, densities, lines: dict[str, tuple[Sequence[float], Sequence[float]]] | None = None,
                    grid_points: int = 200, sigma: float | None = None, floor: float = 1e-4):
    """The Hessian eigenvalue density over training as a heatmap: one column per measured step (``densities``: the
    ``(step, nodes, weights)`` of [`SpectralDensity`][lightning_flat.callbacks.SpectralDensity]), each a sum of
    Gaussians of width ``sigma`` (default 1% of the eigenvalue range) on a common grid, on a log colour scale with its
    colorbar; ``lines`` adds curves over it, e.g. ``{"2/lr": (steps, values)}``. Returns the image."""
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
    """Write the figure as PNG atomically ([`lightning_flat.io.atomic_path`][lightning_flat.io.atomic_path]), so a crash
    never leaves a broken file."""
    from lightning_flat.io import atomic_path

    try:
        with atomic_path(path, ".png") as tmp:
            fig.savefig(tmp, dpi=120, format="png")
    finally:
        plt.close(fig)
    return os.fspath(path)
