"""Ding, Drusvyatskiy & Fazel (2022): flat minima of low-rank recovery, and the flat relaxation.

Per cell of the grid (setting x dimension d x number of measurements m, or observation probability p for
completion) the ground truth M (rank 2, unit Frobenius norm; quadratic: rank 3 with signs (+, +, -)) is drawn once and
the measurements ``trials`` times; each trial solves the flat relaxation min ||D1 X D2||_* s.t. A(X) = b
(``baselines.flat_relaxation``) and min ||X||_* s.t. A(X) = b (``baselines.min_nuclear_norm``), in worker processes.
Settings: (a) Gaussian sensing, (b) bilinear sensing, (c) completion, (d) quadratic sensing. Writes
``fig3_recovery.png`` (success frequencies of both methods), ``fig4_regularity.png`` (norm-minimality and balance of
the flat factors) and ``trials.json``, and prints the checks (Q2-Q3 quick, 3-5 and 7 full; the README says what each
means). Exit status 1 when a check fails.

    python examples/ding2022/run.py --quick     # d = 8, 5 trials, m in {16, 56}, p in {0.3, 0.95} (< 1 minute)
    python examples/ding2022/run.py             # d in {5, 10, 15, 20}, m in {10, ..., 200}, p in {0.1, ..., 1}
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings

from lightning_flat.experiments.checks import Check, Reading, evaluate
from lightning_flat.experiments.recovery import SETTINGS, recovery_trial

TAU = 1e-4
LOG_FLOOR = 1e-8  # Fig. 4's colour scale starts here
QUICK = dict(dims=[8], trials=5, m=[16, 56], p=[0.3, 0.95])
FULL = dict(dims=[5, 10, 15, 20], trials=10, m=list(range(10, 201, 10)), p=[round(0.1 * k, 1) for k in range(1, 11)])


def parse_args(argv=None):
    from lightning_flat.experiments.scripts import example_parser

    p = example_parser(__doc__, "ding2022", quick_help="d = 8, 5 trials, m in {16, 56}, p in {0.3, 0.95}",
                       sweep_noun="trials", workers_help="worker processes for the trials (default 2)",
                       workers_default=2, threads=False, wandb=False, replot_metavar="TRIALS_JSON",
                       replot_help="redraw Figs. 3 and 4 and recompute the grid checks (3-5) from a trials.json, "
                                   "without solving")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def rel(A, B):
    import torch

    return float(torch.linalg.matrix_norm(A - B) / torch.linalg.matrix_norm(B))


def distinct_problem(make, seeds, gap):
    """The first problem of ``seeds`` with a nonsingular D whose flat and nuclear solutions are ``gap`` apart in
    Frobenius norm, so that a trained network can be told to be near one or the other: (seed, dm, X_flat, X_nuc)."""
    import torch

    from lightning_flat.baselines import flat_relaxation, min_nuclear_norm

    for seed in seeds:
        dm = make(seed)
        try:
            Xf = flat_relaxation(dm.measurements, dm.targets)
        except ValueError:
            continue
        Xn = min_nuclear_norm(dm.measurements, dm.targets)
        if float(torch.linalg.matrix_norm(Xf - Xn)) >= gap:
            break
    return seed, dm, Xf, Xn


def penalized(dm, seed, lam, wd=0.0):
    """A depth-2, width-8 network (init scale 1e-3, float64) after 25 L-BFGS steps on loss + lam tr H
    + (wd/2) sum_j |W_j|^2."""
    import logging

    from lightning_flat.experiments.training import trainer
    from lightning_flat.models import DeepLinearNet

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    model = DeepLinearNet([8, 8, 8], init_scale=1e-3, optimizer="lbfgs", lr=1.0, trace_penalty=lam, weight_decay=wd,
                          seed=seed)
    trainer(25).fit(model, dm)
    return model


def sensing(seed, n=24):
    from lightning_flat.datamodules import MatrixSensingDataModule

    return MatrixSensingDataModule(n=n, d_out=8, d_in=8, rank=2, batch_size=None, seed=seed, unit_norm=True)


def v3_check(seed_search: int = 10):
    """Q3 / check 7 (sensing): a depth-2 net trained on loss + lambda * trace (L-BFGS, float64) lands on X_flat."""
    seed, dm, Xf, Xn = distinct_problem(sensing, range(seed_search), 0.1)
    E = penalized(dm, seed, 1e-4).end_to_end().detach()
    return dict(seed=seed, flat=rel(E, Xf), nuc=rel(E, Xn))


def newton_polish(model, dm, lam, wd, max_steps=30, tol=1e-12):
    """Newton steps on the exact Hessian of the penalized objective (float64) until the gradient norm is < tol
    (L-BFGS alone stalls around 1e-2 in gradient norm at small lambda)."""
    import torch

    from lightning_flat import functional as F

    meas, b = dm.measurements, dm.targets
    shapes = [w.shape for w in model.weights()]
    v = torch.cat([w.detach().double().reshape(-1) for w in model.weights()])

    def objective(x):
        W = F.unflatten_weights(x, shapes)
        value = F.measurement_loss(F.end_to_end(W), meas, b)
        if lam:
            value = value + lam * F.hessian_trace(W, meas)
        if wd:
            value = value + 0.5 * wd * sum(w.square().sum() for w in W)
        return value

    grad = torch.func.grad(objective)
    for _ in range(max_steps):
        g = grad(v)
        if float(g.norm()) < tol:
            break
        H = torch.func.hessian(objective)(v)
        evals, evecs = torch.linalg.eigh(H)
        floor = 1e-12 * float(evals.abs().max())
        step = evecs @ ((evecs.T @ g) / evals.abs().clamp(min=floor))  # Newton on |H| (saddle-safe)
        f0, alpha = float(objective(v)), 1.0
        while alpha > 1e-12 and float(objective(v - alpha * step)) > f0:
            alpha *= 0.5  # backtracking: near-flat directions (the GL fiber) make full steps too long
        v = v - alpha * step
    return F.end_to_end(F.unflatten_weights(v, shapes)), float(grad(v).norm())


def v3_full():
    """Check 7: trace-regularized training on (a), (b), (c), d = 8, k = 8; weight decay as the mirror image;
    lambda = 1e-5 closer to X_flat (L-BFGS, then a Newton polish). Per setting: the seed and, per fit, rel(E, X_flat),
    rel(E, X_nuc) and the final gradient norm."""
    from lightning_flat.datamodules import BilinearSensingDataModule, MatrixCompletionDataModule

    makers = {"sensing": sensing,
              "bilinear": lambda s: BilinearSensingDataModule(n=32, d_out=8, d_in=8, rank=2, seed=s),
              "completion": lambda s: MatrixCompletionDataModule(d_out=8, d_in=8, rank=2, p=0.5, seed=s)}
    out = {}
    for name, make in makers.items():
        seed, dm, Xf, Xn = distinct_problem(make, range(30), 0.03)
        a = float(dm.measurements.dense().square().sum() / (len(dm.measurements) * 64))
        out[name] = dict(seed=seed)
        for label, lam, wd in (("trace 1e-4", 1e-4, 0.0), ("trace 1e-5", 1e-5, 0.0),
                               ("weight decay", 0.0, 2 * (2 * 1e-4 * 8 * a))):
            E, gnorm = newton_polish(penalized(dm, seed, lam, wd), dm, lam, wd)
            out[name][label] = dict(flat=rel(E, Xf), nuc=rel(E, Xn), gradient=gnorm)
    return out


def cell_table(trials, setting, dims, xs):
    """Per (d, x): success frequencies (tau and 1e-6), mean normmin/balance over nonsingular trials."""
    out = {}
    for d in dims:
        for x in xs:
            rows = [t for t in trials if t["setting"] == setting and t["d"] == d and t["x"] == x]
            ok = [t for t in rows if not t["singular"] and t.get("solver_error") is None]
            out[(d, x)] = dict(
                flat=sum(t["error_flat"] < TAU for t in rows) / len(rows),
                nuc=sum(t["error_nuc"] < TAU for t in rows) / len(rows),
                flat6=sum(t["error_flat"] < 1e-6 for t in rows) / len(rows),
                nuc6=sum(t["error_nuc"] < 1e-6 for t in rows) / len(rows),
                normmin=sum(max(t["normmin"], 0.0) for t in ok) / len(ok) if ok else math.nan,
                balance=sum(t["balance"] for t in ok) / len(ok) if ok else math.nan,
                nonsingular=len(ok))
    return out


def figures(tables, dims, axes_x, out):
    import matplotlib
    import numpy as np

    from lightning_flat.plotting import cell_heatmap, figure, save

    title = (r"Ding et al. 2022, Fig. 3: recovery frequency ($\|X - M\|_F < \tau$, $\|M\|_F = 1$), $\tau = 10^{-4}$ "
             r"(rows 1-2) and the paper's $10^{-6}$ (rows 3-4)")
    fig, axes = figure(4, 4, size=(3.4, 3.0), title=title)
    for j, setting in enumerate(SETTINGS):
        xs = axes_x[setting]
        for i, (method, key, tau) in enumerate((("flat relaxation", "flat", "-4"), ("nuclear norm", "nuc", "-4"),
                                                ("flat relaxation", "flat6", "-6"), ("nuclear norm", "nuc6", "-6"))):
            im = cell_heatmap(axes[i, j], [[tables[setting][(d, x)][key] for x in xs] for d in dims], xs, dims,
                              "$p$" if setting == "completion" else "$m$", "$d$",
                              f"({'abcd'[j]}) {setting}: {method}, " + rf"$\tau = 10^{{{tau}}}$", cmap="gray", vmin=0,
                              vmax=1)
    # one shared scale for all 16 panels: white = every trial recovered M, black = none
    fig.colorbar(im, ax=axes, shrink=0.6, label="fraction of trials that recover $M$ (white 1, black 0)")
    paths = [save(fig, os.path.join(out, "fig3_recovery.png"))]
    fig, axes = figure(2, 3, size=(3.6, 3.0),
                       title=r"Ding et al. 2022, Fig. 4: $\log_{10}$ of the mean measure of the flat factors")
    cmap = matplotlib.colormaps["viridis"].copy()
    cmap.set_bad("0.85")  # cells where D is singular in every trial: no measure
    for j, setting in enumerate(SETTINGS[:3]):
        xs = axes_x[setting]
        for i, key in enumerate(("normmin", "balance")):
            raw = np.array([[tables[setting][(d, x)][key] for x in xs] for d in dims], dtype=float)
            # exact zeros (completion at p = 1: kappa = 1) would stretch the scale to 1e-16: floor at 1e-8
            im = cell_heatmap(axes[i, j], np.ma.masked_invalid(np.log10(np.clip(raw, LOG_FLOOR, None))), xs, dims,
                              "$p$" if setting == "completion" else "$m$", "$d$", f"({'abc'[j]}) {setting}: "
                              f"{'norm-minimality' if key == 'normmin' else 'balance'}", cmap=cmap)
            fig.colorbar(im, ax=axes[i, j], shrink=0.8, label=rf"$\log_{{10}}$ (floor {math.log10(LOG_FLOOR):g})")
            for (r, c), v in np.ndenumerate(raw):
                if not np.isfinite(v):
                    axes[i, j].text(c, r, "D\nsing.", ha="center", va="center", fontsize=5, color="0.3")
    paths.append(save(fig, os.path.join(out, "fig4_regularity.png")))
    return paths


def usable(r):
    """The trials with a nonsingular D and no solver failure."""
    return [t for t in r["trials"] if not t["singular"] and t.get("solver_error") is None]


def transitions(t, dims, xs):
    """Per d: the first column where flat, and nuclear, recover M in at least half the trials (len(xs): none)."""
    first = lambda d, m: next((i for i, x in enumerate(xs) if t[(d, x)][m] >= 0.5), len(xs))  # noqa: E731
    return {d: (first(d, "flat"), first(d, "nuc")) for d in dims}


def measure_cells(setting, key):  # check 5: the cell means of normmin / balance where flat recovers M
    def read(r):
        t = r["tables"][setting]
        good = [c for c in t if t[c]["flat"] >= 0.9 and t[c]["nonsingular"]
                and not (setting == "completion" and c[1] == 1.0)]  # p = 1: both measures exactly 0
        return Reading([t[c][key] for c in good], n=len(good))
    return read


def measure_trend(setting, key, dims, xs):  # check 5: max over d of (mean over the last third) / (first third)
    def read(r):
        t, worst = r["tables"][setting], -math.inf
        for d in dims:
            col = [t[(d, x)][key] for x in xs if t[(d, x)]["nonsingular"]]
            k = len(col) // 3
            if k:
                first, last = sum(col[:k]) / k, sum(col[-k:]) / k
                worst = max(worst, last / first if first > 0 else (1.0 if last == 0 else math.inf))
        return worst
    return read


def bounds_row(prefix):
    return Check(f"{prefix}5 bounds (22)-(23) hold in every nonsingular trial", "the flat factors are near "
                 "norm-minimal and balanced within the kappa bounds", lambda r: all(
                     t["bound22"] and t["bound23"] for t in usable(r)), "true")


def grid_checks(quick, dims, axes_x):
    """The checks read from the grid's trials: Q2 (quick), 3-5 (full)."""
    if quick:
        rows = [row for s in SETTINGS for d in dims for row in transition_checks(s, d, axes_x[s])]
        return rows + [bounds_row("Q2 ")]
    return [bounds_row("")] + [row for s in SETTINGS for row in setting_checks(s, dims, axes_x[s])] + [
        Check("3 fewer than 2% of errors in (1e-4, 1e-3) (fraction)", "tau does not decide the outcome",
              lambda r: sum(1 for x in r["trials"] if 1e-4 < x["error_flat"] < 1e-3 or 1e-4 < x["error_nuc"] < 1e-3)
              / (2 * len(r["trials"])), "<", 0.02)]


