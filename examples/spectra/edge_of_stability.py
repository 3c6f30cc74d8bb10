"""The Hessian spectrum through training at the edge of stability: a deep linear regression trained by gradient
descent with a learning rate whose 2/lr lies below the sharpness gradient flow would reach. The whole eigenvalue
density (exact: 230 parameters) is measured every 5 steps with ``SpectralDensity``, the top eigenvalue with
``Sharpness(edge_of_stability=True)``, and drawn as a heatmap with the 2/lr line. The top eigenvalue rises through
2/lr; gradient descent then oscillates with period 2, so the sharpness at even and odd steps alternates on both
sides of 2/lr (measuring every 5 steps shows both), with a median near 2/lr, while the bulk stays near 0. Here
2/lr = 20 lies below S_min^a = 22.1, the sharpness of the flattest global minimiser (drawn in): gradient descent
cannot converge to any minimiser and stays at the edge of stability.

    python examples/spectra/edge_of_stability.py --quick     # 400 steps (a few seconds)
    python examples/spectra/edge_of_stability.py             # 1500 steps

Writes ``eos_density.png`` and ``results.json`` under ``--out`` (default outputs/spectra[_quick]) and prints the
median sharpness over the last 20 measurements against 2/lr.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="400 steps instead of 1500")
    p.add_argument("--out", default=None, help="output folder (default outputs/spectra[_quick])")
    p.add_argument("--lr", type=float, default=0.1, help="gradient descent's learning rate (default 0.1)")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    import logging

    for name in ("lightning.pytorch", "lightning.pytorch.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
    import lightning as L

    from lightning_flat import functional as F
    from lightning_flat.callbacks import EigenvaluesAbove, FiniteLossGuard, Sharpness, SpectralDensity
    from lightning_flat.datamodules import UnivariateRegressionDataModule
    from lightning_flat.io import output_folder, write_json
    from lightning_flat.models import DeepLinearNet
    from lightning_flat.plotting import density_heatmap, figure, save, series
    from lightning_flat.threads import use_threads

    use_threads()
    out = output_folder(args.out or os.path.join("outputs", "spectra_quick" if args.quick else "spectra"))
    steps, every = (400, 5) if args.quick else (1500, 5)
    t0 = time.perf_counter()
    dm = UnivariateRegressionDataModule(n=50, d=5, seed=0, batch_size=None)
    model = DeepLinearNet([5] * 10 + [1], init="gaussian", init_scale=0.3, lr=args.lr, seed=7).double()
    sd = SpectralDensity(every_n_steps=every)
    # the top eigenvalue, and every eigenvalue above half of 2/lr (LOBPCG warm-started across reads)
    sh = Sharpness(every_n_steps=every, edge_of_stability=True)
    above = EigenvaluesAbove("0.5*2/lr", every_n_steps=every)
    trainer = L.Trainer(max_steps=steps, precision="64-true", logger=False,
                        callbacks=[sd, sh, above, FiniteLossGuard()],
                        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
                        accelerator="cpu", devices=1)
    trainer.fit(model, dm)
    two_over_lr = 2 / args.lr
    s_steps = [s for s, _ in sh.history["hessian/sharpness"]]
    s_vals = [v for _, v in sh.history["hessian/sharpness"]]
    tail = sorted(s_vals[-21:-1])
    median = 0.5 * (tail[9] + tail[10])
    fig, axes = figure(1, 2, size=(5.5, 3.8), title=f"Hessian spectrum under gradient descent, lr = {args.lr}: "
                                                     f"deep linear regression (depth 10, 230 parameters)")
    s_min_line = float(F.sharpness_lower_bound(dm.X, dm.y, 10, kind="a"))
    density_heatmap(axes[0][0], sd.densities, lines={"2/lr": ([0, steps], [two_over_lr, two_over_lr]),
                                                     "S_min": ([0, steps], [s_min_line, s_min_line])})
    axes[0][0].set_title("eigenvalue density (exact) over training")
    ax = axes[0][1]
    xs = [step for step, vals in above.tracked for _ in vals]
    ys = [v for _, vals in above.tracked for v in vals]
    ax.scatter(xs, ys, s=8, color="tab:orange", zorder=3, label="every eigenvalue above 0.5 * 2/lr (tracked)")
    series(ax, s_steps, s_vals, label="sharpness (top eigenvalue)", color="tab:red")
    ax.axhline(two_over_lr, color="k", ls="--", lw=1, label=f"2/lr = {two_over_lr:g}")
    # every global minimiser is at least this sharp (the flat-minima lower bound of deep linear regression)
    s_min = float(F.sharpness_lower_bound(dm.X, dm.y, 10, kind="a"))
    ax.axhline(s_min, color="tab:green", ls=":", lw=1.2, label=f"S_min^a = {s_min:.3g}: no minimiser is flatter")
    bulk = [float(n[n.numel() // 2]) for _, n, _ in sd.densities]
    series(ax, [d[0] for d in sd.densities], bulk, label="median eigenvalue (the bulk)", color="tab:blue")
    ax.set_ylabel("Hessian eigenvalue")
    ax.set_title("sharpness crosses 2/lr, then alternates around it")
    ax.legend(fontsize=8, loc="center right")
    path = save(fig, os.path.join(out, "eos_density.png"))
    seconds = time.perf_counter() - t0
    tracked = [(step, vals) for step, vals in above.tracked]
    result = dict(lr=args.lr, steps=steps, two_over_lr=two_over_lr, s_min=s_min, median_last20=median, tracked=tracked,
                  ratio=median / two_over_lr, sharpness=list(zip(s_steps, s_vals)), figure=path, seconds=seconds)
    write_json(os.path.join(out, "results.json"), result)
    print(f"median sharpness over the last 20 measurements {median:.4g} = {median / two_over_lr:.3f} x 2/lr; "
          f"wrote {path} ({seconds:.1f} s)")
    return result


if __name__ == "__main__":
    main()
    sys.exit(0)
