"""Gatmiry et al. (2023): label-noise SGD finds the flattest factorization and the minimum nuclear norm solution.

Deep matrix factorization E = W_L ... W_1 on Gaussian matrix sensing, trained by label-noise SGD (then a noiseless
polish) and by plain SGD, with the library's Trainer, datamodule and callbacks. Per depth, the label-noise run and
the plain run start from the same seed (the same init and the same minibatches, so the plain run is "the same loop
with no noise"); the plain run stops after ``plain_steps``, once converged. The full run's noise phase grows with
depth (8e4 steps per layer). The runs go through a sweep of worker processes (``--workers``). Writes

- ``fig1_losses.png``: train loss (full data, no noise) and test loss ||E - M*||_F^2 / ||M*||_F^2, log-y, one panel
  per depth, label noise vs plain;
- ``fig2_trace_nuclear.png``: Hessian trace with the predicted minimum F_L = 2L (d_0 d_L)^{1/L} ||X||_*^{2-2/L}, and
  ||E||_* with the minimum nuclear norm ||X||_*;
- ``results.json`` and one wandb run per depth and mode (offline unless WANDB_MODE says otherwise),

and prints a results table next to reference values from an independent re-implementation, and the reproduction's
acceptance checks (Q1-Q4 for ``--quick``, checks 1-5 for the full run). Exit status 1 when a check fails.

    python examples/gatmiry2023/run.py --quick            # d=20, n=200, r=2, depths 2 and 3 (< 1 minute)
    python examples/gatmiry2023/run.py                    # the paper's size: d=60, n=600, r=3, depths 2, 3, 5, 10
"""

from __future__ import annotations

import math
import os
import sys
import time

import torch

from lightning_flat.experiments.checks import Check, evaluate, nan_median

QUICK = dict(d=20, n=200, r=2, depths=[2, 3], c=0.9, lr=0.05, batch_size=50, std=1.0, noise_steps=6000,
             polish_steps=1000, plain_steps=3000, every=100, flat_window=1000, seed=0)
#: The full run's label-noise phase grows with depth: 8e4 steps per layer. The trace curves of earlier runs
#: flatten onto their final level after about 5e4 (L = 2), 1e5 (L = 3), 3e5 (L = 5) and 6e5-9e5 (L = 10) noisy
#: steps; 8e4 L (1.6e5, 2.4e5, 4e5, 8e5) covers the first three with room and reaches the last part of the
#: depth-10 window, as long a phase as keeps the full run within 20 minutes on 2 cores (a depth-10 step costs about
#: 1.3 ms). ``flattening`` reports, per depth, how much the trace still moved over the last ``flat_window`` noisy
#: steps. The plain runs have converged (train loss 1e-30) by 8e3 steps: 2e4 steps each.
FULL = dict(d=60, n=600, r=3, depths=[2, 3, 5, 10], c=0.9, lr=0.01, batch_size=50, std=1.0, noise_steps=None,
            noise_steps_per_layer=80_000, polish_steps=20_000, plain_steps=20_000, every=1000, flat_window=50_000,
            seed=0)

#: Reference values from an independent NumPy re-implementation (seed 0 of numpy's default_rng; our torch draw
#: differs): per depth, initial trace, label-noise final trace / F_L, label-noise |E|_*/|X|_*, label-noise rel. test,
#: plain trace, plain |E|_*, plain rel. test.
CALIB = {2: (1.1e4, 1.005, 1.005, 0.076, 5500, 16.7, 3.30), 3: (2.1e4, 1.015, 1.006, 0.085, 4336, 10.7, 1.77),
         5: (1.49e4, 1.035, 1.011, 0.108, 3990, 8.2, 1.38), 10: (9.2e3, 1.09, 1.013, 0.114, 4778, 6.6, 1.36)}
MODES = ("label_noise", "plain")
NAME = "gatmiry2023"


def parse_args(argv=None):
    from lightning_flat.experiments.scripts import example_parser

    p = example_parser(__doc__, NAME, quick_help="the quick setting (d=20, n=200, r=2, L=2,3)", sweep_noun="depths",
                       workers_help="parallel processes over depths (default: 1 quick, 2 full)",
                       replot_help="redraw Figs. 1 and 2 from a results.json (next to it, or in --out) without "
                                   "training")
    p.add_argument("--depths", type=int, nargs="+", default=None, help="override the depths")
    p.add_argument("--seed", type=int, default=None, help="problem, init and noise seed")
    p.add_argument("--noise-steps", type=int, default=None, help="override the label-noise steps")
    p.add_argument("--polish-steps", type=int, default=None, help="override the noise-free polish steps")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def replot(summary, out) -> list[str]:
    """Redraw the figures of an earlier run from its ``results.json`` (no training, no solve)."""
    cfg = summary["config"]
    runs = {int(L): run for L, run in summary["runs"].items()}
    Fhat = {int(L): v for L, v in summary["F_hat"].items()}
    return figures(runs, Fhat, summary["X_nuclear"], out, _title(cfg))