def transition_checks(setting, d, xs):
    """Q2: neither method recovers M in the first column, both mostly do in the last."""
    def cell(r, x):
        return r["tables"][setting][(d, x)]

    lo, hi, need = xs[0], xs[-1], 0.6 if setting == "completion" else 0.8
    return [Check(f"Q2 {setting} d={d}: success 0 at {lo:g} (flat, nuc)", "too few measurements",
                  lambda r: max(cell(r, lo)["flat"], cell(r, lo)["nuc"]), "==", 0),
            Check(f"Q2 {setting} d={d}: success >= {need} at {hi:g} (min of flat, nuc)", "enough",
                  lambda r: min(cell(r, hi)["flat"], cell(r, hi)["nuc"]), ">=", need)]


def setting_checks(setting, dims, xs):
    """Checks 3-5 of one setting of the full grid."""
    def tab(r):
        return r["tables"][setting]

    def gaps(r):
        return [abs(a - b) for a, b in transitions(tab(r), dims, xs).values()]

    last = ("3 completion: success >= 0.9 at p = 1.0", [(d, 1.0) for d in dims]) if setting == "completion" else (
        f"3 {setting}: success >= 0.9 in the last column for d <= 15", [(d, xs[-1]) for d in dims if d <= 15])
    diffs = lambda r: [abs(c["flat"] - c["nuc"]) for c in tab(r).values()]  # noqa: E731
    rows = [
        Check(f"3 {setting}: success 0 in the first column", "no method recovers M from the fewest measurements",
              lambda r: max(tab(r)[(d, xs[0])][m] for d in dims for m in ("flat", "nuc")), "==", 0),
        Check(last[0], "both recover it from the most",
              lambda r: min(tab(r)[c][m] for c in last[1] for m in ("flat", "nuc")), ">=", 0.9),
        Check(f"4 {setting}: mean |P_flat - P_nuc| <= 0.1", "flat and nuclear recover alike",
              lambda r: sum(diffs(r)) / len(diffs(r)), "<=", 0.1),
        Check(f"4 {setting}: max |P_flat - P_nuc| <= 0.5", "in every cell", lambda r: max(diffs(r)), "<=", 0.5),
        Check(f"4 {setting}: 50% transitions of flat within 2 steps of nuc (max gap)", "with the same transition",
              lambda r: max(gaps(r)), "<=", 2),
        Check(f"4 {setting}: within 1 step for >= 75% of d", "mostly within one column",
              lambda r: sum(g <= 1 for g in gaps(r)) / len(gaps(r)), ">=", 0.75)]
    if setting != "completion":
        rows.append(Check(f"4 {setting}: flat transition nondecreasing in d", "larger matrices need more",
                          lambda r: (lambda f: all(a <= b for a, b in zip(f, f[1:])))(
                              [v[0] for v in transitions(tab(r), dims, xs).values()]), "true"))
    if setting != "quadratic":
        for key, lo, hi in (("normmin", 1e-8, 0.05), ("balance", 1e-4, 0.5)):
            where = f"{key} cell means where flat success >= 0.9 ({{n}} cells)"
            rows += [Check(f"5 {setting}: {where} > {lo:g} (min)", "not exactly norm-minimal or balanced",
                           measure_cells(setting, key), ">", lo),
                     Check(f"5 {setting}: {where} <= {hi:g} (max)", "but nearly", measure_cells(setting, key), "<=",
                           hi),
                     Check(f"5 {setting}: {key} mean over the last third of nonsingular columns <= first third, "
                           "every d (max ratio last/first)", "and less so with more measurements",
                           measure_trend(setting, key, dims, xs), "<=", 1.0)]
    return rows



