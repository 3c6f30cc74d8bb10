"""Tests for :func:`lightning_flat.baselines.min_nuclear_norm` on small float64 problems (d = 5..12)."""

from __future__ import annotations

import cvxpy as cp
import pytest
import torch

from conftest import F64, randn, rel
from lightning_flat.baselines import min_nuclear_norm, nuclear
from lightning_flat.functional import nuclear_norm
from lightning_flat.measurements import Dense, Entries, RankOne

SOLVERS = ["scs", "clarabel"]


def low_rank(d_out: int, d_in: int, r: int, g: torch.Generator) -> torch.Tensor:
    return randn(d_out, r, g=g) @ randn(r, d_in, g=g)


def make(kind: str, n_or_p: float, d_out: int, d_in: int, g: torch.Generator):
    """Gaussian ``Dense``, Gaussian ``RankOne`` (n measurements) or a Bernoulli(p) ``Entries`` mask."""
    if kind == "dense":
        return Dense(randn(int(n_or_p), d_out, d_in, g=g))
    if kind == "rank_one":
        return RankOne(randn(int(n_or_p), d_out, g=g), randn(int(n_or_p), d_in, g=g))
    rows, cols = (torch.rand(d_out, d_in, generator=g) < n_or_p).nonzero().T
    return Entries(rows, cols, (d_out, d_in), dtype=F64)


def nuc(X: torch.Tensor) -> float:
    return float(nuclear_norm(X))


def primal_reference(meas, b: torch.Tensor) -> torch.Tensor:
    """An independent solve: cvxpy's ``normNuc`` in the primal, Clarabel driven to tight tolerances."""
    n, (p, q) = len(meas), meas.shape
    X = cp.Variable((p, q))
    A = meas.dense().reshape(n, -1).numpy()
    cp.Problem(cp.Minimize(cp.normNuc(X)), [A @ cp.vec(X, order="C") == b.numpy()]).solve(
        solver=cp.CLARABEL, tol_gap_abs=1e-11, tol_gap_rel=1e-11, tol_feas=1e-11)
    return torch.from_numpy(X.value)


# ------------------------------------------------------------------------------------------------ exact recovery
def case_id(kind, n, d_out, d_in, r):
    return f"{kind}-{d_out}x{d_in}-{'p' if kind == 'entries' else 'n'}{n}-r{r}"


RECOVERY = [  # kind, n (p for entries), d_out, d_in, rank; n well above the r (d_out + d_in - r) degrees of freedom
    ("dense", 80, 10, 10, 2),
    ("dense", 80, 8, 12, 2),
    ("dense", 30, 5, 5, 2),  # n > d_out d_in: A is injective, X is the only feasible point
    ("rank_one", 90, 10, 10, 2),
    ("entries", 0.8, 10, 10, 1),
    ("entries", 0.9, 6, 9, 2),
]


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("kind, n, d_out, d_in, r", RECOVERY, ids=[case_id(*case) for case in RECOVERY])
def test_exact_recovery(kind, n, d_out, d_in, r, solver):
    g = torch.Generator().manual_seed(0)
    M = low_rank(d_out, d_in, r, g)
    meas = make(kind, n, d_out, d_in, g)
    X = min_nuclear_norm(meas, meas(M), solver=solver)
    assert X.shape == (d_out, d_in) and X.dtype == F64
    assert rel(X, M) < 1e-5


# ------------------------------------------------------------------------------- feasibility and optimality
@pytest.mark.parametrize("solver", SOLVERS)
def test_feasible_and_optimal_when_undersampled(solver):
    g = torch.Generator().manual_seed(1)
    M = low_rank(8, 8, 2, g)
    meas = make("dense", 24, 8, 8, g)  # 24 < 28 degrees of freedom: X != M*
    b = meas(M)
    X = min_nuclear_norm(meas, b, solver=solver)
    ref = primal_reference(meas, b)
    assert rel(X, M) > 1e-2
    assert float((meas(X) - b).abs().max()) < 1e-6 * float(b.abs().max())
    assert nuc(X) <= nuc(M) + 1e-6
    assert abs(nuc(X) - nuc(ref)) < 1e-7 * nuc(ref)
    # the solutions, whose end points depend on the solvers' rounding: the reference, an interior-point solve of the
    # primal SDP stopped at a gap of 1e-11, is about sqrt(1e-11) ~ 3e-6 from the minimiser (its error shrinks like
    # the square root of the gap here)
    assert rel(X, ref) < 1e-5


