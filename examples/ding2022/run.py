"""Ding, Drusvyatskiy & Fazel (2022): flat minima of low-rank recovery, and the flat relaxation.

Per cell of the grid (setting x dimension d x number of measurements m, or observation probability p for
completion), the ground truth M (rank 2, unit Frobenius norm; quadratic: rank 3 with signs (+, +, -)) is drawn once
and the measurements ``trials`` times; each trial solves the flat relaxation min ||D1 X D2||_* s.t. A(X) = b (in its
Y-form, ``baselines.flat_relaxation``) and min ||X||_* s.t. A(X) = b (``baselines.min_nuclear_norm``). Settings:
(a) Gaussian matrix sensing, (b) bilinear sensing, (c) matrix completion, (d) quadratic sensing (the quadratic net).
Trials run in parallel worker processes (one BLAS thread each) with a progress bar. Writes

- ``fig3_recovery.png``: success frequency (error < tau) of flat and nuclear recovery, grey heatmaps (black 0,
  white 1), rows d, columns m (p);
- ``fig4_regularity.png``: log10 of the mean norm-minimality and balance of the flat factors, settings (a)-(c);
- ``trials.json``: every trial's errors, statuses and measures,

and prints the reproduction's acceptance checks (Q1-Q3 for ``--quick``, 1-7 for the full grid; the example's README
says what each one means). Exit status 1 when a check fails.

    python examples/ding2022/run.py --quick     # d = 8, 5 trials, m in {16, 56}, p in {0.3, 0.95} (< 1 minute)
    python examples/ding2022/run.py             # d in {5, 10, 15, 20}, m in {10, ..., 200}, p in {0.1, ..., 1}
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings

from lightning_flat.experiments.recovery import SETTINGS, recovery_trial

TAU = 1e-4
LOG_FLOOR = 1e-8  # Fig. 4's colour scale starts here
QUICK = dict(dims=[8], trials=5, m=[16, 56], p=[0.3, 0.95])
FULL = dict(dims=[5, 10, 15, 20], trials=10, m=list(range(10, 201, 10)), p=[round(0.1 * k, 1) for k in range(1, 11)])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--no-progress", action="store_true")
    from lightning_flat.sweep import add_sweep_arguments

    add_sweep_arguments(p, "trials")
    p.add_argument("--replot", metavar="TRIALS_JSON", default=None,
                   help="redraw Figs. 3 and 4 and recompute the grid checks (2-5) from a trials.json, without solving")
    return p.parse_args(argv)


def v1_checks():
    """Check 1 / Q1: the trace identities against torch.func.hessian at random non-interpolating points."""
    import torch

    from lightning_flat import functional as F
    from lightning_flat.functional import flat as FF
    from lightning_flat.measurements import Dense, Entries, RankOne

    f64 = torch.float64
    g = torch.Generator().manual_seed(0)
    d_out, d_in, k, n = 3, 4, 3, 7
    rows = []
    for name, meas in [("Dense", Dense(torch.randn(n, d_out, d_in, generator=g, dtype=f64))),
                       ("RankOne", RankOne(torch.randn(n, d_out, generator=g, dtype=f64),
                                           torch.randn(n, d_in, generator=g, dtype=f64))),
                       ("Entries", Entries(torch.tensor([0, 1, 2, 0, 1, 2, 2]), torch.tensor([0, 1, 2, 3, 3, 0, 1]),
                                           (d_out, d_in), dtype=f64))]:
        Lm, Rm = torch.randn(d_out, k, generator=g, dtype=f64), torch.randn(d_in, k, generator=g, dtype=f64)
        b = torch.randn(n, generator=g, dtype=f64)
        H = F.loss_hessian([Rm.T, Lm], meas, b)
        kR = d_in * k  # W1 = R^T comes first in the flat coordinates
        D1, D2 = FF.rescaling_matrices(meas)
        closed = 2 * (d_in * (D1 @ Lm).square().sum() + d_out * (D2 @ Rm).square().sum())
        blocks = torch.diagonal(H)[kR:].sum() / d_out + torch.diagonal(H)[:kR].sum() / d_in
        err = max(abs(float(torch.trace(H) / closed) - 1), abs(float(F.hessian_trace([Rm.T, Lm], meas) / closed) - 1),
                  abs(float(blocks / FF.scaled_trace(Lm, Rm, D1, D2)) - 1))
        rows.append((f"V1 {name}: tr H = 2(d_in|D1 L|^2 + d_out|D2 R|^2), scaled blocks = str (max rel)", err,
                     err < 1e-8))
    x = torch.randn(n, 4, generator=g, dtype=f64)
    meas = RankOne(x, x)
    U1, U2 = torch.randn(4, 2, generator=g, dtype=f64), torch.randn(4, 1, generator=g, dtype=f64)
    for where, b in (("random point", torch.randn(n, generator=g, dtype=f64)),
                     ("interpolating point", meas(U1 @ U1.T - U2 @ U2.T))):
        def loss(v, b=b):
            a, c = v[:8].reshape(4, 2), v[8:].reshape(4, 1)
            return ((meas(a @ a.T - c @ c.T) - b) ** 2).mean()

        H = torch.func.hessian(loss)(torch.cat([U1.reshape(-1), U2.reshape(-1)]))
        D, _ = FF.rescaling_matrices(meas)
        err = abs(float(torch.trace(H) / FF.quadratic_hessian_trace(U1, U2, meas, b)) - 1)
        if where == "interpolating point":
            err = max(err, abs(float(torch.trace(H) / (8 * 4 * ((D @ U1).square().sum() + (D @ U2).square().sum())))
                               - 1))
        rows.append((f"V1 quadratic net at a {where}: 8d formula (+ residual term) (rel)", err, err < 1e-8))
    return rows


def v3_check(seed_search: int = 10):
    """Q3 / check 7 (sensing): a depth-2 net trained on loss + lambda * trace (L-BFGS, float64) lands on X_flat."""
    import logging

    import lightning as L
    import torch

    from lightning_flat.baselines import flat_relaxation, min_nuclear_norm
    from lightning_flat.datamodules import MatrixSensingDataModule
    from lightning_flat.models import DeepLinearNet

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    for seed in range(seed_search):
        dm = MatrixSensingDataModule(n=24, d_out=8, d_in=8, rank=2, batch_size=None, seed=seed, unit_norm=True)
        Xf, Xn = flat_relaxation(dm.measurements, dm.targets), min_nuclear_norm(dm.measurements, dm.targets)
        if float(torch.linalg.matrix_norm(Xf - Xn)) >= 0.1:
            break
    model = DeepLinearNet([8, 8, 8], init_scale=1e-3, optimizer="lbfgs", lr=1.0, trace_penalty=1e-4, seed=seed)
    trainer = L.Trainer(max_steps=25, precision="64-true", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1)
    trainer.fit(model, dm)
    E = model.end_to_end().detach()
    rel = lambda A, B: float(torch.linalg.matrix_norm(A - B) / torch.linalg.matrix_norm(B))  # noqa: E731
    return seed, rel(E, Xf), rel(E, Xn)


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
    lambda = 1e-5 closer to X_flat (L-BFGS, then a Newton polish)."""
    import logging

    import lightning as L
    import torch

    from lightning_flat.baselines import flat_relaxation, min_nuclear_norm
    from lightning_flat.datamodules import (BilinearSensingDataModule, MatrixCompletionDataModule,
                                            MatrixSensingDataModule)
    from lightning_flat.models import DeepLinearNet

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    makers = {"sensing": lambda s: MatrixSensingDataModule(n=24, d_out=8, d_in=8, rank=2, batch_size=None, seed=s,
                                                           unit_norm=True),
              "bilinear": lambda s: BilinearSensingDataModule(n=32, d_out=8, d_in=8, rank=2, seed=s),
              "completion": lambda s: MatrixCompletionDataModule(d_out=8, d_in=8, rank=2, p=0.5, seed=s)}
    rel = lambda A, B: float(torch.linalg.matrix_norm(A - B) / torch.linalg.matrix_norm(B))  # noqa: E731
    rows = []
    for name, make in makers.items():
        for seed in range(30):
            dm = make(seed)
            try:
                Xf = flat_relaxation(dm.measurements, dm.targets)
            except ValueError:
                continue
            Xn = min_nuclear_norm(dm.measurements, dm.targets)
            if float(torch.linalg.matrix_norm(Xf - Xn)) >= 0.03:
                break
        a = float(dm.measurements.dense().square().sum() / (len(dm.measurements) * 64))
        fits = {}
        for label, lam, wd in (("trace 1e-4", 1e-4, 0.0), ("trace 1e-5", 1e-5, 0.0),
                               ("weight decay", 0.0, 2 * (2 * 1e-4 * 8 * a))):
            model = DeepLinearNet([8, 8, 8], init_scale=1e-3, optimizer="lbfgs", lr=1.0, trace_penalty=lam,
                                  weight_decay=wd, seed=seed)
            trainer = L.Trainer(max_steps=25, precision="64-true", logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1)
            trainer.fit(model, dm)
            E, gnorm = newton_polish(model, dm, lam, wd)
            fits[label] = (rel(E, Xf), rel(E, Xn), gnorm)
        f4, f5, wdc = fits["trace 1e-4"], fits["trace 1e-5"], fits["weight decay"]
        bound = 0.03 if name == "sensing" else 0.1
        rows += [
            (f"7 V3 {name} (seed {seed}): trace 1e-4: rel(E, X_flat) <= {bound}", f4[0], f4[0] <= bound),
            (f"7 V3 {name}: trace 1e-4: rel(E, X_nuc) >= 3 rel(E, X_flat)", f4[1] / max(f4[0], 1e-300),
             f4[1] >= 3 * f4[0]),
            (f"7 V3 {name}: weight decay (mirror): rel(E, X_flat) >= 3 rel(E, X_nuc)", wdc[0] / max(wdc[1], 1e-300),
             wdc[0] >= 3 * wdc[1]),
            (f"7 V3 {name}: lambda 1e-5 cuts rel(E, X_flat) by >= 3x", f4[0] / max(f5[0], 1e-300),
             f4[0] >= 3 * f5[0]),
            (f"7 V3 {name}: Newton polish gradient norm (max over fits)", max(f4[2], f5[2], wdc[2]),
             max(f4[2], f5[2], wdc[2]) < 1e-10),
        ]
    return rows


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

    from lightning_flat.plotting import figure, save

    title = ("Ding et al. 2022, Fig. 3: recovery frequency (|X - M|_F < tau, |M|_F = 1), tau = 1e-4 (rows 1-2) and "
             "the paper's 1e-6 (rows 3-4)")
    fig, axes = figure(4, 4, size=(3.4, 3.0), title=title)
    for j, setting in enumerate(SETTINGS):
        xs = axes_x[setting]
        for i, (method, key, tau) in enumerate((("flat", "flat", "1e-4"), ("nuc", "nuc", "1e-4"),
                                                ("flat", "flat6", "1e-6"), ("nuc", "nuc6", "1e-6"))):
            grid = np.array([[tables[setting][(d, x)][key] for x in xs] for d in dims])
            ax = axes[i, j]
            im = ax.imshow(grid, cmap="gray", vmin=0, vmax=1, origin="lower", aspect="auto",
                           extent=(-0.5, len(xs) - 0.5, -0.5, len(dims) - 0.5))
            ax.set_xticks(range(len(xs)))
            ax.set_xticklabels([f"{x:g}" for x in xs], fontsize=6, rotation=90)
            ax.set_yticks(range(len(dims)))
            ax.set_yticklabels(dims)
            ax.set_title(f"({'abcd'[j]}) {setting}: {'flat relaxation' if method == 'flat' else 'nuclear norm'}, "
                         f"tau {tau}", fontsize=9)
            ax.set_xlabel("p" if setting == "completion" else "m")
            ax.set_ylabel("d")
            ax.grid(False)
    # one shared scale for all 16 panels: white = every trial recovered M, black = none
    fig.colorbar(im, ax=axes, shrink=0.6, label="fraction of trials that recover M (white 1, black 0)")
    paths = [save(fig, os.path.join(out, "fig3_recovery.png"))]
    fig, axes = figure(2, 3, size=(3.6, 3.0), title="Ding et al. 2022, Fig. 4: log10 of the mean measure of the flat "
                                                   "factors")
    cmap = matplotlib.colormaps["viridis"].copy()
    cmap.set_bad("0.85")  # cells where D is singular in every trial: no measure
    for j, setting in enumerate(SETTINGS[:3]):
        xs = axes_x[setting]
        for i, key in enumerate(("normmin", "balance")):
            raw = np.array([[tables[setting][(d, x)][key] for x in xs] for d in dims], dtype=float)
            # exact zeros (completion at p = 1: kappa = 1) would stretch the scale to 1e-16: floor at 1e-8
            grid = np.ma.masked_invalid(np.log10(np.clip(raw, LOG_FLOOR, None)))
            ax = axes[i, j]
            im = ax.imshow(grid, cmap=cmap, origin="lower", aspect="auto",
                           extent=(-0.5, len(xs) - 0.5, -0.5, len(dims) - 0.5))
            fig.colorbar(im, ax=ax, shrink=0.8, label=f"log10 (floor {math.log10(LOG_FLOOR):g})")
            for (r, c), v in np.ndenumerate(raw):
                if not np.isfinite(v):
                    ax.text(c, r, "D\nsing.", ha="center", va="center", fontsize=5, color="0.3")
            ax.set_xticks(range(len(xs)))
            ax.set_xticklabels([f"{x:g}" for x in xs], fontsize=6, rotation=90)
            ax.set_yticks(range(len(dims)))
            ax.set_yticklabels(dims)
            ax.set_title(f"({'abc'[j]}) {setting}: {'norm-minimality' if key == 'normmin' else 'balance'}", fontsize=9)
            ax.set_xlabel("p" if setting == "completion" else "m")
            ax.set_ylabel("d")
            ax.grid(False)
    paths.append(save(fig, os.path.join(out, "fig4_regularity.png")))
    return paths