def _v3_rows(name):
    """Check 7's rows for one setting (a function of its own, so that each row's lambda reads this setting)."""

    def fit(r, label):
        return r["v3"][name][label]

    bound = 0.03 if name == "sensing" else 0.1
    return [
        Check(f"7 V3 {name} (seed {{seed}}): trace 1e-4: rel(E, X_flat) <= {bound}", "the trace penalty lands on "
              "X_flat",
              lambda r: Reading(fit(r, "trace 1e-4")["flat"], seed=r["v3"][name]["seed"]), "<=", bound),
        Check(f"7 V3 {name}: trace 1e-4: rel(E, X_nuc) >= 3 rel(E, X_flat)", "not on X_nuc",
              lambda r: fit(r, "trace 1e-4")["nuc"] / max(fit(r, "trace 1e-4")["flat"], 1e-300), ">=", 3),
        Check(f"7 V3 {name}: weight decay (mirror): rel(E, X_flat) >= 3 rel(E, X_nuc)", "weight decay lands on X_nuc",
              lambda r: fit(r, "weight decay")["flat"] / max(fit(r, "weight decay")["nuc"], 1e-300), ">=", 3),
        Check(f"7 V3 {name}: lambda 1e-5 cuts rel(E, X_flat) by >= 3x", "the rest is the penalty's bias",
              lambda r: fit(r, "trace 1e-4")["flat"] / max(fit(r, "trace 1e-5")["flat"], 1e-300), ">=", 3),
        Check(f"7 V3 {name}: Newton polish gradient norm (max over fits)", "the compared points are stationary",
              lambda r: max(fit(r, k)["gradient"] for k in ("trace 1e-4", "trace 1e-5", "weight decay")), "<", 1e-10)]


