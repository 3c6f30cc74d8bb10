"""The Gatmiry et al. --quick reproduction: Q1-Q4 on the library's own Trainer-based training."""

import glob
import os

import pytest

from helpers import run_example


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("gatmiry_quick")
    summary = run_example("gatmiry2023/run.py", ["--quick", "--out", str(out), "--no-progress"])
    return summary, out


def check(summary, prefix):
    rows = [c for c in summary["checks"] if c["name"].startswith(prefix)]
    assert rows, prefix
    return rows


@pytest.mark.parametrize("prefix", ["Q1", "Q2", "Q3", "Q4"])
def test_acceptance_checks(quick, prefix):
    summary, _ = quick
    failed = [f"{c['name']}: {c['value']:.4g}" for c in check(summary, prefix) if not c["passed"]]
    assert not failed, failed


def test_every_artifact_is_listed_with_its_path(quick):
    summary, out = quick
    written = summary["written"]
    assert all(os.path.exists(p) for p in written), written
    names = {os.path.relpath(p.rstrip(os.sep), out).split(os.sep)[0] for p in written}
    assert names == set(os.listdir(out))  # nothing in the output folder goes unlisted
    wandb_runs = [p for p in written if "offline-run-" in p]
    # a label-noise and a plain run per depth, and the report
    assert len(wandb_runs) == 2 * len(summary["runs"]) + 1 and len(set(wandb_runs)) == len(wandb_runs)


def test_values_against_calibration(quick):
    summary, _ = quick
    assert summary["X_rel_err"] < 1e-6 and 1.0 < summary["X_nuclear"] < 3.0  # ||M*||_* ~ 1.8 for r=2, d=20
    ln2 = summary["runs"]["2"]["label_noise"]["final"]
    pl2 = summary["runs"]["2"]["plain"]["final"]
    assert pl2["train_loss"] < 1e-8 and ln2["trace"] < pl2["trace"]
    assert 0.995 <= ln2["nuclear"] / summary["X_nuclear"] <= 1.03
    assert 0.9 <= ln2["trace"] / summary["F_hat"][2] <= 1.1


def test_outputs(quick):
    summary, out = quick
    for name in ("fig1_losses.png", "fig2_trace_nuclear.png", "results.json"):
        assert os.path.getsize(out / name) > 1000
    # a label-noise and a plain run per depth, and the report
    assert len(glob.glob(str(out / "wandb" / "offline-run-*"))) == 2 * len(summary["runs"]) + 1


def test_replot_redraws_from_results_json(quick, tmp_path):
    _, out = quick
    summary = run_example("gatmiry2023/run.py", ["--replot", str(out / "results.json"), "--out",
                                                           str(tmp_path)])
    assert sorted(os.path.basename(p) for p in summary["figures"]) == ["fig1_losses.png", "fig2_trace_nuclear.png"]
    for p in summary["figures"]:
        assert os.path.dirname(p) == str(tmp_path) and os.path.getsize(p) > 1000
    assert summary["checks"] == [] and "runs" not in summary  # figures only: no training, no solve


@pytest.mark.perf
def test_quick_runs_in_under_a_minute(tmp_path):
    """Wall time on this machine, as the example reports it (opt-in: pytest -m perf); the default suite checks values
    only."""
    summary = run_example("gatmiry2023/run.py", ["--quick", "--out", str(tmp_path), "--no-progress"])
    assert summary["seconds"] < 60