def _title(cfg) -> str:
    return f"Gatmiry et al. 2023, d={cfg['d']}, n={cfg['n']}, r={cfg['r']}"


def make_data(cfg):
    from lightning_flat.datamodules import MatrixSensingDataModule

    return MatrixSensingDataModule(n=cfg["n"], d_out=cfg["d"], d_in=cfg["d"], rank=cfg["r"],
                                   batch_size=cfg["batch_size"], seed=cfg["seed"])


def run_trial(config):
    """One run (a depth and a mode) as a sweep trial (``lightning_flat.sweep``): JSON in, JSON out."""
    from lightning_flat.sweep import trial_folder  # its wandb run comes back to OUT from any Ray node

    return train_run(config["depth"], config["mode"], config["cfg"], trial_folder(config["out"]), config["wandb"],
                     config["progress"], config["threads"], config["position"])


def noise_steps(cfg, depth):
    """The label-noise phase at ``depth``: ``cfg["noise_steps"]`` when given as a number, else
    ``cfg["noise_steps_per_layer"] * depth`` (the trace flattens later at larger depths)."""
    if cfg.get("noise_steps") is not None:
        return int(cfg["noise_steps"])
    return int(cfg["noise_steps_per_layer"] * depth)


def train_run(depth, mode, cfg, out, use_wandb, progress, threads=None, position=0):
    """One run at one depth: label-noise SGD (``mode="label_noise"``: noise_steps(cfg, depth) noisy steps, then a
    noiseless polish) or plain SGD (``"plain"``: ``plain_steps`` steps). Both start from the same seed: the same
    initialization and the same minibatches. Returns its curves and final values."""
    from lightning_flat import functional as F
    from lightning_flat.callbacks import FiniteLossGuard, HessianTrace, HyperparameterSchedule, LabelNoise, MatrixNorms
    from lightning_flat.experiments.training import fit, quiet
    from lightning_flat.models import DeepLinearNet

    quiet(threads)
    dm = make_data(cfg)
    d, every, lr = cfg["d"], cfg["every"], cfg["lr"]
    model = DeepLinearNet([d] * (depth + 1), init="gaussian", init_scale=cfg["c"] / math.sqrt(d), lr=lr,
                          seed=cfg["seed"])
    trace, norms, guard = HessianTrace(every), MatrixNorms(every), FiniteLossGuard()
    callbacks = [trace, norms, guard]
    if mode == "label_noise":
        noisy = noise_steps(cfg, depth)
        steps = noisy + cfg["polish_steps"]
        callbacks = [LabelNoise(cfg["std"], seed=cfg["seed"]),
                     HyperparameterSchedule(label_noise=[(0, cfg["std"]), (noisy, 0.0)], every_n_steps=every),
                     *callbacks]
    else:
        steps = cfg["plain_steps"]
    if progress:
        # a bar in a terminal (redrawn once per chunk of steps), else a line every 1000 steps
        progress = dict(every_n_steps=1000, process_position=position, name=f"L={depth} {mode.replace('_', ' ')}")
    meas, targets = dm.measurements, dm.targets
    scale = float(dm.ground_truth.square().sum())
    with torch.no_grad():
        E0 = model.end_to_end().double()
        init = (float(F.measurement_loss(E0, meas, targets)), float(dm.test_error(E0)) / scale)
    done = fit(model, dm, steps, callbacks=callbacks, log_every_n_steps=every, progress=progress,
               wandb=f"{NAME}-L{depth}-{mode.replace('_', '-')}" if use_wandb else None, out=out,
               config={**cfg, "depth": depth, "mode": mode, "steps": steps})
    memory = done.memory
    with torch.no_grad():
        W = [w.detach().double() for w in model.weights()]
        E = F.end_to_end(W)
        P, S = F.partial_products(W)
        final = dict(train_loss=float(F.measurement_loss(E, meas, targets)),
                     test_error=float(dm.test_error(E)), rel_test=float(dm.test_error(E)) / scale,
                     trace=float(F.hessian_trace(W, meas)), nuclear=float(F.nuclear_norm(E)),
                     balancedness=float(F.balancedness(W)),
                     r_terms=[float(P[j].square().sum() * S[j].square().sum()) for j in range(depth)],
                     top_sv_first=[float(x) for x in torch.linalg.svdvals(W[0])[:cfg["r"]]],
                     top_sv_last=[float(x) for x in torch.linalg.svdvals(W[-1])[:cfg["r"]]],
                     sv_E=[float(x) for x in torch.linalg.svdvals(E)[:cfg["r"]]])
    train = [(0, init[0])] + memory.history.get("train/full_loss", [])
    test = [(0, init[1])] + memory.history.get("test/relative_error", [])
    tr_h = trace.history["hessian/trace"]
    nuc_h = norms.history["norm/nuclear"]
    return dict(depth=depth, mode=mode, steps=steps, noise_steps=noisy if mode == "label_noise" else 0,
                seconds=done.seconds, stopped=guard.message, diverged=model.diverged, wandb_dir=done.wandb_dir,
                final=final, init_trace=tr_h[0][1], curves=dict(
                    train=[list(x) for x in zip(*train)], test=[list(x) for x in zip(*test)],
                    trace=[list(x) for x in zip(*tr_h)], nuclear=[list(x) for x in zip(*nuc_h)]))