def v3_checks(quick):
    """Check 7 (Q3: its last two rows): training on loss + lambda tr H lands on X_flat, weight decay on X_nuc."""
    rows = [row for name in (() if quick else ("sensing", "bilinear", "completion")) for row in _v3_rows(name)]
    p = "Q3" if quick else "7"
    return rows + [
        Check(f"{p} V3 sensing d=8 m=24 (seed {{seed}}): rel(E, X_flat) <= 0.03", "L-BFGS alone lands on X_flat",
              lambda r: Reading(r["v3_light"]["flat"], seed=r["v3_light"]["seed"]), "<=", 0.03),
        Check(f"{p} V3: rel(E, X_nuc) >= 0.1 and >= 3 rel(E, X_flat)", "far from X_nuc", "v3_light/nuc", ">=",
              lambda r: max(0.1, 3 * r["v3_light"]["flat"]))]


def main(argv=None) -> dict:
    from lightning_flat.experiments.scripts import output_dir

    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    from lightning_flat.threads import use_threads

    use_threads()  # this process too: one intra-op thread (tiny models)
    if args.replot:
        return replot(args.replot, args.out)
    cfg = QUICK if args.quick else FULL
    out = output_dir(args.out, "ding2022", args.quick)
    t0 = time.perf_counter()
    dims = cfg["dims"]
    axes_x = _axes(cfg)
    jobs = [(s, d, x, k) for s in SETTINGS for d in dims for x in axes_x[s] for k in range(cfg["trials"])]
    jobs.sort(key=lambda j: -j[1] * (j[2] if j[0] != "completion" else 100))  # big solves first
    from lightning_flat.sweep import run_sweep

    bar = _progress(None, len(jobs), not args.no_progress)
    rows = run_sweep(recovery_trial, [dict(setting=s, d=d, x=x, trial=k) for s, d, x, k in jobs],
                     os.path.join(out, "sweep"), engine=args.engine, workers=args.workers, address=args.address,
                     resume=args.resume,
                     progress=(lambda row: bar.update(1)) if bar is not None else None)
    if bar is not None:
        bar.close()
    trials = [row["result"] for row in rows]
    solve_seconds = time.perf_counter() - t0

    tables = {s: cell_table(trials, s, dims, axes_x[s]) for s in SETTINGS}
    paths = figures(tables, dims, axes_x, out)
    results = dict(tables=tables, trials=trials, v3={} if args.quick else v3_full(), v3_light=v3_check())
    for s in SETTINGS:
        print(f"\n({'abcd'[SETTINGS.index(s)]}) {s}: success flat / nuc (tau = {TAU:g}), mean normmin, balance")
        for d in dims:
            print(f"  d={d:2d}: " + "  ".join(
                f"{x:g}:{tables[s][(d, x)]['flat']:.1f}/{tables[s][(d, x)]['nuc']:.1f}" for x in axes_x[s]))
    failed = [t for t in trials if t.get("solver_error")]
    print(f"\nsolver failures (counted as failed trials): {len(failed)} of {2 * len(trials)} programs")
    for t in failed[:5]:
        print(f"  {t['setting']} d={t['d']} x={t['x']} trial {t['trial']}: {t['solver_error'][:200]}")
    checks = evaluate(grid_checks(args.quick, dims, axes_x) + v3_checks(args.quick), results)
    total = time.perf_counter() - t0
    print(f"\n{len(trials)} trials ({2 * len(trials)} convex programs) in {solve_seconds:.0f} s on {args.workers} "
          f"worker(s); wrote {', '.join(paths)}; total {total:.0f} s")
    summary = dict(config=cfg, seconds=total, solve_seconds=solve_seconds, figures=paths, checks=checks,
                   v3=results["v3"], v3_light=results["v3_light"])
    from lightning_flat.io import write_json

    write_json(os.path.join(out, "trials.json"), {**summary, "trials": trials})
    return summary


