"""Readable log axes and legends off the data (lightning_flat.plotting), against tick positions and labels worked
out by hand."""

import numpy as np
import pytest

from lightning_flat.plotting import (ReadableLogLocator, cell_heatmap, figure, figure_legend, legend_outside,
                                     log_axis, replica_series, save)


def in_view(lo, hi):
    ticks = ReadableLogLocator().tick_values(lo, hi)
    return [float(t) for t in ticks if lo <= t <= hi]


@pytest.mark.parametrize("lo, hi, want", [
    (2e-3, 5e2, [1e-2, 1e-1, 1.0, 1e1, 1e2]),  # five decades: the decades
    (2.6, 50.0, [5.0, 10.0, 20.0, 50.0]),  # one decade in view: 1, 2, 5 times the decades
])
def test_the_locator_gives_decades_or_one_two_five(lo, hi, want):
    assert in_view(lo, hi) == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("lo, hi", [(3.0, 6.0), (0.2, 0.45)])
def test_narrow_views_still_get_several_ticks(lo, hi):
    assert len(in_view(lo, hi)) >= 3  # narrower than a factor 2.5: finer multiples (matplotlib's own steps)


def test_wide_ranges_are_thinned_to_a_few_decades():
    ticks = in_view(1e-32, 1.0)
    exponents = np.log10(ticks)
    assert 3 <= len(ticks) <= 12 and np.allclose(exponents, np.round(exponents))


def labels(lo, hi):
    fig, axes = figure(1, 1)
    ax = axes[0, 0]
    ax.plot([1, 2], [lo, hi])
    log_axis(ax)
    ax.set_ylim(lo, hi)
    fig.canvas.draw()
    out = [t.get_text() for t in ax.get_yticklabels() if t.get_text() and lo <= t.get_position()[1] <= hi]
    import matplotlib.pyplot as plt

    plt.close(fig)
    return out


def test_labels_plain_within_four_decades_of_one_else_powers_of_ten():
    assert labels(2.6, 50.0) == ["5", "10", "20", "50"]
    assert labels(0.02, 0.3) == ["0.02", "0.05", "0.1", "0.2"]
    wide = labels(1e-9, 1.0)
    assert len(wide) >= 3 and all("10^{" in t for t in wide)  # mathtext 10^k


def test_legends_sit_outside_the_panels(tmp_path):
    fig, axes = figure(1, 2)
    for ax in axes[0]:
        replica_series(ax, [0, 1, 2], [[1.0, 2.0], [1.5, 2.5], [2.0, 3.0]], label="runs", color="k")
    leg = legend_outside(axes[0, 1])
    both = figure_legend(fig, axes[0, 0], axes[0, 1])
    fig.canvas.draw()
    box, panel = leg.get_window_extent(), axes[0, 1].get_window_extent()
    assert box.x0 >= panel.x1  # right of the panel, off its data
    assert [t.get_text() for t in both.get_texts()] == ["runs"]  # one entry per label across panels
    assert len(axes[0, 0].lines) == 2  # one curve per replica, labelled once
    assert [line.get_label() for line in axes[0, 0].lines][1].startswith("_")
    assert (tmp_path / "f.png").exists() is False and save(fig, tmp_path / "f.png").endswith("f.png")


def test_cell_heatmap_labels_ticks_by_value():
    fig, axes = figure(1, 1)
    ax = axes[0, 0]
    im = cell_heatmap(ax, [[0.0, 0.5, 1.0], [1.0, 1.0, 1.0]], [10, 20, 200], [5, 20], "m", "d", "t", vmin=0, vmax=1)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["10", "20", "200"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["5", "20"]
    assert im.get_array()[0, 1] == 0.5 and ax.get_title() == "t"  # row 0 (d = 5) is the bottom row, origin="lower"
    import matplotlib.pyplot as plt

    plt.close(fig)
