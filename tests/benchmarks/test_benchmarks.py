"""The benchmarks' --quick modes: their numbers are checked for correctness, their speed ratios loosely (CI
machines are shared; the closing notes quote the full runs)."""

import importlib.util
import os

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks")


def load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(ROOT, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_trace_quick():
    (row,) = load("trace").main(["--quick"])
    assert row["dense_rel_diff"] < 1e-10  # exact closed form = trace of the dense torch.func Hessian
    assert row["exact_direct_rel_diff"] < 1e-12
    assert row["hutchpp_rel_err"] < 0.2
    assert row["speedup_vs_hutchpp"] > 5
    assert row["speedup_vs_dense"] > 50


@pytest.mark.slow
def test_step_overhead_quick():
    (row,) = load("step_overhead").main(["--quick"])
    assert row["plain_us"] > 0 and row["ours_us"] > 0
    assert row["ratio"] < 3.0


@pytest.mark.slow
def test_sam_quick():
    result = load("sam").main(["--quick"])
    for row in result["per_example"]:
        assert row["rel_diff"] < 1e-12  # vmap 1-SAM = the per-example loop
        assert row["speedup"] > 2.0
    steps = result["step_us"]
    assert steps["n-SAM"] > steps["SGD"]


@pytest.mark.slow
def test_replicas_quick():
    rows = load("replicas").main(["--quick"])
    wj, mc = rows
    assert wj["max_abs_diff"] < 1e-5 and mc["max_abs_diff"] < 1e-9  # the replicas are the single runs
    assert wj["speedup"] > 4 and mc["speedup"] > 4  # >= 10x in the full benchmark; loose for a shared CI machine


@pytest.mark.slow
def test_curvature_generic_quick():
    result = load("curvature_generic").main(["--quick"])
    s, t = result["sharpness"], result["trace"]
    assert s["max_rel_diff"] < 1e-6  # warm and cold reads find the same eigenvalue
    assert s["warm_hvps"] <= s["cold_hvps"]
    assert t["hutch++"]["median_rel_err"] <= 0.05 and t["hutchinson"]["median_rel_err"] <= 0.05
    assert t["hutch++"]["hvps"] < t["hutchinson"]["hvps"]


def test_measurements_quick():
    result = load("measurements").main(["--quick"])
    for row in result["predictions"]:
        assert row["rel_diff"] < (1e-5 if row["dtype"] == "float32" else 1e-12)
        if row["replicas"] > 1:
            assert row["speedup"] > 1.5  # 3-4.5x in the full run