def flattening(run, window):
    """The label-noise run's trace over its last two ``window``-step stretches of noise: the median of each and the
    relative change between them (how flat the trace is when the noise stops)."""
    steps, values = run["curves"]["trace"]
    end = run["noise_steps"]
    last = [v for s, v in zip(steps, values) if end - window < s <= end]
    before = [v for s, v in zip(steps, values) if end - 2 * window < s <= end - window]
    if not last or not before:
        return dict(window=window, median_last=math.nan, median_before=math.nan, change=math.nan)
    a, b = nan_median(before), nan_median(last)
    return dict(window=window, median_before=a, median_last=b, change=(b - a) / a)


def label_noise(r, L):
    return r["runs"][str(L)]["label_noise"]["final"]


def plain(r, L):
    return r["runs"][str(L)]["plain"]["final"]


def sv_deviation(L, which):  # check 5: the largest relative deviation of s_k(W) / sigma_k(E)^(1/2) from the first
    def read(r):
        ratios = [a / b ** 0.5 for a, b in zip(label_noise(r, L)[which], label_noise(r, L)["sv_E"])]
        return max(abs(x - ratios[0]) / ratios[0] for x in ratios)
    return read


def r_spread(L):  # check 5: (max - min) / mean of the L terms |P_j|_F^2 |S_j|_F^2 of R
    def read(r):
        terms = label_noise(r, L)["r_terms"]
        return (max(terms) - min(terms)) / (sum(terms) / len(terms))
    return read


def checks_quick(depths):
    """The quick checks Q1-Q4 (``--quick``)."""
    return [Check("Q1 nuclear-norm solution recovers M* (rel err < 1e-6)", "at this size X is M*", "X_rel_err", "<",
                  1e-6),
            Check("Q1 min-Frobenius rel err in [0.4, 0.7]", "an interpolant blind to low rank does not recover M*",
                  "min_frobenius_rel_err", "in", (0.4, 0.7))] + [row for L in depths for row in depth_checks(L, True)]


def checks_full(depths):
    """The acceptance checks 1-5 of the full run."""
    return [Check("1 rank M* = 3", "the problem", "M_rank", "==", 3),
            Check("1 |M*|_F^2 in [1.5, 5]", "the draw has the expected scale", "M_fro2", "in", (1.5, 5)),
            Check("1 min-Frobenius rel err in [0.75, 0.90]", "1 - n/d^2 = 0.83 expected", "min_frobenius_rel_err", "in",
                  (0.75, 0.90)),
            Check("1 |X|_* <= |M*|_* + 1e-6", "M* fits the data, so X cannot have a larger nuclear norm",
                  lambda r: r["X_nuclear"] - r["M_nuclear"], "<=", 1e-6)] + [
        row for L in depths for row in depth_checks(L, False)]


