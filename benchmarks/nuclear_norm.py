r"""Minimum nuclear norm solves side by side: formulations x solvers, time and accuracy.

Gaussian matrix sensing as in Gatmiry et al. (2023), Sec. 7: ``A_i`` with i.i.d. N(0, 1) entries, then
``M* = M1 M2 / d`` with ``M1 (d, r)``, ``M2 (r, d)`` i.i.d. N(0, 1) (drawn in that order from
``numpy.random.default_rng(seed)``), ``b_i = <A_i, M*>``; sizes d = 20, n = 200, r = 2 and d = 60, n = 600, r = 3.

Compared (each timed end to end, cvxpy compilation included):

- ``dual/SCS``: ``min_nuclear_norm`` (the ``"auto"`` choice): max b^T y s.t. ||sum_i y_i A_i||_op <= 1, X from the
  multiplier of the matrix inequality;
- ``dual/Clarabel``: the same with ``solver="clarabel"`` (gap and feasibility tolerances 1e-12). It is the most
  accurate (5e-15 from M* at d = 20) and serves as the reference; cached under ``--cache-dir`` (minutes at d = 60);
- ``primal/SCS`` and ``primal/Clarabel``: ``cp.normNuc(X)`` s.t. ``A vec(X) = b`` (cvxpy's SDP with a PSD block of
  order 2d) with SCS at ``eps = 1e-8`` and Clarabel at its default tolerances (1e-8; 1e-12 ends at the same point).

At d = 20 the solution equals M* (exact recovery), at d = 60 it does not (n = 600 is just below the recovery
threshold). The full run takes ~12 min on 2 cores, most of it Clarabel at d = 60; ``--quick`` only does d = 20.

    python benchmarks/nuclear_norm.py [--quick] [--cache-dir outputs/nuclear_norm_cache]
"""

from __future__ import annotations

import argparse
import time
import warnings

import cvxpy as cp
import numpy as np
import torch

from lightning_flat.baselines import min_nuclear_norm
from lightning_flat.functional import nuclear_norm
from lightning_flat.measurements import Dense


def problem(d: int, n: int, r: int, seed: int = 0) -> tuple[Dense, torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    A = torch.from_numpy(rng.standard_normal((n, d, d)))
    M = torch.from_numpy(rng.standard_normal((d, r)) @ rng.standard_normal((r, d)) / d)
    meas = Dense(A)
    return meas, meas(M), M


def primal(meas: Dense, b: torch.Tensor, solver: str, **options) -> tuple[torch.Tensor, str]:
    n, (p, q) = len(meas), meas.shape
    X = cp.Variable((p, q))
    A = meas.A.reshape(n, -1).numpy()
    prob = cp.Problem(cp.Minimize(cp.normNuc(X)), [A @ cp.vec(X, order="C") == b.numpy()])
    prob.solve(solver=solver, **options)
    return torch.from_numpy(X.value), prob.status


METHODS = {
    "dual/SCS (auto)": lambda m, b: (min_nuclear_norm(m, b), "optimal"),
    "primal/SCS": lambda m, b: primal(m, b, cp.SCS, eps_abs=1e-8, eps_rel=1e-8, max_iters=10_000),
    "primal/Clarabel": lambda m, b: primal(m, b, cp.CLARABEL),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="only d = 20")
    parser.add_argument("--cache-dir", default="outputs/nuclear_norm_cache", help="where the references are cached")
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # cvxpy's "Solution may be inaccurate": the status column shows it

    print(f"{'size':>16} {'method':>16} {'time [s]':>9} {'rel err':>8} {'vs M*':>8} {'||X||_*':>12} "
          f"{'max|A(X)-b|':>11}  status")
    for d, n, r in [(20, 200, 2)] + ([] if args.quick else [(60, 600, 3)]):
        meas, b, M = problem(d, n, r)
        t = time.perf_counter()
        ref = min_nuclear_norm(meas, b, solver="clarabel", eps=1e-12, cache_dir=args.cache_dir)
        seconds = time.perf_counter() - t
        rows = [("dual/Clarabel", seconds, ref, "optimal, reference" + (" (cached)" if seconds < 0.5 else ""))]
        for name, solve in METHODS.items():
            t = time.perf_counter()
            try:
                X, status = solve(meas, b)
            except RuntimeError as err:  # a failed solve is a result too
                X, status = torch.full_like(M, float("nan")), str(err)
            rows.append((name, time.perf_counter() - t, X, status))
        for name, seconds, X, status in rows:
            print(f"{f'd={d} n={n} r={r}':>16} {name:>16} {seconds:9.2f} {float((X - ref).norm() / ref.norm()):8.1e} "
                  f"{float((X - M).norm() / M.norm()):8.1e} {float(nuclear_norm(X)):12.9f} "
                  f"{float((meas(X) - b).abs().max()):11.1e}  {status}", flush=True)


if __name__ == "__main__":
    main()
