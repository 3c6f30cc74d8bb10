"""The Marion & Chizat --quick reproduction: Q2-Q8 on the library's engine (full-batch GD, replicas, exact Hessians),
and the library values it rests on against independent computations."""

import os

import pytest

from helpers import assert_replot, failed_checks, run_example


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("marion_chizat_quick")
    return run_example("marion_chizat2024/run.py", ["--quick", "--out", str(out)]), out


@pytest.mark.parametrize("prefix", ["Q2", "Q3", "Q4", "Q5", "Q6", "Q7", "Q8"])
def test_acceptance_checks(quick, prefix):
    failed = failed_checks(quick[0], prefix)
    assert not failed, failed


def test_constants_and_outputs(quick):
    summary, out = quick
    c = summary["constants"]["10"]
    assert 0.85 <= c["a"] <= 1.15  # the quick data seed makes 2/eta comparable with S_min^a = 2 L a
    assert abs(c["S_min_a"] - 2 * 10 * c["a"]) < 1e-12 * c["S_min_a"] and c["S_min"] <= c["S_min_a"] <= c["UB"]
    for name in ("fig1cd_trajectories.png", "results.json"):
        assert os.path.getsize(out / name) > 1000
    assert len([d for d in os.listdir(out / "wandb") if d.startswith("offline-run-")]) >= 5


def test_replot(quick, tmp_path):
    assert_replot("marion_chizat2024/run.py", quick[1] / "results.json", tmp_path, ["fig1cd_trajectories.png"])


@pytest.mark.perf
def test_quick_runs_in_under_a_minute(tmp_path):
    """Wall time on this machine, as the example reports it (opt-in: pytest -m perf)."""
    summary = run_example("marion_chizat2024/run.py", ["--quick", "--out", str(tmp_path)])
    assert summary["seconds"] < 60
