"""The benchmarks' --quick modes. The default suite checks what they compute (values against their references);
their speed ratios depend on the machine and its load, so they are printed by the benchmarks and asserted only
under the opt-in marker: ``pytest -m perf``."""

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
    # closed form vs the trace of the dense torch.func Hessian, float64: both sum O(10^3) terms of similar size, so
    # they agree to ~1e3 * eps = 2e-13; 1e-10 leaves room for the Hessian's own accumulation
    assert row["dense_rel_diff"] < 1e-10
    assert row["exact_direct_rel_diff"] < 1e-12  # two exact contractions of the same sums
    # a seeded Hutch++ estimate with 99 HVPs: its error is that of the mean of 33 residual Hutchinson probes, within 5
    # of their standard errors (a Student t tail of 2e-5 at 32 degrees of freedom)
    assert row["hutchpp_rel_err"] <= 5 * row["hutchpp_stderr_rel"]


@pytest.mark.slow
def test_step_overhead_quick():
    rows = load("step_overhead").main(["--quick"])
    for row in rows:
        # every contender ran the same SGD steps: the library's engine (analytic gradients, fused chunks) ends where
        # the hand-written autograd loop ends, up to rounding amplified over the run (see the benchmark's bound)
        assert row["max_rel_diff"] <= row["rounding_bound"], row
        assert row["default_equals_stepwise"]  # the same step function and update on both Lightning paths


@pytest.mark.slow
def test_sam_quick():
    result = load("sam").main(["--quick"])
    for row in result["per_example"]:
        assert row["rel_diff"] < 1e-12  # vmap 1-SAM = the per-example loop (same sums, float64)


@pytest.mark.slow
def test_replicas_quick():
    rows = load("replicas").main(["--quick"])
    for row in rows:
        # replica r vs its single run: batched and unbatched kernels round differently, and training amplifies it;
        # the bound is steps x the measured one-ulp sensitivity of replica r (first order), see the benchmark
        assert row["tolerance_ratio"] <= 1.0, row


@pytest.mark.slow
def test_curvature_generic_quick():
    result = load("curvature_generic").main(["--quick"])
    s, t = result["sharpness"], result["trace"]
    assert s["max_rel_diff"] < 1e-6  # warm and cold reads find the same eigenvalue (Lanczos tol 1e-8)
    assert s["warm_hvps"] <= s["cold_hvps"]
    assert t["hutch++"]["median_rel_err"] <= 0.05 and t["hutchinson"]["median_rel_err"] <= 0.05
    assert t["hutch++"]["hvps"] < t["hutchinson"]["hvps"]


@pytest.mark.slow
def test_curvature_reads_quick():
    result = load("curvature_reads").main(["--quick"])
    for row in result["rows"].values():
        # the same Hutch++ probes as hessian-eigenthings, products in blocks instead of one by one: float32 sums in
        # another order, ~1e-6 relative per product over a trace of a few hundred terms
        assert row["trace"]["same_probes_rel_diff"] < 1e-4
        # the read's Lanczos stops when its error bound is 1e-4: the actual error is below it (float32 products)
        assert row["top"]["cold"]["rel_err"] <= 1e-4 and row["top"]["warm"]["rel_err"] <= 1e-4
    assert all(v["seconds"] > 0 for k, v in result["overhead"].items() if isinstance(v, dict))


def test_measurements_quick():
    result = load("measurements").main(["--quick"])
    for row in result["predictions"]:
        # the same dot products of length D = d^2 <= 3600 summed in another order (another kernel): their rounding
        # errors add like a random walk, sqrt(D) eps of the largest prediction: 1.3e-14 in float64 (1e-12 is far
        # above it), 7e-6 in float32 (1e-5)
        assert row["rel_diff"] < (1e-5 if row["dtype"] == "float32" else 1e-12)


# ------------------------------------------------------------------------- opt-in speed checks (pytest -m perf)
@pytest.mark.perf
def test_speed_ratios():
    (trace,) = load("trace").main(["--quick"])
    assert trace["speedup_vs_hutchpp"] > 5 and trace["speedup_vs_dense"] > 50
    for row in load("measurements").main(["--quick"])["predictions"]:
        if row["replicas"] > 1:
            assert row["speedup"] > 1.5  # 3-4.5x in the full run
    for row in load("replicas").main(["--quick"]):
        assert row["speedup"] > 4
    sam = load("sam").main(["--quick"])
    assert all(row["speedup"] > 2.0 for row in sam["per_example"])
    for row in load("step_overhead").main(["--quick"]):
        assert row["default_ratio"] < 0.9 and row["stepwise_ratio"] < 2.0  # measured 0.81x and 1.61x at depth 5
    sweep = load("sweep").main(["--quick"])["short"]  # (its results are checked by tests/test_sweep_ray.py)
    assert sweep["same_results"] and sweep["ray_over_local"] <= 1.5
