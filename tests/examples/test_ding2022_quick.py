"""The Ding et al. --quick reproduction: Q2 and Q3."""

import os

import pytest

from helpers import run_example


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("ding_quick")
    summary = run_example("ding2022/run.py", ["--quick", "--out", str(out), "--no-progress"])
    return summary, out


@pytest.mark.parametrize("prefix", ["Q2", "Q3"])
def test_acceptance_checks(quick, prefix):
    summary, _ = quick
    rows = [c for c in summary["checks"] if c["name"].startswith(prefix)]
    assert rows
    failed = [f"{c['name']}: {c['value']:.4g}" for c in rows if not c["passed"]]
    assert not failed, failed


def test_outputs(quick):
    summary, out = quick
    for name in ("fig3_recovery.png", "fig4_regularity.png", "trials.json"):
        assert os.path.getsize(out / name) > 1000


def test_replot_recomputes_grid_checks_from_trials_json(quick, tmp_path):
    summary, out = quick
    again = run_example("ding2022/run.py", ["--replot", str(out / "trials.json"), "--out", str(tmp_path)])
    grid = {c["name"]: c for c in summary["checks"] if c["name"].startswith("Q2")}
    assert grid and {c["name"]: c for c in again["checks"]} == grid  # same values, no solve
    for p in again["figures"]:
        assert os.path.dirname(p) == str(tmp_path) and os.path.getsize(p) > 1000


@pytest.mark.perf
def test_quick_runs_in_under_a_minute(tmp_path):
    """Wall time on this machine, as the example reports it (opt-in: pytest -m perf); the default suite checks values
    only."""
    summary = run_example("ding2022/run.py", ["--quick", "--out", str(tmp_path), "--no-progress"])
    assert summary["seconds"] < 60


def test_full_v3_rows_read_their_own_setting():
    """Each setting's check-7 rows read that setting's fits (a row's lambda must not read the loop's last setting):
    fed distinct values per setting, each row's value is the one of the setting it names."""
    import importlib.util

    from helpers import ROOT

    spec = importlib.util.spec_from_file_location("ding_checks", os.path.join(ROOT, "examples", "ding2022", "run.py"))
    ding = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ding)
    names = ("sensing", "bilinear", "completion")
    flat = {name: 10.0 ** -(k + 2) for k, name in enumerate(names)}  # 1e-2, 1e-3, 1e-4: told apart exactly
    fits = {name: {label: {"flat": flat[name], "nuc": 1.0, "gradient": flat[name]}
                   for label in ("trace 1e-4", "trace 1e-5", "weight decay")} for name in names}
    r = {"v3": {name: dict(fits[name], seed=k) for k, name in enumerate(names)}}
    for check in ding.v3_checks(False)[:-2]:
        name = next(n for n in names if f"V3 {n}" in check.name)
        value = check.value(r)
        value = getattr(value, "value", value)
        if "rel(E, X_flat) <=" in check.name or "gradient norm" in check.name:
            assert value == flat[name], check.name
        elif "rel(E, X_nuc) >= 3" in check.name:
            assert value == 1.0 / flat[name], check.name