def v2_checks(trials):
    ok = [t for t in trials if not t["singular"] and t.get("solver_error") is None]
    feas = all(t["feasibility"] <= 1e-6 + 1e-6 * t["b_inf"] for t in ok)
    worst_feas = max(t["feasibility"] / (1e-6 + 1e-6 * t["b_inf"]) for t in ok)
    bal = max(t["d_balance"] for t in ok)
    four = max(abs(t["str_flat"] / t["four_y"] - 1) for t in ok)
    order = all(t["str_flat"] <= t["str_nuc"] * (1 + 1e-6) for t in ok)
    bounds = all(t["bound22"] and t["bound23"] for t in ok)
    return [("V2 feasibility A(L_f R_f^T) = b within 1e-6 + 1e-6|b|_inf, every nonsingular trial (worst / allowed)",
             worst_feas, feas),
            ("V2 D-balance L^T D1^2 L = R^T D2^2 R (max rel)", bal, bal < 1e-6),
            ("V2 str(L_f, R_f) = 4 |Y|_* (max rel)", four, four < 1e-6),
            ("V2 str(flat) <= str(balanced factors of X_nuc), every trial", float(order), order),
            ("5 bounds (22)-(23) hold in every nonsingular trial", float(bounds), bounds)]


def checks_quick(tables, trials, axes_x, dims):
    rows = []
    for setting in SETTINGS:
        lo, hi = axes_x[setting][0], axes_x[setting][-1]
        need = 0.6 if setting == "completion" else 0.8
        for d in dims:
            c_lo, c_hi = tables[setting][(d, lo)], tables[setting][(d, hi)]
            rows.append((f"Q2 {setting} d={d}: success 0 at {lo:g} (flat, nuc)", max(c_lo["flat"], c_lo["nuc"]),
                         c_lo["flat"] == 0 and c_lo["nuc"] == 0))
            rows.append((f"Q2 {setting} d={d}: success >= {need} at {hi:g} (min of flat, nuc)",
                         min(c_hi["flat"], c_hi["nuc"]), min(c_hi["flat"], c_hi["nuc"]) >= need))
    return rows + [("Q2 " + n, v, ok) for n, v, ok in v2_checks(trials)]