def depth_checks(L, quick):
    """The rows of one depth: Q2-Q4 (quick) or 2-5 (full)."""
    def ln(r):
        return label_noise(r, L)

    def pl(r):
        return plain(r, L)

    def fell(r):  # the label-noise run's trace at step 0 over its final one
        return r["runs"][str(L)]["label_noise"]["init_trace"] / ln(r)["trace"]

    if quick:
        return [
            Check(f"Q2 L={L} label noise |E|_*/|X|_* in [0.995, 1.03]", "label noise ends at the least nuclear norm",
                  lambda r: ln(r)["nuclear"] / r["X_nuclear"], "in", (0.995, 1.03)),
            Check(f"Q3 L={L} label noise trace/F_L in [0.9, 1.1]", "and at the least Hessian trace",
                  lambda r: ln(r)["trace"] / r["F_hat"][L], "in", (0.9, 1.1)),
            Check(f"Q3 L={L} label noise trace fell >= 5x from init", "it made the network flatter", fell, ">=", 5),
            Check(f"Q4 L={L} label noise rel test <= 0.01", "and recovers M*", lambda r: ln(r)["rel_test"], "<=", 0.01),
            Check(f"Q4 L={L} plain train loss < 1e-8", "plain SGD fits too", lambda r: pl(r)["train_loss"], "<", 1e-8),
            Check(f"Q4 L={L} plain rel test >= 0.2", "but far from M*", lambda r: pl(r)["rel_test"], ">=", 0.2),
            Check(f"Q4 L={L} plain trace >= 3x label noise", "and sharper",
                  lambda r: pl(r)["trace"] / ln(r)["trace"], ">=", 3)]
    rows = [
        Check(f"2 L={L} label-noise trace fell >= 10x", "label noise flattens the network", fell, ">=", 10),
        Check(f"2 L={L} label-noise trace/F_L in [0.95, 1.15]", "to the predicted minimum trace",
              lambda r: ln(r)["trace"] / r["F_hat"][L], "in", (0.95, 1.15)),
        Check(f"2 L={L} label-noise |E|_*/|X|_* in [0.995, 1.03]", "at the least nuclear norm",
              lambda r: ln(r)["nuclear"] / r["X_nuclear"], "in", (0.995, 1.03)),
        Check(f"2 L={L} label-noise rel test <= 0.15", "and generalizes", lambda r: ln(r)["rel_test"], "<=", 0.15),
        Check(f"3 L={L} plain train < 1e-10", "plain SGD interpolates", lambda r: pl(r)["train_loss"], "<", 1e-10),
        Check(f"3 L={L} plain rel test >= 0.8", "but does not generalize", lambda r: pl(r)["rel_test"], ">=", 0.8),
        Check(f"3 L={L} plain |E|_* >= 2|X|_*", "far from the least nuclear norm",
              lambda r: pl(r)["nuclear"] / r["X_nuclear"], ">=", 2),
        Check(f"3 L={L} plain trace >= 5 F_L", "and from the flattest point",
              lambda r: pl(r)["trace"] / r["F_hat"][L], ">=", 5),
        Check(f"4 L={L} plain rel test >= 5x label noise", "the two test losses are far apart",
              lambda r: pl(r)["rel_test"] / max(ln(r)["rel_test"], 1e-300), ">=", 5)]
    if L >= 3:
        rows += [Check(f"5 L={L} R-terms agree within 5%", "the factorization is the flattest one", r_spread(L), "<=",
                       0.05),
                 Check(f"5 L={L} balancedness not small (> 1)", "not the balanced one",
                       lambda r: ln(r)["balancedness"], ">", 1.0),
                 *[Check(f"5 L={L} {name} top singular values follow sigma_k(E)^(1/2) (max rel deviation)",
                         "end layers carry sigma_k(E)^(1/2)", sv_deviation(L, key), "<=", 0.2)
                   for name, key in (("W_1", "top_sv_first"), ("W_L", "top_sv_last"))]]
    return rows


