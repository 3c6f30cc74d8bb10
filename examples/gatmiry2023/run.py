"""Gatmiry et al. (2023): label-noise SGD finds the flattest factorization and the minimum nuclear norm solution.

Deep matrix factorization E = W_L ... W_1 on Gaussian matrix sensing, trained by label-noise SGD (then a noiseless
polish) and by plain SGD, with the library's Trainer, datamodule and callbacks. Writes

- ``fig1_losses.png``: train loss (full data, no noise) and test loss ||E - M*||_F^2 / ||M*||_F^2, log-y, one panel
  per depth, label noise vs plain;
- ``fig2_trace_nuclear.png``: Hessian trace with the predicted minimum F_L = 2L (d_0 d_L)^{1/L} ||X||_*^{2-2/L}, and
  ||E||_* with the minimum nuclear norm ||X||_*;
- ``results.json`` and one wandb run per training run (offline unless WANDB_MODE says otherwise),

and prints a results table with the spec's acceptance checks (``specs/gatmiry2023.md``: Q1-Q4 for ``--quick``).
Exit status 1 when a check fails.

    python examples/gatmiry2023/run.py --quick            # d=20, n=200, r=2, depths 2 and 3 (< 1 minute)
    python examples/gatmiry2023/run.py                    # the paper's size: d=60, n=600, r=3, depths 2, 3, 5, 10
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import warnings

import torch

QUICK = dict(d=20, n=200, r=2, depths=[2, 3], c=0.9, lr=0.05, batch_size=50, std=1.0, noise_steps=6000,
             polish_steps=1000, plain_steps=3000, every=100, seed=0)
FULL = dict(d=60, n=600, r=3, depths=[2, 3, 5, 10], c=0.9, lr=0.01, batch_size=50, std=1.0, noise_steps=300_000,
            polish_steps=20_000, plain_steps=100_000, every=1000, seed=0)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the spec's --quick setting (d=20, n=200, r=2, L=2,3)")
    p.add_argument("--out", default=None, help="output folder (default outputs/gatmiry2023[_quick])")
    p.add_argument("--depths", type=int, nargs="+", default=None, help="override the depths")
    p.add_argument("--seed", type=int, default=None, help="problem, init and noise seed")
    p.add_argument("--no-wandb", action="store_true", help="skip the wandb runs")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def _write_json(path, obj):
    fd, tmp = tempfile.mkstemp(suffix=".json", dir=os.path.dirname(path))
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def train_run(dm, depth, mode, cfg, out, use_wandb, progress):
    """One training run (mode "label_noise" or "plain"); returns its curves and final values."""
    import lightning as L
    from lightning.pytorch.callbacks import TQDMProgressBar

    from lightning_flat import functional as F
    from lightning_flat.callbacks import FiniteLossGuard, HessianTrace, HyperparameterSchedule, LabelNoise, MatrixNorms
    from lightning_flat.loggers import MemoryLogger
    from lightning_flat.models import DeepLinearNet

    d, every = cfg["d"], cfg["every"]
    model = DeepLinearNet([d] * (depth + 1), init="gaussian", init_scale=cfg["c"] / math.sqrt(d), lr=cfg["lr"],
                          seed=cfg["seed"])
    callbacks = [HessianTrace(every), MatrixNorms(every), FiniteLossGuard()]
    if mode == "label_noise":
        steps = cfg["noise_steps"] + cfg["polish_steps"]
        callbacks += [LabelNoise(cfg["std"], seed=cfg["seed"]),
                      HyperparameterSchedule(label_noise=[(0, cfg["std"]), (cfg["noise_steps"], 0.0)],
                                             every_n_steps=every)]
    else:
        steps = cfg["plain_steps"]
    if progress:
        callbacks.append(TQDMProgressBar(refresh_rate=max(steps // 50, 1)))
    memory = MemoryLogger()
    loggers = [memory]
    name = f"gatmiry2023-L{depth}-{mode}"
    if use_wandb:
        import wandb
        from lightning.pytorch.loggers import WandbLogger

        if wandb.run is not None:  # a run left open by the caller would swallow this one
            wandb.finish()
        loggers.append(WandbLogger(project="lightning-flat", name=name, save_dir=out, offline=True,
                                   group=os.path.basename(out.rstrip("/")), config={**cfg, "depth": depth, "mode": mode}))
    trainer = L.Trainer(max_steps=steps, precision="64-true", logger=loggers, callbacks=callbacks,
                        log_every_n_steps=every, enable_checkpointing=False, enable_model_summary=False,
                        enable_progress_bar=progress, accelerator="cpu", devices=1)
    meas, targets = dm.measurements, dm.targets
    with torch.no_grad():
        E0 = model.end_to_end().double()
        init_train = float(F.measurement_loss(E0, meas, targets))
        init_test = float(dm.test_error(E0))
    t0 = time.perf_counter()
    trainer.fit(model, dm)
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        W = [w.detach().double() for w in model.weights()]
        E = F.end_to_end(W)
        P, S = F.partial_products(W)
        r_terms = [float(P[j].square().sum() * S[j].square().sum()) for j in range(depth)]
        final = dict(
            train_loss=float(F.measurement_loss(E, meas, targets)),
            test_error=float(dm.test_error(E)),
            trace=float(F.hessian_trace(W, meas)),
            nuclear=float(F.nuclear_norm(E)),
            balancedness=float(F.balancedness(W)),
            r_terms=r_terms,
        )
    if use_wandb:
        run = loggers[-1].experiment
        run.summary.update({f"final/{k}": v for k, v in final.items() if not isinstance(v, list)})
        run.finish()
    scale = float(dm.ground_truth.square().sum())
    train_steps, train_vals = memory.series("train/full_loss")
    test_steps, test_vals = memory.series("test/error")
    curves = dict(
        train=([0] + train_steps, [init_train] + train_vals),
        test=([0] + test_steps, [v / scale for v in [init_test] + test_vals]),
        trace=memory.series("hessian/trace"),
        nuclear=memory.series("norm/nuclear"),
    )
    guard = callbacks[2]
    return dict(depth=depth, mode=mode, steps=steps, seconds=seconds, final=final, curves=curves,
                init_trace=memory.history["hessian/trace"][0][1], stopped=guard.message)


def checks_quick(X_err, frob_err, runs, Fhat, Xnuc):
    """The spec's Q1-Q4 (``--quick``): list of (name, value, passed)."""
    out = [("Q1 nuclear-norm solution recovers M* (rel err < 1e-6)", X_err, X_err < 1e-6),
           ("Q1 min-Frobenius rel err in [0.4, 0.7]", frob_err, 0.4 <= frob_err <= 0.7)]
    for L, pair in runs.items():
        ln, pl = pair["label_noise"], pair["plain"]
        ratio = ln["final"]["nuclear"] / Xnuc
        tr_ratio = ln["final"]["trace"] / Fhat[L]
        fall = ln["init_trace"] / ln["final"]["trace"]
        ln_test = ln["final"]["test_error"] / runs[L]["scale"]
        pl_test = pl["final"]["test_error"] / runs[L]["scale"]
        out += [
            (f"Q2 L={L} label noise |E|_*/|X|_* in [0.995, 1.03]", ratio, 0.995 <= ratio <= 1.03),
            (f"Q3 L={L} label noise trace/F_L in [0.9, 1.1]", tr_ratio, 0.9 <= tr_ratio <= 1.1),
            (f"Q3 L={L} label noise trace fell >= 5x from init", fall, fall >= 5),
            (f"Q4 L={L} label noise rel test <= 0.01", ln_test, ln_test <= 0.01),
            (f"Q4 L={L} plain train loss < 1e-8", pl["final"]["train_loss"], pl["final"]["train_loss"] < 1e-8),
            (f"Q4 L={L} plain rel test >= 0.2", pl_test, pl_test >= 0.2),
            (f"Q4 L={L} plain trace >= 3x label noise", pl["final"]["trace"] / ln["final"]["trace"],
             pl["final"]["trace"] >= 3 * ln["final"]["trace"]),
        ]
    return out