def checks_full(tables, trials, axes_x, dims):
    rows = [("2 " + n if not n.startswith("5") else n, v, ok) for n, v, ok in v2_checks(trials)]
    for setting in SETTINGS:
        xs = axes_x[setting]
        t = tables[setting]
        first = max(t[(d, xs[0])][m] for d in dims for m in ("flat", "nuc"))
        rows.append((f"3 {setting}: success 0 in the first column", first, first == 0))
        if setting == "completion":
            last = min(t[(d, 1.0)][m] for d in dims for m in ("flat", "nuc"))
            rows.append(("3 completion: success >= 0.9 at p = 1.0", last, last >= 0.9))
        else:
            last = min(t[(d, xs[-1])][m] for d in dims if d <= 15 for m in ("flat", "nuc"))
            rows.append((f"3 {setting}: success >= 0.9 in the last column for d <= 15", last, last >= 0.9))
        diffs = [abs(t[c]["flat"] - t[c]["nuc"]) for c in t]
        mean_d, max_d = sum(diffs) / len(diffs), max(diffs)
        rows.append((f"4 {setting}: mean |P_flat - P_nuc| <= 0.1", mean_d, mean_d <= 0.1))
        rows.append((f"4 {setting}: max |P_flat - P_nuc| <= 0.5", max_d, max_d <= 0.5))
        trans = {}
        for d in dims:
            tf = next((i for i, x in enumerate(xs) if t[(d, x)]["flat"] >= 0.5), len(xs))
            tn = next((i for i, x in enumerate(xs) if t[(d, x)]["nuc"] >= 0.5), len(xs))
            trans[d] = (tf, tn)
        gaps = [abs(a - b) for a, b in trans.values()]
        rows.append((f"4 {setting}: 50% transitions of flat within 2 steps of nuc (max gap)", max(gaps),
                     max(gaps) <= 2))
        within1 = sum(g <= 1 for g in gaps) / len(gaps)
        rows.append((f"4 {setting}: within 1 step for >= 75% of d", within1, within1 >= 0.75))
        if setting != "completion":
            flat_t = [trans[d][0] for d in dims]
            mono = all(a <= b for a, b in zip(flat_t, flat_t[1:]))
            rows.append((f"4 {setting}: flat transition nondecreasing in d", float(mono), mono))
        if setting != "quadratic":
            good = [c for c in t if t[c]["flat"] >= 0.9 and t[c]["nonsingular"]
                    and not (setting == "completion" and c[1] == 1.0)]
            for key, lo, hi in (("normmin", 1e-8, 0.05), ("balance", 1e-4, 0.5)):
                if not good:
                    break
                means = [t[c][key] for c in good]
                where = f"cell means where flat success >= 0.9 ({len(good)} cells)"
                rows.append((f"5 {setting}: {key} {where} > {lo:g} (min)", min(means), min(means) > lo))
                rows.append((f"5 {setting}: {key} {where} <= {hi:g} (max)", max(means), max(means) <= hi))
                # the measures shrink as measurements are added: last third of the nonsingular columns vs the first
                worst = -math.inf
                for d in dims:
                    col = [t[(d, x)][key] for x in xs if t[(d, x)]["nonsingular"]]
                    k = len(col) // 3
                    if k:
                        first, last = sum(col[:k]) / k, sum(col[-k:]) / k
                        ratio = last / first if first > 0 else (1.0 if last == 0 else math.inf)
                        worst = max(worst, ratio)
                rows.append((f"5 {setting}: {key} mean over the last third of nonsingular columns <= first third, "
                             f"every d (max ratio last/first)", worst, worst <= 1.0))
    bad = sum(1 for x in trials if 1e-4 < x["error_flat"] < 1e-3 or 1e-4 < x["error_nuc"] < 1e-3)
    rows.append(("3 fewer than 2% of errors in (1e-4, 1e-3) (fraction)", bad / (2 * len(trials)),
                 bad / (2 * len(trials)) < 0.02))
    return rows


