"""Acceptance checks as a declarative table.

An example states what its runs must show as a list of [`Check`][lightning_flat.experiments.checks.Check] rows: a
printed name, the claim in words, how to read the measured value from the results, the comparison and the expected
value. [`evaluate`][lightning_flat.experiments.checks.evaluate] runs a table against the results, prints one
``[PASS]``/``[FAIL]`` line per row and returns the rows as plain dicts (for ``results.json`` and
[`lightning_flat.loggers.wandb_report`][lightning_flat.loggers.wandb_report]).

    table = [
        Check("2 E1: runs that jump by step 6000 (>= 6/16)", "SGD jumps to rank 1 in most runs",
              jumps_by_6000, ">=", 6),
        Check("5 sigma=0.25: S/S_min^a in [1, 1.5] (max)", "the final sharpness sits near its lower bound",
              ratios_to_bound, "in", (1, 1.5), show=max),
    ]
    rows = evaluate(table, results)

``value`` is a function of the results, or a path of keys into them (``"e5/a/drift"``, ``"q5/distance/0"``: ``/``
separates the keys; a whole number indexes a list). The value read is a number, a bool (for ``"true"``), or a
sequence of numbers: then every element must pass (an empty one
fails: nothing was measured) and ``show`` picks the number that is printed. A value may come as a
[`Reading`][lightning_flat.experiments.checks.Reading] whose fields fill the ``{placeholders}`` of the name (counts that
only the results know). ``expected`` may be a function of the results (a bound that the run itself measured).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Check", "Reading", "evaluate", "format_check", "nan_median", "read_path", "run_check", "spearman"]

_COMPARE = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "==": operator.eq}
TESTS = (*_COMPARE, "in", "true")
_SHOW = {"max": max, "min": min, "first": lambda xs: xs[0]}


class Reading:
    """A measured value with named fields for the check's name, e.g. ``Reading(len(bad), of=len(runs))``."""

    def __init__(self, value: Any, **fields: Any) -> None:
        self.value, self.fields = value, fields

    def __repr__(self) -> str:
        return f"Reading({self.value!r}, {self.fields!r})"


@dataclass(frozen=True)
class Check:
    """One row of a check table.

    Attributes:
        name: the printed name (``str.format`` placeholders are filled from a
            [`Reading`][lightning_flat.experiments.checks.Reading]'s fields).
        claim: what the row asserts, in words.
        value: ``results -> value`` (a number, a bool, a sequence of numbers, or a
            [`Reading`][lightning_flat.experiments.checks.Reading] of one), or a path of keys, ``"a/b/0"``.
        test: ``"<"``, ``"<="``, ``">"``, ``">="``, ``"=="`` (value against ``expected``), ``"in"`` (``expected``
            is a closed interval ``(lo, hi)``) or ``"true"`` (the value is a truth; ``expected`` unused).
        expected: the threshold or interval, or ``results -> threshold``.
        show: for a sequence, the printed number: ``max``, ``min``, ``"first"`` or any ``list -> float`` (default:
            the largest for ``<``/``<=``, the smallest for ``>``/``>=``; required otherwise).
    """

    name: str
    claim: str
    value: Callable[[Any], Any] | str
    test: str
    expected: Any = None
    show: Any = None

    def __post_init__(self) -> None:
        if self.test not in TESTS:
            raise ValueError(f"test must be one of {TESTS}, got {self.test!r}")
        if self.test != "true" and self.expected is None:
            raise ValueError(f"check {self.name!r}: test {self.test!r} needs an expected value")
        if self.test == "in" and not callable(self.expected) and len(self.expected) != 2:
            raise ValueError(f"check {self.name!r}: 'in' needs an interval (lo, hi), got {self.expected!r}")


def _passes(test: str, x: Any, expected: Any) -> bool:
    if test == "true":
        return bool(x)
    if test == "in":
        lo, hi = expected
        return bool(lo <= x <= hi)
    return bool(_COMPARE[test](x, expected))


def _shown(check: Check, xs: list) -> float:
    show = check.show
    if show is None:
        show = {"<": max, "<=": max, ">": min, ">=": min}.get(check.test)
        if show is None:
            raise ValueError(f"check {check.name!r}: a sequence with test {check.test!r} needs show=")
    show = _SHOW.get(show, show)
    return float(show(xs)) if xs else math.nan


def read_path(results: Any, path: str) -> Any:
    """``results[k1][k2]...`` for the path ``"k1/k2/..."`` (a key that reads as an int indexes a list)."""
    out = results
    for key in path.split("/"):
        out = out[int(key)] if isinstance(out, Sequence) and not isinstance(out, str) else out[key]
    return out


def run_check(check: Check, results: Any) -> dict[str, Any]:
    """One row evaluated: ``{"name", "value", "passed", "claim"}``."""
    reading = read_path(results, check.value) if isinstance(check.value, str) else check.value(results)
    fields = {}
    if isinstance(reading, Reading):
        reading, fields = reading.value, reading.fields
    expected = check.expected(results) if callable(check.expected) else check.expected
    if isinstance(reading, Sequence) and not isinstance(reading, str):
        xs = list(reading)
        passed = bool(xs) and all(_passes(check.test, x, expected) for x in xs)
        value = _shown(check, xs)
    else:
        passed = _passes(check.test, reading, expected)
        value = float(reading)
    name = check.name.format(**fields) if fields else check.name
    return dict(name=name, value=value, passed=passed, claim=check.claim)


def format_check(row: dict[str, Any]) -> str:
    """The printed line of an evaluated row: ``  [PASS] name: value`` (4 significant digits)."""
    return f"  [{'PASS' if row['passed'] else 'FAIL'}] {row['name']}: {row['value']:.4g}"


def evaluate(table: Sequence[Check], results: Any, title: str | None = "checks:", echo: bool = True
             ) -> list[dict[str, Any]]:
    """Evaluate every row of ``table`` against ``results`` in order, print them (after a blank line and ``title``)
    unless ``echo`` is false, and return the rows as dicts ``{"name", "value", "passed", "claim"}``."""
    rows = [run_check(check, results) for check in table]
    if echo:
        if title is not None:
            print(f"\n{title}")
        for row in rows:
            print(format_check(row))
    return rows


def nan_median(xs: Sequence[float]) -> float:
    """The median of the values that are not NaN (the mean of the two middle ones for an even count); NaN if none."""
    xs = sorted(x for x in xs if x == x)
    if not xs:
        return math.nan
    m = len(xs) // 2
    return xs[m] if len(xs) % 2 else 0.5 * (xs[m - 1] + xs[m])


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation of two sequences without ties: the Pearson correlation of their ranks."""
    import numpy as np

    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])