def checks_full(X_err, frob_err, Mnuc, Xnuc, Mrank, Mfro2, runs, Fhat):
    """The spec's acceptance checks 1-5 for the full run: list of (name, value, passed)."""
    out = [("1 rank M* = 3", Mrank, Mrank == 3), ("1 |M*|_F^2 in [1.5, 5]", Mfro2, 1.5 <= Mfro2 <= 5),
           ("1 min-Frobenius rel err in [0.75, 0.90]", frob_err, 0.75 <= frob_err <= 0.90),
           ("1 |X|_* <= |M*|_* + 1e-6", Xnuc - Mnuc, Xnuc <= Mnuc + 1e-6)]
    for L, pair in runs.items():
        ln, pl = pair["label_noise"], pair["plain"]
        s = runs[L]["scale"]
        lt, pt = ln["final"]["test_error"] / s, pl["final"]["test_error"] / s
        out += [
            (f"2 L={L} trace fell >= 10x", ln["init_trace"] / ln["final"]["trace"],
             ln["init_trace"] >= 10 * ln["final"]["trace"]),
            (f"2 L={L} trace/F_L in [0.95, 1.15]", ln["final"]["trace"] / Fhat[L],
             0.95 <= ln["final"]["trace"] / Fhat[L] <= 1.15),
            (f"2 L={L} |E|_*/|X|_* in [0.995, 1.03]", ln["final"]["nuclear"] / Xnuc,
             0.995 <= ln["final"]["nuclear"] / Xnuc <= 1.03),
            (f"2 L={L} label noise rel test <= 0.15", lt, lt <= 0.15),
            (f"3 L={L} plain train < 1e-10", pl["final"]["train_loss"], pl["final"]["train_loss"] < 1e-10),
            (f"3 L={L} plain rel test >= 0.8", pt, pt >= 0.8),
            (f"3 L={L} plain |E|_* >= 2|X|_*", pl["final"]["nuclear"] / Xnuc, pl["final"]["nuclear"] >= 2 * Xnuc),
            (f"3 L={L} plain trace >= 5 F_L", pl["final"]["trace"] / Fhat[L], pl["final"]["trace"] >= 5 * Fhat[L]),
            (f"4 L={L} plain rel test >= 5x label noise", pt / max(lt, 1e-300), pt >= 5 * lt),
        ]
        if L >= 3:
            terms = ln["final"]["r_terms"]
            spread = (max(terms) - min(terms)) / (sum(terms) / len(terms))
            out += [(f"5 L={L} R-terms agree within 5%", spread, spread <= 0.05),
                    (f"5 L={L} balancedness not small", ln["final"]["balancedness"], ln["final"]["balancedness"] > 1.0)]
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
                for mode in ("label_noise", "plain"):
                    series(ax, *runs[L][mode]["curves"][key], label=mode.replace("_", " "), logy=True,
                           color=COLORS[mode])
                ax.axvline(noise_steps, color="gray", ls=":", lw=1.0, label="noise off (polish)")
                if ref is not None:
                    reference(ax, *ref(L))
                ax.set_title(f"L = {L}: {name}")
                ax.legend(fontsize=8)
        paths.append(save(fig, os.path.join(out, filename)))
    return paths


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    import logging
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)

    from lightning_flat import functional as F
    from lightning_flat.baselines import min_nuclear_norm
    from lightning_flat.datamodules import MatrixSensingDataModule

    cfg = dict(QUICK if args.quick else FULL)
    if args.depths:
        cfg["depths"] = args.depths
    if args.seed is not None:
        cfg["seed"] = args.seed
    out = args.out or os.path.join("outputs", "gatmiry2023_quick" if args.quick else "gatmiry2023")
    os.makedirs(out, exist_ok=True)
    t_start = time.perf_counter()

    d = cfg["d"]
    dm = MatrixSensingDataModule(n=cfg["n"], d_out=d, d_in=d, rank=cfg["r"], batch_size=cfg["batch_size"],
                                 seed=cfg["seed"])
    Mstar = dm.ground_truth
    scale = float(Mstar.square().sum())
    t0 = time.perf_counter()
    X = min_nuclear_norm(dm.measurements, dm.targets, cache_dir=os.path.join(out, "cache"))
    solve_seconds = time.perf_counter() - t0
    Xnuc = float(F.nuclear_norm(X))
    X_err = float((X - Mstar).square().sum() / scale)
    frob_err = float(dm.test_error(F.min_frobenius_interpolant(dm.measurements, dm.targets)) / scale)
    Fhat = {L: float(F.predicted_min_trace(X, L)) for L in cfg["depths"]}
    print(f"problem: d={d} n={cfg['n']} r={cfg['r']} seed={cfg['seed']}  |M*|_F^2={scale:.4f}  "
          f"|M*|_*={float(F.nuclear_norm(Mstar)):.4f}  |X|_*={Xnuc:.4f} (rel err {X_err:.2e}, {solve_seconds:.1f} s)  "
          f"min-Frobenius rel err {frob_err:.3f}")
    print("predicted min trace F_L: " + ", ".join(f"L={L}: {v:.2f}" for L, v in Fhat.items()))

    runs = {}
    for L in cfg["depths"]:
        runs[L] = {"scale": scale}
        for mode in ("label_noise", "plain"):
            r = train_run(dm, L, mode, cfg, out, not args.no_wandb, not args.no_progress)
            runs[L][mode] = r
            f = r["final"]
            print(f"L={L:2d} {mode:11s} {r['steps']:7d} steps {r['seconds']:6.1f} s  train {f['train_loss']:.2e}  "
                  f"rel test {f['test_error'] / scale:.4f}  trace {f['trace']:.2f} (init {r['init_trace']:.1f})  "
                  f"|E|_* {f['nuclear']:.4f}" + (f"  STOPPED: {r['stopped']}" if r["stopped"] else ""))

    title = f"Gatmiry et al. 2023, d={d}, n={cfg['n']}, r={cfg['r']}"
    paths = figures(runs, Fhat, Xnuc, out, title, cfg["noise_steps"])
    if args.quick:
        checks = checks_quick(X_err, frob_err, runs, Fhat, Xnuc)
    else:
        checks = checks_full(X_err, frob_err, float(F.nuclear_norm(Mstar)), Xnuc,
                             int(torch.linalg.matrix_rank(Mstar)), scale, runs, Fhat)

    print("\n| L | run | final train | rel test | trace | trace / F_L | |E|_* / |X|_* | balancedness |")
    print("|---|---|---|---|---|---|---|---|")
    for L in cfg["depths"]:
        for mode in ("label_noise", "plain"):
            f = runs[L][mode]["final"]
            print(f"| {L} | {mode} | {f['train_loss']:.2e} | {f['test_error'] / scale:.4f} | {f['trace']:.2f} | "
                  f"{f['trace'] / Fhat[L]:.4f} | {f['nuclear'] / Xnuc:.4f} | {f['balancedness']:.3f} |")
    print("\nchecks (specs/gatmiry2023.md):")
    for name, value, ok in checks:
        print(f"  [{'PASS' if ok else 'FAIL'}] {name}: {value:.4g}")
    total = time.perf_counter() - t_start
    print(f"\nwrote {', '.join(paths)}; total {total:.1f} s")
    summary = dict(config=cfg, X_nuclear=Xnuc, X_rel_err=X_err, min_frobenius_rel_err=frob_err, F_hat=Fhat,
                   solve_seconds=solve_seconds, seconds=total, figures=paths,
                   checks=[dict(name=n, value=v, passed=bool(ok)) for n, v, ok in checks],
                   runs={str(L): {m: {k: v for k, v in runs[L][m].items() if k != "curves"}
                                  for m in ("label_noise", "plain")} for L in cfg["depths"]})
    _write_json(os.path.join(out, "results.json"), summary)
    return summary


if __name__ == "__main__":
    result = main()
    sys.exit(0 if all(c["passed"] for c in result["checks"]) else 1)
