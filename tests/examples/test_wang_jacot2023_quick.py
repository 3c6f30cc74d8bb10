"""The Wang & Jacot --quick reproduction: Q2-Q5 (rank jumps of SGD with weight decay, on the library's engine with
16 seeds as replicas), and its outputs."""

import math
import os

import pytest

from helpers import assert_replot, failed_checks, run_example


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("wang_jacot_quick")
    return run_example("wang_jacot2023/run.py", ["--quick", "--out", str(out)]), out


@pytest.mark.parametrize("prefix", ["Q2", "Q3", "Q4", "Q5"])
def test_acceptance_checks(quick, prefix):
    failed = failed_checks(quick[0], prefix)
    assert not failed, failed


def test_gradient_descent_reaches_the_rank2_minimum(quick):
    """Every GD run ends at s2/s1 = 0.3535, the rank-2 minimum of the depth-4, eps = 0.1, ridge 0.1 problem (computed
    independently by BFGS on E, see tests/functional/test_ridge.py); float32 training, so 1e-3."""
    summary, _ = quick
    final = summary["quick"]["gd"]["ratio"][-1]
    assert all(abs(r - 0.3535) <= 1e-3 for r in final)


def test_outputs(quick):
    summary, out = quick
    assert os.path.getsize(out / "fig_quick.png") > 10_000 and os.path.getsize(out / "results.json") > 1000
    assert len([d for d in os.listdir(out / "wandb") if d.startswith("offline-run-")]) == 5  # 4 trainings + report
    run = summary["quick"]["L4"]
    assert run["steps"][:3] == [0, 10, 20] and run["steps"][-1] == 4000 and len(run["ratio"][0]) == 16
    assert all(math.isfinite(x) for x in run["relerr"][-1])


def test_replot(quick, tmp_path):
    assert_replot("wang_jacot2023/run.py", quick[1] / "results.json", tmp_path, ["fig_quick.png"])


@pytest.mark.perf
def test_quick_runs_in_under_a_minute(tmp_path):
    """Wall time on this machine, as the example reports it (opt-in: pytest -m perf)."""
    summary = run_example("wang_jacot2023/run.py", ["--quick", "--out", str(tmp_path)])
    assert summary["seconds"] < 60