def figures(runs, Fhat, Xnuc, out, title):
    """Fig. 1 (losses) and Fig. 2 (trace with F_L, nuclear norm with |X|_*): one column per depth, one legend below
    the panels."""
    from lightning_flat.plotting import COLORS, figure, figure_legend, save, series

    depths = sorted(runs)
    specs = [
        ("fig1_losses.png", "losses", [("train", "train loss (full data, no noise)", None),
                                       ("test", r"test loss / $\|M^*\|_F^2$", None)]),
        ("fig2_trace_nuclear.png", "flatness and nuclear norm",
         [("trace", r"Hessian trace $\mathrm{tr}\,\nabla^2 L$",
           lambda L: (Fhat[L], "$F_L$", r"predicted minimum trace $F_L$")),
          ("nuclear", r"$\|E\|_*$", lambda L: (Xnuc, r"$\|X\|_*$", r"minimum nuclear norm $\|X\|_*$"))]),
    ]
    paths = []
    for filename, what, rows in specs:
        fig, axes = figure(len(rows), len(depths), title=f"{title}: {what}")
        for k, L in enumerate(depths):
            for r, (key, name, ref) in enumerate(rows):
                ax = axes[r, k]
                for mode in MODES:
                    steps_, values = runs[L][mode]["curves"][key]
                    label = mode.replace("_", " ")
                    if mode == "plain" and steps_:  # say why the curve stops
                        label += f" (converged, ends at step {steps_[-1]:.0e})"
                    series(ax, steps_, values, label=label, logy=True, color=COLORS[mode])
                    if mode == "plain" and steps_:
                        ax.plot([steps_[-1]], [values[-1]], marker="|", ms=10, color=COLORS[mode])
                ax.axvline(runs[L]["label_noise"]["noise_steps"], color="gray", ls=":", lw=1.0,
                           label="noise off (polish)")
                if ref is not None:  # the value in the title, the line in the figure's legend
                    y, short, label = ref(L)
                    ax.axhline(y, color=COLORS["theory"], ls="--", lw=1.0, label=f"{label} (dashed)")
                ax.set_title(f"$L$ = {L}: {name}" + (f", {short} = {y:.4g}" if ref is not None else ""))
                ax.set_ylabel(name)
        figure_legend(fig, *axes.flat, ncol=4)
        paths.append(save(fig, os.path.join(out, filename)))
    return paths