def _axes(cfg) -> dict:
    """Per setting, the grid's x values: m, or p for completion."""
    return {s: (cfg["p"] if s == "completion" else cfg["m"]) for s in SETTINGS}


def replot(path, out=None) -> dict:
    """Figures and grid checks of an earlier run from its ``trials.json``."""
    with open(path) as f:
        saved = json.load(f)
    cfg, trials = saved["config"], saved["trials"]
    for t in trials:  # JSON wrote non-finite floats as null
        for key, v in t.items():
            if v is None and key != "solver_error":
                t[key] = math.nan
    dims = cfg["dims"]
    axes_x = _axes(cfg)
    tables = {s: cell_table(trials, s, dims, axes_x[s]) for s in SETTINGS}
    paths = figures(tables, dims, axes_x, out or os.path.dirname(os.path.abspath(path)))
    checks = evaluate(grid_checks(cfg == QUICK, dims, axes_x), dict(tables=tables, trials=trials), title=None)
    print(f"wrote {', '.join(paths)}")
    return dict(config=cfg, figures=paths, checks=checks)


class _Lines:
    """Progress as plain lines (one per twentieth of the trials) where stdout is not a terminal: a log file gets
    no carriage returns."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.every, self.t0 = total, 0, max(1, total // 20), time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.done % self.every == 0 or self.done == self.total:
            print(f"trials: {self.done}/{self.total} in {time.perf_counter() - self.t0:.0f} s", flush=True)

    def close(self) -> None:
        pass


def _progress(iterable, total, enabled):
    if not enabled:
        return iterable
    if not sys.stdout.isatty():
        return _Lines(total)
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc="trials", smoothing=0.05, mininterval=2.0)


if __name__ == "__main__":
    result = main()
    sys.exit(0 if all(c["passed"] for c in result["checks"]) else 1)
