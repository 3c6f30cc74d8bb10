"""The full runs' figure code, which the quick modes do not reach: each committed ``results_full`` is redrawn with
``--replot`` into a temporary folder (no training)."""

import os

import pytest
from helpers import ROOT, run_example

FULL = [
    ("gatmiry2023", "results.json", ["fig1_losses.png", "fig2_trace_nuclear.png"]),
    ("marion_chizat2024", "results.json", ["fig1_sweeps.png", "fig3_residual_sweeps.png", "fig1cd_trajectories.png"]),
    ("ding2022", "trials.json", ["fig3_recovery.png", "fig4_regularity.png"]),
]


@pytest.mark.parametrize("example, results, figures", FULL, ids=[f[0] for f in FULL])
def test_committed_full_results_redraw(example, results, figures, tmp_path):
    path = os.path.join(ROOT, "examples", example, "results_full", results)
    summary = run_example(f"{example}/run.py", ["--replot", path, "--out", str(tmp_path)])
    assert sorted(os.path.basename(p) for p in summary["figures"]) == sorted(figures)
    for name in figures:  # a drawn figure, not an empty canvas (the full figures are 50-250 kB)
        assert (tmp_path / name).stat().st_size > 20_000, name
