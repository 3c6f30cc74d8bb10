"""One trial of Ding et al.'s recovery experiment (flat relaxation vs nuclear norm), as an importable kernel so that
worker processes (``multiprocessing`` spawn) can run it; ``examples/ding2022/run.py`` lays out the grid."""

from __future__ import annotations

import time

__all__ = ["SETTINGS", "make_problem", "solve_trial"]

SETTINGS = ("sensing", "bilinear", "completion", "quadratic")


def _seed(*keys: int) -> int:
    from lightning_flat.engine.replicas import step_seed

    return step_seed(*keys) % (2**31)


def make_problem(setting: str, d: int, x: float, trial: int):
    """(measurements, targets, M) for one trial: M from the cell's seed, the measurements from the trial's."""
    import torch

    from lightning_flat.datamodules.recovery import unit_low_rank
    from lightning_flat.measurements import Dense, Entries, RankOne

    f64 = torch.float64
    s = SETTINGS.index(setting)
    cell = torch.Generator().manual_seed(_seed(s, d, int(round(x * 1000))))
    g = torch.Generator().manual_seed(_seed(s, d, int(round(x * 1000)), trial, 1))
    if setting == "quadratic":
        U = torch.randn(d, 3, generator=cell, dtype=f64)
        M = (U * torch.tensor([1.0, 1.0, -1.0], dtype=f64)) @ U.T
        M = M / torch.linalg.matrix_norm(M)
    else:
        M = unit_low_rank(d, d, 2, cell)
    m = int(x)
    if setting == "sensing":
        meas = Dense(torch.randn(m, d, d, generator=g, dtype=f64))
    elif setting == "bilinear":
        meas = RankOne(torch.randn(m, d, generator=g, dtype=f64), torch.randn(m, d, generator=g, dtype=f64))
    elif setting == "quadratic":
        xs = torch.randn(m, d, generator=g, dtype=f64)
        meas = RankOne(xs, xs)
    else:
        mask = torch.rand(d, d, generator=g, dtype=f64) < x
        if not bool(mask.any()):
            mask[0, 0] = True
        rows, cols = mask.nonzero(as_tuple=True)
        meas = Entries(rows, cols, (d, d), dtype=f64)
    return meas, meas(M), M


def recovery_trial(config: dict) -> dict:
    """[`solve_trial`][lightning_flat.experiments.recovery.solve_trial] as a sweep trial (``lightning_flat.sweep``):
    ``{"setting", "d", "x", "trial"}`` in."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cvxpy warns once per inaccurate solve; the trial records its status
        return solve_trial((config["setting"], config["d"], config["x"], config["trial"]))


def solve_trial(args):
    """One trial: both convex programs, errors, V2 checks and the Fig. 4 measures (in a worker process)."""
    setting, d, x, trial = args
    import torch

    from lightning_flat import functional as F
    from lightning_flat.baselines import SingularRescalingError, flat_relaxation, min_nuclear_norm
    from lightning_flat.functional import flat as FF

    meas, b, M = make_problem(setting, d, x, trial)
    out = dict(setting=setting, d=d, x=x, trial=trial, n=len(meas))
    t = time.perf_counter()
    out["solver_error"] = None
    try:
        X_nuc = min_nuclear_norm(meas, b)
    except RuntimeError as err:  # a failed solve is a failed trial, never a crashed grid
        out.update(singular=False, solver_error=f"nuclear: {err}", error_nuc=float("inf"), error_flat=float("inf"),
                   normmin=1e20, balance=1e20, seconds=time.perf_counter() - t)
        return out
    out["error_nuc"] = float(torch.linalg.matrix_norm(X_nuc - M))
    try:
        parts = flat_relaxation(meas, b, return_parts=True)
    except SingularRescalingError:
        out.update(singular=True, error_flat=float("inf"), normmin=1e20, balance=1e20, seconds=time.perf_counter() - t)
        return out
    except RuntimeError as err:
        out.update(singular=False, solver_error=f"flat: {err}", error_flat=float("inf"), normmin=1e20, balance=1e20,
                   seconds=time.perf_counter() - t)
        return out
    X, Y, D1, D2 = parts["X"], parts["Y"], parts["D1"], parts["D2"]
    out["singular"] = False
    out["error_flat"] = float(torch.linalg.matrix_norm(X - M))
    Lf, Rf = FF.flat_factors(Y, D1, D2)
    kappa = float(FF.condition_number(D1, D2))
    norm_sq = float(Lf.square().sum() + Rf.square().sum())
    nuc_M, nuc_X = float(F.nuclear_norm(M)), float(F.nuclear_norm(X_nuc))
    imbalance = float(F.nuclear_norm(Lf.T @ Lf - Rf.T @ Rf))
    # V2: feasibility, D-balance, str = 4 ||Y||_*, str(flat) <= str at the balanced factors of X_nuc
    U, s, Vh = torch.linalg.svd(X_nuc)
    Ln, Rn = U * s.sqrt(), Vh.T * s.sqrt()
    str_flat, str_nuc = float(FF.scaled_trace(Lf, Rf, D1, D2)), float(FF.scaled_trace(Ln, Rn, D1, D2))
    out.update(
        kappa=kappa,
        feasibility=float((meas(Lf @ Rf.T) - b).abs().max()), b_inf=float(b.abs().max()),
        d_balance=float((Lf.T @ D1 @ D1 @ Lf - Rf.T @ D2 @ D2 @ Rf).abs().max() / max(norm_sq, 1e-300)),
        str_flat=str_flat, str_nuc=str_nuc, four_y=4.0 * float(F.nuclear_norm(Y)),
        bound22=norm_sq <= (1 + 1e-6) * 2 * kappa**2 * nuc_X + 1e-9,
        bound23=imbalance <= (1 + 1e-6) * (1 - kappa**-2) * norm_sq + 1e-9
        and (1 - kappa**-2) * norm_sq <= (1 + 1e-6) * 2 * (kappa**2 - 1) * max(nuc_M, nuc_X) + 1e-9,
        normmin=norm_sq / (2 * nuc_X) - 1.0, balance=imbalance / nuc_M, seconds=time.perf_counter() - t,
    )
    return out
