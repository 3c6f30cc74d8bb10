"""Gatmiry et al. (2023): label-noise SGD finds the flattest factorization and the minimum nuclear norm solution.

Deep matrix factorization E = W_L ... W_1 on Gaussian matrix sensing, trained by label-noise SGD (then a noiseless
polish) and by plain SGD, with the library's Trainer, datamodule and callbacks. Per depth, the label-noise run and
the plain run are the two replicas of one DeepLinearNet (same seed: same init and same minibatches, so the plain
run is "the same loop with no noise"); the plain replica is frozen (lr 0) after ``plain_steps``. Depths run in
parallel worker processes (``--workers``). Writes

- ``fig1_losses.png``: train loss (full data, no noise) and test loss ||E - M*||_F^2 / ||M*||_F^2, log-y, one panel
  per depth, label noise vs plain;
- ``fig2_trace_nuclear.png``: Hessian trace with the predicted minimum F_L = 2L (d_0 d_L)^{1/L} ||X||_*^{2-2/L}, and
  ||E||_* with the minimum nuclear norm ||X||_*;
- ``results.json`` and one wandb run per depth (offline unless WANDB_MODE says otherwise; label noise is replica
  r0, plain r1),

and prints a results table next to reference values from an independent re-implementation, and the reproduction's
acceptance checks (Q1-Q5 for ``--quick``, checks 1-7 for the full run). Exit status 1 when a check fails.

    python examples/gatmiry2023/run.py --quick            # d=20, n=200, r=2, depths 2 and 3 (< 1 minute)
    python examples/gatmiry2023/run.py                    # the paper's size: d=60, n=600, r=3, depths 2, 3, 5, 10
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings

import torch

QUICK = dict(d=20, n=200, r=2, depths=[2, 3], c=0.9, lr=0.05, batch_size=50, std=1.0, noise_steps=6000,
             polish_steps=1000, plain_steps=3000, every=100, seed=0)
FULL = dict(d=60, n=600, r=3, depths=[2, 3, 5, 10], c=0.9, lr=0.01, batch_size=50, std=1.0, noise_steps=300_000,
            polish_steps=20_000, plain_steps=100_000, every=1000, seed=0)

#: Reference values from an independent NumPy re-implementation (seed 0 of numpy's default_rng; our torch draw
#: differs): per depth, initial trace, label-noise final trace / F_L, label-noise |E|_*/|X|_*, label-noise rel. test,
#: plain trace, plain |E|_*, plain rel. test.
CALIB = {2: (1.1e4, 1.005, 1.005, 0.076, 5500, 16.7, 3.30), 3: (2.1e4, 1.015, 1.006, 0.085, 4336, 10.7, 1.77),
         5: (1.49e4, 1.035, 1.011, 0.108, 3990, 8.2, 1.38), 10: (9.2e3, 1.09, 1.013, 0.114, 4778, 6.6, 1.36)}
MODES = ("label_noise", "plain")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the quick setting (d=20, n=200, r=2, L=2,3)")
    p.add_argument("--out", default=None, help="output folder (default outputs/gatmiry2023[_quick])")
    p.add_argument("--depths", type=int, nargs="+", default=None, help="override the depths")
    p.add_argument("--seed", type=int, default=None, help="problem, init and noise seed")
    p.add_argument("--noise-steps", type=int, default=None, help="override the label-noise steps")
    p.add_argument("--polish-steps", type=int, default=None, help="override the noise-free polish steps")
    p.add_argument("--workers", type=int, default=None, help="parallel processes over depths (default: 1 quick, 2 full)")
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op threads per process (default 1, or LIGHTNING_FLAT_THREADS / OMP_NUM_THREADS)")
    p.add_argument("--no-wandb", action="store_true", help="skip the wandb runs")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    from lightning_flat.sweep import add_sweep_arguments

    add_sweep_arguments(p, "depths")
    p.add_argument("--replot", metavar="RESULTS_JSON", default=None,
                   help="redraw Figs. 1 and 2 from a results.json (next to it, or in --out) without training")
    return p.parse_args(argv)


def replot(path, out=None) -> list[str]:
    """Redraw the figures of an earlier run from its ``results.json`` (no training, no solve)."""
    with open(path) as f:
        summary = json.load(f)
    cfg = summary["config"]
    runs = {int(L): run for L, run in summary["runs"].items()}
    Fhat = {int(L): v for L, v in summary["F_hat"].items()}
    return figures(runs, Fhat, summary["X_nuclear"], out or os.path.dirname(os.path.abspath(path)), _title(cfg),
                   cfg["noise_steps"])


def _title(cfg) -> str:
    return f"Gatmiry et al. 2023, d={cfg['d']}, n={cfg['n']}, r={cfg['r']}"


def make_data(cfg):
    from lightning_flat.datamodules import MatrixSensingDataModule

    return MatrixSensingDataModule(n=cfg["n"], d_out=cfg["d"], d_in=cfg["d"], rank=cfg["r"],
                                   batch_size=cfg["batch_size"], seed=cfg["seed"])


def depth_trial(config):
    """One depth as a sweep trial (``lightning_flat.sweep``): JSON in, JSON out."""
    from lightning_flat.sweep import trial_folder  # its wandb run comes back to OUT from any Ray node

    return train_depth(config["depth"], config["cfg"], trial_folder(config["out"]), config["wandb"],
                       config["progress"], config["threads"], config["position"])


def train_depth(depth, cfg, out, use_wandb, progress, threads=None, position=0):
    """Label-noise and plain SGD at one depth as two replicas of one model; returns curves and final values."""
    from lightning_flat.threads import use_threads

    use_threads(threads)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    import logging

    import lightning as L

    from lightning_flat import functional as F
    from lightning_flat.callbacks import (FiniteLossGuard, HessianTrace, HyperparameterSchedule, LabelNoise,
                                          MatrixNorms, StepProgressBar)
    from lightning_flat.loggers import MemoryLogger
    from lightning_flat.models import DeepLinearNet

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    dm = make_data(cfg)
    d, every, lr = cfg["d"], cfg["every"], cfg["lr"]
    steps = cfg["noise_steps"] + cfg["polish_steps"]
    model = DeepLinearNet([d] * (depth + 1), init="gaussian", init_scale=cfg["c"] / math.sqrt(d), lr=lr,
                          replicas=2, seed=[cfg["seed"], cfg["seed"]])
    schedule = HyperparameterSchedule(
        label_noise={"replicas": [[(0, cfg["std"]), (cfg["noise_steps"], 0.0)], 0.0]},
        lr={"replicas": [lr, [(0, lr), (cfg["plain_steps"], 0.0)]]},  # the plain replica stops at plain_steps
        every_n_steps=every)
    trace, norms, guard = HessianTrace(every), MatrixNorms(every), FiniteLossGuard()
    callbacks = [LabelNoise([cfg["std"], 0.0], seed=cfg["seed"]), schedule, trace, norms, guard]
    if progress:
        # a bar in a terminal (redrawn once per chunk of steps), else a line every 1000 steps
        callbacks.append(StepProgressBar(every_n_steps=1000, process_position=position, name=f"L={depth}"))
    memory = MemoryLogger()
    loggers = [memory]
    if use_wandb:
        import wandb
        from lightning_flat.loggers import WandbLogger

        if wandb.run is not None:  # a run left open by the caller would swallow this one
            wandb.finish()
        loggers.append(WandbLogger(project="lightning-flat", name=f"gatmiry2023-L{depth}", save_dir=out,
                                   offline=True, group=os.path.basename(out.rstrip("/")),
                                   config={**cfg, "depth": depth, "replicas": "r0 label noise, r1 plain"}))
    trainer = L.Trainer(max_steps=steps, precision="64-true", logger=loggers, callbacks=callbacks,
                        log_every_n_steps=every, enable_checkpointing=False, enable_model_summary=False,
                        enable_progress_bar=progress, accelerator="cpu", devices=1)
    meas, targets = dm.measurements, dm.targets
    scale = float(dm.ground_truth.square().sum())
    with torch.no_grad():
        E0 = model.end_to_end().double()[0]
        init = (float(F.measurement_loss(E0, meas, targets)), float(dm.test_error(E0)) / scale)
    t0 = time.perf_counter()
    trainer.fit(model, dm)
    seconds = time.perf_counter() - t0
    wandb_dir = None
    if use_wandb:
        run = loggers[-1].experiment
        wandb_dir = run.dir.rsplit("/files", 1)[0]
        run.finish()
    result = dict(depth=depth, steps=steps, seconds=seconds, stopped=guard.message, diverged=model.diverged,
                  wandb_dir=wandb_dir)
    for r, mode in enumerate(MODES):
        with torch.no_grad():
            W = [w.detach().double()[r] for w in model.weights()]
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
        end = steps if mode == "label_noise" else cfg["plain_steps"]
        cut = lambda pairs: [(s, v) for s, v in pairs if s <= end]  # noqa: E731
        train = cut([(0, init[0])] + memory.history.get(f"train/full_loss/r{r}", []))
        test = cut([(0, init[1])] + memory.history.get(f"test/relative_error/r{r}", []))
        tr_h = cut([(s, v[r]) for s, v in trace.replica_history["hessian/trace"]])
        nuc_h = cut([(s, v[r]) for s, v in norms.replica_history["norm/nuclear"]])
        result[mode] = dict(final=final, init_trace=tr_h[0][1], curves=dict(
            train=[list(x) for x in zip(*train)], test=[list(x) for x in zip(*test)],
            trace=[list(x) for x in zip(*tr_h)], nuclear=[list(x) for x in zip(*nuc_h)]))
    return result


def theory_checks():
    """Q5 / check 6: the theory checks T1-T8 at the quick size, as pass/fail rows (float64)."""
    from lightning_flat import functional as F
    from lightning_flat.datamodules import MatrixSensingDataModule
    from lightning_flat.measurements import Dense

    g = torch.Generator().manual_seed(0)
    f64 = torch.float64
    rows = []
    m = Dense(torch.randn(5, 3, 3, generator=g, dtype=f64))
    W = [torch.randn(d1, d0, generator=g, dtype=f64) for d0, d1 in [(3, 4), (4, 5), (5, 3)]]
    b = torch.randn(5, generator=g, dtype=f64)
    t1 = abs(float(F.hessian_trace(W, m) - torch.trace(F.loss_hessian(W, m, b)))) / float(F.hessian_trace(W, m))
    rows.append(("T1 trace formula vs torch.func.hessian (rel)", t1, t1 < 1e-10))
    iso = torch.zeros(9, 3, 3, dtype=f64)
    for k in range(3):
        for l in range(3):
            iso[3 * k + l, k, l] = 3.0
    t2 = abs(float(F.lemma3_ratio(W, Dense(iso))) - 1)
    rows.append(("T2 exact isometry: tr = 2R (rel)", t2, t2 < 1e-12))
    M = torch.randn(6, 2, generator=g, dtype=f64) @ torch.randn(2, 4, generator=g, dtype=f64)
    Wf = F.flattest_factorization(M, [4, 5, 6, 5, 6])
    t3 = abs(float(F.trace_surrogate(Wf) / F.min_trace_surrogate(M, 4)) - 1)
    rows.append(("T3 Lemma 4 minimizer attains L (d0 dL)^(1/L) |M|_*^(2-2/L) (rel)", t3, t3 < 1e-10))
    m4 = Dense(torch.randn(7, 5, 4, generator=g, dtype=f64))
    M4 = torch.randn(5, 2, generator=g, dtype=f64) @ torch.randn(2, 4, generator=g, dtype=f64)
    t4 = abs(float(F.hessian_trace(F.depth2_flattest_factorization(M4, m4, 6), m4) / F.depth2_min_trace(M4, m4)) - 1)
    rows.append(("T4 Thm 5: depth-2 minimum 4|B1 M B2|_* attained (rel)", t4, t4 < 1e-10))
    A1 = torch.randn(1, 4, 4, generator=g, dtype=f64)
    M5 = torch.randn(4, 4, generator=g, dtype=f64)
    val, Wopt = F.min_trace_on_fiber([M5, torch.eye(4, dtype=f64), torch.eye(4, dtype=f64)], Dense(A1))
    t5 = abs(float(val / F.n1_min_trace(A1[0], M5, 3)) - 1)
    rows.append(("T5 Thm 7 (n=1, L=3): fiber BFGS minimum = closed form (rel)", t5, t5 < 1e-6))
    t6 = float(F.fiber_stationarity_residual(Wopt, Dense(A1)))
    rows.append(("T6 fiber stationarity at the T5 optimum (rel residual)", t6, t6 < 1e-5))
    errs = []
    for seed in range(50):
        dm = MatrixSensingDataModule(n=200, d_out=20, d_in=20, rank=2, seed=seed)
        X = F.min_frobenius_interpolant(dm.measurements, dm.targets)
        errs.append(float(dm.test_error(X) / dm.ground_truth.square().sum()))
    t7 = sum(errs) / len(errs)
    rows.append(("T7 Thm 4: mean min-Frobenius rel error, d=20, n=200, 50 seeds (0.50 +- 0.02)", t7,
                 abs(t7 - 0.5) <= 0.02))
    dm = MatrixSensingDataModule(n=200, d_out=20, d_in=20, rank=2, seed=0)
    ratios = [float(F.lemma3_ratio(F.flattest_factorization(dm.ground_truth, [20] * (L + 1)), dm.measurements))
              for L in (2, 3, 5, 10)]
    worst = max(abs(r - 1) for r in ratios)
    rows.append(("T8 Lemma 3 ratio at d=20, n=200, L=2,3,5,10 (max |ratio - 1| <= 0.10)", worst, worst <= 0.10))
    return rows


def checks_quick(X_err, frob_err, runs, Fhat, Xnuc):
    """The quick checks Q1-Q4 (``--quick``): list of (name, value, passed)."""
    out = [("Q1 nuclear-norm solution recovers M* (rel err < 1e-6)", X_err, X_err < 1e-6),
           ("Q1 min-Frobenius rel err in [0.4, 0.7]", frob_err, 0.4 <= frob_err <= 0.7)]
    for L, run in runs.items():
        ln, pl = run["label_noise"], run["plain"]
        ratio = ln["final"]["nuclear"] / Xnuc
        tr_ratio = ln["final"]["trace"] / Fhat[L]
        fall = ln["init_trace"] / ln["final"]["trace"]
        out += [
            (f"Q2 L={L} label noise |E|_*/|X|_* in [0.995, 1.03]", ratio, 0.995 <= ratio <= 1.03),
            (f"Q3 L={L} label noise trace/F_L in [0.9, 1.1]", tr_ratio, 0.9 <= tr_ratio <= 1.1),
            (f"Q3 L={L} label noise trace fell >= 5x from init", fall, fall >= 5),
            (f"Q4 L={L} label noise rel test <= 0.01", ln["final"]["rel_test"], ln["final"]["rel_test"] <= 0.01),
            (f"Q4 L={L} plain train loss < 1e-8", pl["final"]["train_loss"], pl["final"]["train_loss"] < 1e-8),
            (f"Q4 L={L} plain rel test >= 0.2", pl["final"]["rel_test"], pl["final"]["rel_test"] >= 0.2),
            (f"Q4 L={L} plain trace >= 3x label noise", pl["final"]["trace"] / ln["final"]["trace"],
             pl["final"]["trace"] >= 3 * ln["final"]["trace"]),
        ]
    return out


def checks_full(X_err, frob_err, Mnuc, Xnuc, Mrank, Mfro2, runs, Fhat):
    """The acceptance checks 1-5 of the full run: list of (name, value, passed)."""
    out = [("1 rank M* = 3", Mrank, Mrank == 3), ("1 |M*|_F^2 in [1.5, 5]", Mfro2, 1.5 <= Mfro2 <= 5),
           ("1 min-Frobenius rel err in [0.75, 0.90]", frob_err, 0.75 <= frob_err <= 0.90),
           ("1 |X|_* <= |M*|_* + 1e-6", Xnuc - Mnuc, Xnuc <= Mnuc + 1e-6)]
    for L, run in runs.items():
        ln, pl = run["label_noise"]["final"], run["plain"]["final"]
        init = run["label_noise"]["init_trace"]
        lt, pt = ln["rel_test"], pl["rel_test"]
        out += [
            (f"2 L={L} label-noise trace fell >= 10x", init / ln["trace"], init >= 10 * ln["trace"]),
            (f"2 L={L} label-noise trace/F_L in [0.95, 1.15]", ln["trace"] / Fhat[L],
             0.95 <= ln["trace"] / Fhat[L] <= 1.15),
            (f"2 L={L} label-noise |E|_*/|X|_* in [0.995, 1.03]", ln["nuclear"] / Xnuc,
             0.995 <= ln["nuclear"] / Xnuc <= 1.03),
            (f"2 L={L} label-noise rel test <= 0.15", lt, lt <= 0.15),
            (f"3 L={L} plain train < 1e-10", pl["train_loss"], pl["train_loss"] < 1e-10),
            (f"3 L={L} plain rel test >= 0.8", pt, pt >= 0.8),
            (f"3 L={L} plain |E|_* >= 2|X|_*", pl["nuclear"] / Xnuc, pl["nuclear"] >= 2 * Xnuc),
            (f"3 L={L} plain trace >= 5 F_L", pl["trace"] / Fhat[L], pl["trace"] >= 5 * Fhat[L]),
            (f"4 L={L} plain rel test >= 5x label noise", pt / max(lt, 1e-300), pt >= 5 * lt),
        ]
        if L >= 3:
            terms = ln["r_terms"]
            spread = (max(terms) - min(terms)) / (sum(terms) / len(terms))
            out += [(f"5 L={L} R-terms agree within 5%", spread, spread <= 0.05),
                    (f"5 L={L} balancedness not small (> 1)", ln["balancedness"], ln["balancedness"] > 1.0)]
            sv = ln["sv_E"]
            for name, s in (("W_1", ln["top_sv_first"]), ("W_L", ln["top_sv_last"])):
                # proportional to sigma_k(E)^(1/2): the ratios s_k / sigma_k^(1/2) agree (max relative deviation)
                ratios = [a / b ** 0.5 for a, b in zip(s, sv)]
                dev = max(abs(r - ratios[0]) / ratios[0] for r in ratios)
                out.append((f"5 L={L} {name} top singular values follow sigma_k(E)^(1/2) (max rel deviation)", dev,
                            dev <= 0.2))
    return out


def figures(runs, Fhat, Xnuc, out, title, noise_steps):
    """Fig. 1 (losses) and Fig. 2 (trace with F_L, nuclear norm with |X|_*): one column per depth."""
    from lightning_flat.plotting import COLORS, figure, reference, save, series

    depths = sorted(runs)
    specs = [
        ("fig1_losses.png", "losses", [("train", "train loss (full data, no noise)", None),
                                       ("test", "test loss / |M*|_F^2", None)]),
        ("fig2_trace_nuclear.png", "flatness and nuclear norm",
         [("trace", "Hessian trace", lambda L: (Fhat[L], "predicted min F_L")),
          ("nuclear", "|E|_*", lambda L: (Xnuc, "min nuclear norm |X|_*"))]),
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
                        label += f" (converged, frozen at {steps_[-1]:.0e})"
                    series(ax, steps_, values, label=label, logy=True, color=COLORS[mode])
                    if mode == "plain" and steps_:
                        ax.plot([steps_[-1]], [values[-1]], marker="|", ms=10, color=COLORS[mode])
                ax.axvline(noise_steps, color="gray", ls=":", lw=1.0, label="noise off (polish)")
                if ref is not None:
                    reference(ax, *ref(L))
                ax.set_title(f"L = {L}: {name}")
                ax.set_ylabel(name)
                ax.legend(fontsize=7, loc="center right")  # the region every panel leaves free
        paths.append(save(fig, os.path.join(out, filename)))
    return paths


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.replot:
        paths = replot(args.replot, args.out)
        print(f"wrote {', '.join(paths)}")
        return dict(figures=paths, checks=[])
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    warnings.filterwarnings("ignore", ".*does not have many workers.*")

    from lightning_flat import functional as F
    from lightning_flat.baselines import min_nuclear_norm

    cfg = dict(QUICK if args.quick else FULL)
    if args.depths:
        cfg["depths"] = args.depths
    if args.seed is not None:
        cfg["seed"] = args.seed
    if args.noise_steps is not None:
        cfg["noise_steps"] = args.noise_steps
    if args.polish_steps is not None:
        cfg["polish_steps"] = args.polish_steps
    workers = args.workers or (1 if args.quick else 2)
    out = args.out or os.path.join("outputs", "gatmiry2023_quick" if args.quick else "gatmiry2023")
    from lightning_flat.io import output_folder

    output_folder(out)  # fails now, naming it, if nothing can be written there
    t_start = time.perf_counter()

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

    progress = not args.no_progress
    use_wandb = not args.no_wandb
    t_train = time.perf_counter()
    from lightning_flat.sweep import run_sweep

    order = sorted(cfg["depths"], reverse=True)  # deepest (slowest) first
    sweep_dir = os.path.join(out, "sweep")
    configs = [dict(depth=L, cfg=cfg, out=out, wandb=use_wandb, progress=progress, threads=args.threads,
                    position=i % workers) for i, L in enumerate(order)]
    rows = run_sweep(depth_trial, configs, sweep_dir, engine=args.engine, workers=workers, address=args.address,
                     resume=args.resume)
    results = {row["config"]["depth"]: row["result"] for row in rows}
    train_seconds = time.perf_counter() - t_train
    runs = {L: {**results[L], "scale": scale} for L in cfg["depths"]}

    paths = figures(runs, Fhat, Xnuc, out, _title(cfg), cfg["noise_steps"])
    if args.quick:
        checks = checks_quick(X_err, frob_err, runs, Fhat, Xnuc)
    else:
        checks = checks_full(X_err, frob_err, float(F.nuclear_norm(Mstar)), Xnuc,
                             int(torch.linalg.matrix_rank(Mstar)), scale, runs, Fhat)
    theory = theory_checks()
    checks += [(("Q5 " if args.quick else "6 ") + name, value, ok) for name, value, ok in theory]

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
    print("\nchecks:")
    for name, value, ok in checks:
        print(f"  [{'PASS' if ok else 'FAIL'}] {name}: {value:.4g}")
    total = time.perf_counter() - t_start
    print(f"\nnuclear-norm solve {solve_seconds:.1f} s, training {train_seconds:.0f} s ({workers} worker(s)), "
          f"total {total:.0f} s")
    summary = dict(config=cfg, X_nuclear=Xnuc, X_rel_err=X_err, min_frobenius_rel_err=frob_err, F_hat=Fhat,
                   solve_seconds=solve_seconds, train_seconds=train_seconds, seconds=total, workers=workers,
                   figures=paths, checks=[dict(name=n, value=v, passed=bool(ok)) for n, v, ok in checks],
                   runs={str(L): {k: v for k, v in runs[L].items()} for L in cfg["depths"]})
    from lightning_flat.io import write_json

    results_path = os.path.join(out, "results.json")
    write_json(results_path, summary)
    written = [(p, f"Fig. {i}") for i, p in enumerate(paths, 1)] + [(results_path, "config, checks, curves, finals")]
    if use_wandb:  # one more offline run with the figures, the checks table and the final values
        from lightning_flat.loggers import wandb_report

        finals = {f"L{L}/{kind}/{k}": v for L in cfg["depths"] for kind in ("label_noise", "plain")
                  for k, v in runs[L][kind]["final"].items() if isinstance(v, (int, float))}
        report = wandb_report(out, f"gatmiry2023{'-quick' if args.quick else ''}-report", cfg, paths,
                              summary["checks"], {**finals, "X_nuclear": Xnuc, "seconds": total},
                              group=os.path.basename(out.rstrip("/")))
        written += [(runs[L]["wandb_dir"], f"wandb run, L={L} (offline)") for L in cfg["depths"]
                    if runs[L].get("wandb_dir")]
        written.append((report, "wandb run: figures, checks table, final values (offline)"))
    written += [(os.path.join(out, "sweep") + os.sep, "finished trials (--resume skips them)"),
                (os.path.join(out, "cache") + os.sep, "the nuclear-norm solution (the next run loads it)")]
    print(f"\nwritten under {out}{os.sep}:")
    width = max(len(p) for p, _ in written)
    for p, what in written:
        print(f"  {p:<{width}}  {what}")
    if use_wandb:
        print(f"  (upload a wandb run with: wandb sync {os.path.join(out, 'wandb', 'offline-run-*')})")
    summary["F_hat"] = Fhat
    summary["written"] = [p for p, _ in written]
    return summary


if __name__ == "__main__":
    result = main()
    sys.exit(0 if all(c["passed"] for c in result["checks"]) else 1)