@pytest.mark.parametrize("kind, n", [("dense", 24), ("entries", 0.5)])
def test_inaccurate_solve_is_projected_onto_the_constraints(kind, n):
    """At a loose tolerance SCS stops early and the dual's X misses A(X) = b by ~eps; the returned X is projected onto
    the affine set, so it is feasible to rounding and its nuclear norm stays within the solver's accuracy."""
    g = torch.Generator().manual_seed(3)
    M = low_rank(8, 8, 2, g)
    meas = make(kind, n, 8, 8, g)
    b = meas(M)
    X = min_nuclear_norm(meas, b, solver="scs", eps=1e-3)
    assert float((meas(X) - b).abs().max()) < 1e-12 * float(b.abs().max())
    ref = primal_reference(meas, b)
    assert abs(nuc(X) - nuc(ref)) < 1e-2 * nuc(ref)


def test_float32_targets_give_float32_solution():
    g = torch.Generator().manual_seed(2)
    M = low_rank(6, 6, 1, g)
    meas = make("dense", 30, 6, 6, g).to(torch.float32)
    X = min_nuclear_norm(meas, meas(M.float()))
    assert X.dtype == torch.float32 and rel(X.double(), M) < 1e-5


# ------------------------------------------------------------------------------- structured forms against Dense
STRUCTURED = [  # kind, n or p, d_out, d_in, rank; undersampled so that X != M* (seeds checked to have a unique X)
    ("rank_one", 30, 8, 8, 2),
    ("rank_one", 40, 6, 11, 2),
    ("entries", 0.6, 10, 10, 2),
    ("entries", 0.7, 7, 9, 2),
]


@pytest.mark.parametrize("kind, n, d_out, d_in, r", STRUCTURED, ids=[case_id(*case) for case in STRUCTURED])
def test_structured_measurements_agree_with_dense(kind, n, d_out, d_in, r):
    g = torch.Generator().manual_seed(3)
    M = low_rank(d_out, d_in, r, g)
    meas = make(kind, n, d_out, d_in, g)
    b = meas(M)
    X = min_nuclear_norm(meas, b)
    X_dense = min_nuclear_norm(Dense(meas.dense()), b)
    assert rel(X, X_dense) < 1e-6
    assert float((meas(X) - b).abs().max()) < 1e-6 * float(b.abs().max())


def test_repeated_entries_are_one_constraint():
    g = torch.Generator().manual_seed(4)
    M = low_rank(6, 6, 1, g)
    rows, cols = (torch.rand(6, 6, generator=g) < 0.8).nonzero().T
    once = Entries(rows, cols, (6, 6), dtype=F64)
    twice = Entries(torch.cat([rows, rows[:5]]), torch.cat([cols, cols[:5]]), (6, 6), dtype=F64)
    assert rel(min_nuclear_norm(twice, twice(M)), min_nuclear_norm(once, once(M))) < 1e-6


def test_no_measurements_gives_zero():
    empty = Entries(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), (3, 4), dtype=F64)
    assert torch.equal(min_nuclear_norm(empty, torch.zeros(0, dtype=F64)), torch.zeros(3, 4, dtype=F64))


@pytest.mark.parametrize("kind", ["entries", "dense"])
def test_inconsistent_targets_raise(kind):
    g = torch.Generator().manual_seed(5)
    if kind == "entries":  # the same entry observed with two values
        meas = Entries(torch.tensor([0, 0]), torch.tensor([1, 1]), (2, 2), dtype=F64)
        b = torch.tensor([1.0, 2.0], dtype=F64)
    else:  # more measurements than unknowns and random targets
        meas, b = make("dense", 10, 2, 3, g), randn(10, g=g)
    with pytest.raises(RuntimeError, match="inconsistent"):
        min_nuclear_norm(meas, b)


# ------------------------------------------------------------------------------------------------- bad arguments
def _call(**override):
    args = dict(measurements=Dense(torch.ones(5, 3, 3, dtype=F64)), targets=torch.zeros(5, dtype=F64))
    args.update(override)
    return min_nuclear_norm(args.pop("measurements"), args.pop("targets"), **args)


