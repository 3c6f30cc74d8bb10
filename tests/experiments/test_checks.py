"""The check table helper: each comparison, sequences, readings, paths, the printed lines and the statistics,
against values worked out by hand."""

import math

import numpy as np
import pytest

from lightning_flat.experiments.checks import Check, Reading, evaluate, format_check, nan_median, read_path, spearman

RESULTS = {"e5": {"a": {"drift": 2.0, "eps": 0.5}}, "runs": [3.0, 1.0, 2.0], "flag": True, "0.02": {"s": [4.0, 5.0]}}


@pytest.mark.parametrize("test, expected, value, passed", [
    ("<", 2.0, 1.0, True), ("<", 1.0, 1.0, False), ("<=", 1.0, 1.0, True), (">", 1.0, 1.0, False),
    (">=", 1.0, 1.0, True), ("==", 0, 0.0, True), ("==", 0, 1e-300, False), ("in", (1.0, 2.0), 2.0, True),
    ("in", (1.0, 2.0), 2.5, False), ("<", 1.0, math.nan, False), ("in", (0.0, 1.0), math.nan, False),
])
def test_each_comparison(test, expected, value, passed):
    row = evaluate([Check("c", "claim", lambda r: value, test, expected)], {}, echo=False)[0]
    assert row["passed"] is passed and (row["value"] == value or math.isnan(value))
    assert row["claim"] == "claim"


def test_truth_values_print_as_numbers():
    rows = evaluate([Check("yes", "", lambda r: True, "true"), Check("no", "", lambda r: False, "true")], {},
                    echo=False)
    assert [(r["value"], r["passed"]) for r in rows] == [(1.0, True), (0.0, False)]


def test_sequences_pass_when_every_element_does_and_print_the_worst_or_the_chosen_one():
    xs = lambda r: [0.5, 0.9, 0.2]  # noqa: E731
    below = evaluate([Check("c", "", xs, "<", 1.0)], {}, echo=False)[0]
    assert below["passed"] and below["value"] == 0.9  # an upper bound prints the largest
    above = evaluate([Check("c", "", xs, ">", 0.3)], {}, echo=False)[0]
    assert not above["passed"] and above["value"] == 0.2  # a lower bound prints the smallest, the failing one
    chosen = evaluate([Check("c", "", xs, "in", (0.1, 1.0), show=lambda v: sum(v))], {}, echo=False)[0]
    assert chosen["passed"] and chosen["value"] == pytest.approx(1.6, abs=1e-15)
    first = evaluate([Check("c", "", xs, "in", (0.1, 1.0), show="first")], {}, echo=False)[0]
    assert first["value"] == 0.5
    empty = evaluate([Check("c", "", lambda r: [], "<", 1.0)], {}, echo=False)[0]
    assert not empty["passed"] and math.isnan(empty["value"])  # nothing measured: no pass
    with pytest.raises(ValueError, match="needs show="):
        evaluate([Check("c", "", xs, "in", (0, 1))], {}, echo=False)


def test_readings_fill_the_name_and_expected_values_may_come_from_the_results():
    check = Check("violations of {n} runs ({eps:.3g})", "", lambda r: Reading(0, n=len(r["runs"]), eps=1 / 3),
                  "<=", lambda r: r["e5"]["a"]["eps"])
    row = evaluate([check], RESULTS, echo=False)[0]
    assert row == dict(name="violations of 3 runs (0.333)", value=0.0, passed=True, claim="")


def test_paths_read_nested_keys_and_list_indices():
    assert read_path(RESULTS, "e5/a/drift") == 2.0 and read_path(RESULTS, "runs/-1") == 2.0
    assert read_path(RESULTS, "0.02/s/1") == 5.0  # a key with a dot is one key
    row = evaluate([Check("drift", "", "e5/a/drift", "in", (1.5, 2.5))], RESULTS, echo=False)[0]
    assert row["passed"] and row["value"] == 2.0


def test_the_printed_table(capsys):
    rows = evaluate([Check("first", "", "runs/0", ">=", 3), Check("second", "", "runs/1", ">", 3)], RESULTS)
    assert capsys.readouterr().out == "\nchecks:\n  [PASS] first: 3\n  [FAIL] second: 1\n"
    assert format_check(dict(name="x", value=3.50123e-5, passed=True)) == "  [PASS] x: 3.501e-05"
    evaluate([Check("first", "", "runs/0", ">=", 3)], RESULTS, title=None)
    assert capsys.readouterr().out == "  [PASS] first: 3\n"
    assert [r["passed"] for r in rows] == [True, False]


def test_bad_rows_are_refused_when_written():
    with pytest.raises(ValueError, match="test must be one of"):
        Check("c", "", "a", "~", 1)
    with pytest.raises(ValueError, match="needs an expected value"):
        Check("c", "", "a", "<")
    with pytest.raises(ValueError, match="needs an interval"):
        Check("c", "", "a", "in", (1, 2, 3))


def test_nan_median_against_numpy():
    for xs in ([3.0, 1.0, 2.0], [4.0, 1.0, 3.0, 2.0], [math.nan, 5.0, 1.0], [7.0]):
        assert nan_median(xs) == float(np.nanmedian(xs))  # the mean of the middle two for an even count
    assert math.isnan(nan_median([])) and math.isnan(nan_median([math.nan]))


def test_spearman_by_hand():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0, abs=1e-15)
    assert spearman([1, 2, 3, 4], [40, 30, 20, 10]) == pytest.approx(-1.0, abs=1e-15)
    # ranks (0, 1, 2, 3) and (1, 0, 3, 2): 1 - 6 sum d^2 / (n (n^2 - 1)) = 1 - 6 * 4 / 60 = 0.6
    assert spearman([1, 2, 3, 4], [2, 1, 4, 3]) == pytest.approx(0.6, abs=1e-15)