def main(argv=None) -> dict:
    from lightning_flat.experiments import scripts

    args = parse_args(argv)
    if args.replot:
        return scripts.replot(args.replot, args.out, replot)
    out, t_start = scripts.start(args, NAME)
    from lightning_flat import functional as F
    from lightning_flat.baselines import min_nuclear_norm
    from lightning_flat.io import write_json
    from lightning_flat.sweep import run_sweep

    cfg = dict(QUICK if args.quick else FULL)
    for key in ("depths", "seed", "noise_steps", "polish_steps"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    workers = args.workers or (1 if args.quick else 2)

    dm = make_data(cfg)
    Mstar = dm.ground_truth
    scale = float(Mstar.square().sum())
    t0 = time.perf_counter()
    X = min_nuclear_norm(dm.measurements, dm.targets, cache_dir=os.path.join(out, "cache"))
    solve_seconds = time.perf_counter() - t0
    Xnuc = float(F.nuclear_norm(X))
    X_err = float((X - Mstar).square().sum() / scale)
    frob_err = float(dm.test_error(F.min_frobenius_interpolant(dm.measurements, dm.targets)) / scale)
    Fhat = {L: float(F.predicted_min_trace(X, L)) for L in cfg["depths"]}
    print(f"problem: d={cfg['d']} n={cfg['n']} r={cfg['r']} seed={cfg['seed']}  |M*|_F^2={scale:.4f}  "
          f"|M*|_*={float(F.nuclear_norm(Mstar)):.4f}  |X|_*={Xnuc:.4f} (rel err {X_err:.2e}, solved or loaded in "
          f"{solve_seconds:.1f} s)  min-Frobenius rel err {frob_err:.3f}")
    print("predicted min trace F_L: " + ", ".join(f"L={L}: {v:.2f}" for L, v in Fhat.items()), flush=True)

    use_wandb = not args.no_wandb
    t_train = time.perf_counter()
    # the longest runs first: label noise from the deepest, then the shorter plain runs
    order = [(L, "label_noise") for L in sorted(cfg["depths"], reverse=True)] + [
        (L, "plain") for L in sorted(cfg["depths"], reverse=True)]
    configs = [dict(depth=L, mode=mode, cfg=cfg, out=out, wandb=use_wandb, progress=not args.no_progress,
                    threads=args.threads, position=i % workers) for i, (L, mode) in enumerate(order)]
    rows = run_sweep(run_trial, configs, os.path.join(out, "sweep"), engine=args.engine, workers=workers,
                     address=args.address, resume=args.resume,
                     progress=lambda row: print(f"  done: L={row['config']['depth']} {row['config']['mode']} in "
                                                f"{row['seconds']:.0f} s", flush=True))
    results = {(row["config"]["depth"], row["config"]["mode"]): row["result"] for row in rows}
    train_seconds = time.perf_counter() - t_train
    runs = {L: {"depth": L, "scale": scale, **{mode: results[L, mode] for mode in MODES},
                "seconds": sum(results[L, mode]["seconds"] for mode in MODES),
                "flattening": flattening(results[L, "label_noise"], cfg["flat_window"])} for L in cfg["depths"]}

    paths = figures(runs, Fhat, Xnuc, out, _title(cfg))
    print("\n| L | init trace | LN trace / F_L | LN |E|_*/|X|_* | LN rel test | LN train | plain trace | plain |E|_* "
          "| plain rel test | plain train | seconds |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for L in cfg["depths"]:
        ln, pl = runs[L]["label_noise"]["final"], runs[L]["plain"]["final"]
        print(f"| {L} | {runs[L]['label_noise']['init_trace']:.4g} | {ln['trace'] / Fhat[L]:.4f} | "
              f"{ln['nuclear'] / Xnuc:.4f} | {ln['rel_test']:.4f} | {ln['train_loss']:.1e} | {pl['trace']:.4g} | "
              f"{pl['nuclear']:.3f} | {pl['rel_test']:.3f} | {pl['train_loss']:.1e} | {runs[L]['seconds']:.0f} |")
        if not args.quick and L in CALIB:
            c = CALIB[L]
            print(f"| {L} (reference) | {c[0]:.4g} | {c[1]:.4f} | {c[2]:.4f} | {c[3]:.4f} | | {c[4]:.4g} | "
                  f"{c[5]:.3f} | {c[6]:.3f} | | |")
    print(f"\nlabel-noise trace / F_L over the last two {cfg['flat_window']:.0e}-step stretches of noise (medians; "
          "how flat the trace is when the noise stops):")
    for L in cfg["depths"]:
        fl, ln = runs[L]["flattening"], runs[L]["label_noise"]
        print(f"  L={L} ({ln['noise_steps']} noisy steps): {fl['median_before'] / Fhat[L]:.4f} -> "
              f"{fl['median_last'] / Fhat[L]:.4f} ({100 * fl['change']:+.2f}%)")
    summary = dict(config=cfg, X_nuclear=Xnuc, X_rel_err=X_err, min_frobenius_rel_err=frob_err, F_hat=Fhat,
                   M_rank=int(torch.linalg.matrix_rank(Mstar)), M_fro2=scale, M_nuclear=float(F.nuclear_norm(Mstar)),
                   runs={str(L): {k: v for k, v in runs[L].items()} for L in cfg["depths"]})
    checks = evaluate((checks_quick if args.quick else checks_full)(cfg["depths"]), summary)
    total = time.perf_counter() - t_start
    print(f"\nnuclear-norm solve {solve_seconds:.1f} s, training {train_seconds:.0f} s ({workers} worker(s)), "
          f"total {total:.0f} s")
    summary.update(solve_seconds=solve_seconds, train_seconds=train_seconds, seconds=total, workers=workers,
                   figures=paths, checks=checks)
    results_path = os.path.join(out, "results.json")
    write_json(results_path, summary)
    written = [(p, f"Fig. {i}") for i, p in enumerate(paths, 1)] + [(results_path, "config, checks, curves, finals")]
    if use_wandb:  # one more offline run with the figures, the checks table and the final values
        finals = {f"L{L}/{kind}/{k}": v for L in cfg["depths"] for kind in ("label_noise", "plain")
                  for k, v in runs[L][kind]["final"].items() if isinstance(v, (int, float))}
        report = scripts.report(out, NAME, args.quick, cfg, paths, checks,
                                {**finals, "X_nuclear": Xnuc, "seconds": total})
        written += [(runs[L][mode]["wandb_dir"], f"wandb run, L={L}, {mode.replace('_', ' ')} (offline)")
                    for L in cfg["depths"] for mode in MODES if runs[L][mode].get("wandb_dir")]
        written.append((report, "wandb run: figures, checks table, final values (offline)"))
    written += [(os.path.join(out, "sweep") + os.sep, "finished trials (--resume skips them)"),
                (os.path.join(out, "cache") + os.sep, "the nuclear-norm solution (the next run loads it)")]
    summary["written"] = scripts.list_written(out, written, wandb=use_wandb)
    summary["F_hat"] = Fhat
    return summary


if __name__ == "__main__":
    result = main()
    sys.exit(0 if all(c["passed"] for c in result["checks"]) else 1)