def identity_check():
    """Check 6: A = I (every entry observed): X_flat = M and both measures vanish."""
    import torch

    from lightning_flat.baselines import flat_relaxation, min_nuclear_norm
    from lightning_flat.datamodules.recovery import unit_low_rank
    from lightning_flat.functional import flat as FF
    from lightning_flat.measurements import Entries

    d = 8
    M = unit_low_rank(d, d, 2, torch.Generator().manual_seed(0))
    meas = Entries(torch.arange(d).repeat_interleave(d), torch.arange(d).repeat(d), (d, d), dtype=torch.float64)
    p = flat_relaxation(meas, meas(M), return_parts=True)
    Lf, Rf = FF.flat_factors(p["Y"], p["D1"], p["D2"])
    ms = FF.flatness_measures(Lf, Rf, min_nuclear_norm(meas, meas(M)), M)
    err = float(torch.linalg.matrix_norm(p["X"] - M))
    return [("6 A = I: |X_flat - M|_F", err, err < 1e-6),
            ("6 A = I: normmin <= 1e-8", abs(float(ms["normmin"])), abs(float(ms["normmin"])) <= 1e-8),
            ("6 A = I: balance <= 1e-8", float(ms["balance"]), float(ms["balance"]) <= 1e-8)]


def main(argv=None) -> dict:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # one BLAS thread per worker (inherited by spawned workers)
    os.environ.setdefault("MKL_NUM_THREADS", "1")
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from lightning_flat.threads import use_threads

    use_threads()  # this process too: one intra-op thread (tiny models)
    if args.replot:
        return replot(args.replot, args.out)
    cfg = QUICK if args.quick else FULL
    out = args.out or os.path.join("outputs", "ding2022_quick" if args.quick else "ding2022")
    from lightning_flat.io import output_folder

    output_folder(out)  # fails now, naming it, if nothing can be written there
    t0 = time.perf_counter()
    dims = cfg["dims"]
    axes_x = _axes(cfg)
    jobs = [(s, d, x, k) for s in SETTINGS for d in dims for x in axes_x[s] for k in range(cfg["trials"])]
    jobs.sort(key=lambda j: -j[1] * (j[2] if j[0] != "completion" else 100))  # big solves first
    from lightning_flat.sweep import run_sweep

    sweep_dir = os.path.join(out, "sweep")
    bar = _progress(None, len(jobs), not args.no_progress)
    rows = run_sweep(recovery_trial, [dict(setting=s, d=d, x=x, trial=k) for s, d, x, k in jobs], sweep_dir,
                     engine=args.engine, workers=args.workers, address=args.address, resume=args.resume,
                     progress=(lambda row: bar.update(1)) if bar is not None else None)
    if bar is not None:
        bar.close()
    trials = [row["result"] for row in rows]
    solve_seconds = time.perf_counter() - t0

    tables = {s: cell_table(trials, s, dims, axes_x[s]) for s in SETTINGS}
    paths = figures(tables, dims, axes_x, out)
    checks = [("1 " + n if not args.quick else "Q1 " + n, v, ok) for n, v, ok in v1_checks()]
    checks += checks_quick(tables, trials, axes_x, dims) if args.quick else checks_full(tables, trials, axes_x, dims)
    checks += identity_check()
    if not args.quick:
        checks += v3_full()
    seed, rel_flat, rel_nuc = v3_check()
    checks += [(f"{'Q3' if args.quick else '7'} V3 sensing d=8 m=24 (seed {seed}): rel(E, X_flat) <= 0.03", rel_flat,
                rel_flat <= 0.03),
               (f"{'Q3' if args.quick else '7'} V3: rel(E, X_nuc) >= 0.1 and >= 3 rel(E, X_flat)", rel_nuc,
                rel_nuc >= 0.1 and rel_nuc >= 3 * rel_flat)]

    for s in SETTINGS:
        print(f"\n({'abcd'[SETTINGS.index(s)]}) {s}: success flat / nuc (tau = {TAU:g}), mean normmin, balance")
        for d in dims:
            print(f"  d={d:2d}: " + "  ".join(
                f"{x:g}:{tables[s][(d, x)]['flat']:.1f}/{tables[s][(d, x)]['nuc']:.1f}" for x in axes_x[s]))
    failed = [t for t in trials if t.get("solver_error")]
    print(f"\nsolver failures (counted as failed trials): {len(failed)} of {2 * len(trials)} programs")
    for t in failed[:5]:
        print(f"  {t['setting']} d={t['d']} x={t['x']} trial {t['trial']}: {t['solver_error'][:200]}")
    print("\nchecks:")
    _print_checks(checks)
    total = time.perf_counter() - t0
    print(f"\n{len(trials)} trials ({2 * len(trials)} convex programs) in {solve_seconds:.0f} s on {args.workers} "
          f"worker(s); wrote {', '.join(paths)}; total {total:.0f} s")
    summary = dict(config=cfg, seconds=total, solve_seconds=solve_seconds, figures=paths,
                   checks=_check_rows(checks))
    from lightning_flat.io import write_json

    write_json(os.path.join(out, "trials.json"), {**summary, "trials": trials})
    return summary


def _axes(cfg) -> dict:
    """Per setting, the grid's x values: m, or p for completion."""
    return {s: (cfg["p"] if s == "completion" else cfg["m"]) for s in SETTINGS}


def _print_checks(checks) -> None:
    for name, value, ok in checks:
        print(f"  [{'PASS' if ok else 'FAIL'}] {name}: {value:.4g}")


def _check_rows(checks) -> list[dict]:
    return [dict(name=n, value=float(v), passed=bool(ok)) for n, v, ok in checks]


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
    checks = (checks_quick if cfg == QUICK else checks_full)(tables, trials, axes_x, dims)
    _print_checks(checks)
    print(f"wrote {', '.join(paths)}")
    return dict(config=cfg, figures=paths, checks=_check_rows(checks))


def _progress(iterable, total, enabled):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc="trials", smoothing=0.05, mininterval=2.0)


if __name__ == "__main__":
    result = main()
    sys.exit(0 if all(c["passed"] for c in result["checks"]) else 1)