BAD = [  # id, overridden argument, exception, message
    ("measurements-tensor", dict(measurements=torch.zeros(5, 3, 3, dtype=F64)), TypeError, "measurements must be"),
    ("measurements-batched", dict(measurements=Dense(torch.zeros(2, 5, 3, 3, dtype=F64))), ValueError,
     "measurements must be unbatched"),
    ("targets-list", dict(targets=[0.0] * 5), TypeError, "targets must be a torch.Tensor"),
    ("targets-int", dict(targets=torch.zeros(5, dtype=torch.long)), TypeError, "targets must be a floating"),
    ("targets-2d", dict(targets=torch.zeros(5, 1, dtype=F64)), ValueError, "targets must have 1 dimensions"),
    ("targets-length", dict(targets=torch.zeros(4, dtype=F64)), ValueError, r"targets must have shape \(5,\)"),
    ("targets-nan", dict(targets=torch.full((5,), float("nan"), dtype=F64)), ValueError, "targets must be finite"),
    ("solver-unknown", dict(solver="mosek"), ValueError,
     "solver must be one of 'auto', 'scs', 'clarabel', got 'mosek'"),
    ("eps-zero", dict(eps=0.0), ValueError, "eps must be > 0.0, got 0.0"),
    ("eps-str", dict(eps="1e-8"), TypeError, "eps must be a real number"),
    ("verbose-int", dict(verbose=1), TypeError, "verbose must be a bool"),
    ("cache_dir-int", dict(cache_dir=3), TypeError, "cache_dir must be a path"),
]


@pytest.mark.parametrize("override, error, match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_arguments_raise(override, error, match):
    with pytest.raises(error, match=match):
        _call(**override)


# ----------------------------------------------------------------------------------------------------- cache
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_cache_round_trip(tmp_path, monkeypatch, dtype):
    g = torch.Generator().manual_seed(6)
    M = low_rank(6, 6, 1, g)
    meas = make("dense", 25, 6, 6, g)
    b = meas(M).to(dtype)
    first = min_nuclear_norm(meas, b, cache_dir=tmp_path)
    assert [p.suffix for p in tmp_path.iterdir()] == [".npy"]  # one file, no temporary left behind

    def no_solve(*args, **kwargs):
        raise AssertionError("the cached solution should have been used")

    monkeypatch.setattr(nuclear, "_solve_dual", no_solve)
    second = min_nuclear_norm(meas, b, cache_dir=str(tmp_path))
    assert second.dtype == dtype and torch.equal(first, second)
    with pytest.raises(AssertionError, match="cached"):  # other targets: another key
        min_nuclear_norm(meas, 2 * b, cache_dir=tmp_path)


@pytest.mark.parametrize("damage", ["truncated", "wrong_shape", "nan", "infeasible", "not_npy"])
def test_corrupt_cache_is_detected_and_replaced(tmp_path, damage):
    """A damaged cache file is never returned: a warning names it, the problem is solved again, and the file is
    replaced by the good solution (which is then read back)."""
    import numpy as np

    g = torch.Generator().manual_seed(6)
    meas = make("dense", 25, 6, 6, g)
    b = meas(low_rank(6, 6, 1, g))
    good = min_nuclear_norm(meas, b, cache_dir=tmp_path)
    (path,) = list(tmp_path.iterdir())
    X = np.load(path)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "wrong_shape":
        np.save(path, X[:5])
    elif damage == "nan":
        X[0, 0] = np.nan
        np.save(path, X)
    elif damage == "infeasible":
        np.save(path, X + 1e-3)  # a plausible matrix that no longer interpolates the data
    else:
        path.write_text("not a numpy file")
    with pytest.warns(UserWarning, match=f"cache file {path}"):
        again = min_nuclear_norm(meas, b, cache_dir=tmp_path)
    # the re-solve is the same deterministic computation: the same solution to SCS's accuracy (eps = 1e-8 -> the
    # nuclear norms agree far below 1e-6 relative)
    assert abs(float(torch.linalg.matrix_norm(again, "nuc") / torch.linalg.matrix_norm(good, "nuc")) - 1) < 1e-6
    assert np.load(path).shape == (6, 6) and np.isfinite(np.load(path)).all()
