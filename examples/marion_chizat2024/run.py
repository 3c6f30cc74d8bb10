"""Marion & Chizat (2024): gradient descent on deep linear regression ends at flat minima.

Univariate least squares with a non-zero optimal residual (n = 50, d = 5, |w*| = 1), a deep linear network
f(x) = w^T W_L ... W_1 x (L = 10) trained by full-batch gradient descent, float64, with the library's Trainer,
datamodule and engine. Every sweep (initial scales x repetitions) is the replicas of one model per learning rate;
runs that diverge are frozen, recorded and left out (never a crash). Sharpness S is the top eigenvalue of the full
Hessian of the training loss (residual term included), computed for all replicas at once. Experiments:

- E1, "MLP" init (i.i.d. N(0, sigma^2) entries, last layer 1 x d): final distance |w_prod - w*|^2 vs sigma per
  learning rate (fig1a_distance.png), initial and final S with the lines 2/eta, S_min, S_min^a and UB
  (fig1b_sharpness.png), P(divergence) vs sigma (fig2_divergence.png);
- E2, trajectories at sigma = 0.3 for eta = 0.02 (no edge of stability) and eta = 0.1 (S hovers at 2/eta), and the
  residual analogue at s = 0.5 (fig1cd_trajectories.png);
- E3, residual init W_k = I + s/sqrt(L d) N_k with a fixed unit w: the E1 panels against s (fig3_residual.png);
- E5, small-init MLP at depth 3 (sigma = 0.002): the balancedness bounds of gradient flow, adjusted for gradient
  descent's drift;
- E6, no training: the sharpness of many global minimisers against its lower bound and its closed form.

It writes the PNGs, ``results.json`` and wandb runs (offline) under the output folder, and prints the acceptance
checks (Q1-Q8 for ``--quick``, 1-10 for the full run; ``README.md`` in this folder says what each one means). Exit
status 1 when a check fails.

    python examples/marion_chizat2024/run.py --quick      # one data seed with a near 1, reduced sweeps (< 1 minute)
    python examples/marion_chizat2024/run.py              # the full sweeps
    python examples/marion_chizat2024/run.py --replot outputs/marion_chizat2024/results.json
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

N, D, DEPTH = 50, 5, 10
SIGMAS = [round(0.25 + k * (0.6 - 0.25) / 9, 4) for k in range(10)]
SCALES = [round(k * 1.7 / 9, 4) for k in range(10)]
# (eta, steps, repetitions per scale)
E1_FULL = [(0.005, 40_000, 20), (0.02, 10_000, 20), (0.07, 4000, 20), (0.1, 4000, 20), (0.2, 2000, 80)]
E3_FULL = [(0.005, 4000, 20), (0.02, 4000, 20), (0.07, 4000, 20), (0.1, 4000, 20), (0.2, 4000, 20)]
E1_QUICK = [(0.02, 1500, 3), (0.2, 500, 3)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="reduced sweeps on one data seed with a in [0.85, 1.15]")
    p.add_argument("--out", default=None, help="output folder (default outputs/marion_chizat2024[_quick])")
    p.add_argument("--seed", type=int, default=None, help="data seed (quick: the first seed >= it with a near 1)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default 1)")
    p.add_argument("--no-wandb", action="store_true", help="skip the wandb runs")
    p.add_argument("--replot", metavar="RESULTS_JSON", default=None, help="redraw the figures from a results.json")
    p.add_argument("--workers", type=int, default=None, help="processes for the sweeps (default: 1 quick, 2 full)")
    from lightning_flat.sweep import add_sweep_arguments

    add_sweep_arguments(p, "sweeps' learning rates")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------- training
def _recorder():
    """A per-step recorder through the engine's step interface (so chunks stay fused): the losses and w_prod of
    every replica at every step, and the weights at chosen steps (for the sharpness, computed afterwards)."""
    from lightning.pytorch.callbacks import Callback

    from lightning_flat.engine import StepHook

    class Recorder(StepHook, Callback):
        def __init__(self, snapshot_steps=(), track_from=0):
            self.snapshot_steps, self.track_from = set(snapshot_steps), track_from
            self.losses, self.products, self.snapshots = [], [], {}

        def step_check(self, ctx):  # the last phase before the update: the state of step ctx.step
            if ctx.step >= self.track_from:
                self.losses.append(ctx.losses.detach().clone())
                with torch.no_grad():
                    self.products.append(ctx.module.end_to_end_from(ctx.weights).detach().clone())
            if ctx.step in self.snapshot_steps:
                self.snapshots[ctx.step] = [w.detach().clone() for w in ctx.weights]

        def on_train_end(self, trainer, pl_module):
            self.snapshots[trainer.global_step] = [w.detach().clone() for w in pl_module.weights()]

    return Recorder


def fit(model, dm, steps, name, ctx, callbacks=()):
    """Full-batch GD for ``steps`` steps in float64 (with a wandb run when asked); returns the memory logger."""
    import lightning as L

    from lightning_flat.callbacks import FiniteLossGuard
    from lightning_flat.loggers import MemoryLogger

    memory = MemoryLogger()
    loggers = [memory]
    if ctx["wandb"]:
        from lightning_flat.loggers import WandbLogger

        loggers.append(WandbLogger(project="lightning-flat", name=f"marion_chizat2024-{name}", save_dir=ctx["out"],
                                   offline=True, group=os.path.basename(ctx["out"].rstrip("/"))))
    trainer = L.Trainer(max_steps=steps, precision="64-true", logger=loggers,
                        callbacks=[*callbacks, FiniteLossGuard()], log_every_n_steps=max(steps // 50, 1),
                        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
                        accelerator="cpu", devices=1)
    trainer.fit(model, dm)
    if ctx["wandb"]:
        loggers[-1].experiment.finish()
    return memory


def state(model, dm):
    """Per replica: distance |w_prod - w*|^2, final loss, and whether the run diverged (frozen, non-finite or
    loss > 1e10)."""
    from lightning_flat import functional as F

    with torch.no_grad():
        E = model.end_to_end().detach().double()
        loss = F.measurement_loss(E, dm.measurements, dm.targets)
        dist = dm.test_error(E)
    active = model.replicas.active if model.replicas.active is not None else torch.ones(1, dtype=torch.bool)
    diverged = ~active | ~torch.isfinite(loss) | (loss > 1e10) | ~torch.isfinite(dist)
    return dist.reshape(-1), loss.reshape(-1), diverged.reshape(-1)


def sharpness(model, dm, weights=None, diverged=None):
    """S of every replica (NaN where diverged), all dense Hessians at once."""
    from lightning_flat import functional as F

    if weights is None:
        weights = model.weights() if model.replicas.count > 1 else [w.unsqueeze(0) for w in model.weights()]
    Ws = [w.detach().double() for w in weights]
    return F.replica_sharpness(Ws, dm.measurements, dm.targets, end_to_end=model.end_to_end_from,
                               active=None if diverged is None else ~diverged)


def mlp(scales, seeds, lr, depth=DEPTH):
    from lightning_flat.models import DeepLinearNet

    return DeepLinearNet([D] * depth + [1], init="gaussian", init_scale=list(scales), lr=lr, replicas=len(seeds),
                         seed=list(seeds)) if len(seeds) > 1 else \
        DeepLinearNet([D] * depth + [1], init="gaussian", init_scale=scales[0], lr=lr, seed=seeds[0])


def residual(scales, seeds, lr, w, depth=DEPTH):
    from lightning_flat.models import ResidualLinearNet

    if len(seeds) > 1:
        return ResidualLinearNet(D, depth, scale=list(scales), w=w, lr=lr, replicas=len(seeds), seed=list(seeds))
    return ResidualLinearNet(D, depth, scale=scales[0], w=w, lr=lr, seed=seeds[0])


def sweep(kind, dm, grid, plan, ctx, w=None):
    """One model per learning rate: replicas = grid values x repetitions, each learning rate a trial of one sweep
    (``lightning_flat.sweep``: a local process pool or Ray, resumable). Returns, per eta, the per-run records."""
    from lightning_flat.sweep import run_sweep

    configs = [dict(kind=kind, data_seed=dm.seed, grid=list(grid), eta=eta, steps=steps, reps=reps,
                    w=None if w is None else w.tolist(), out=ctx["out"], wandb=ctx["wandb"], threads=ctx["threads"])
               for eta, steps, reps in plan]

    def report(row):
        r = row["result"]
        print(f"  {kind} eta={r['eta']}: {len(r['seed'])} runs x {r['steps']} steps in {r['seconds']:.1f} s, "
              f"{sum(r['diverged'])} diverged", flush=True)

    # one results file per sweep (kind and its learning rates), so a fresh run restarts each without the others
    rows = run_sweep(sweep_trial, configs, os.path.join(ctx["out"], "sweep"), engine=ctx["engine"],
                     workers=ctx["workers"], address=ctx["address"], resume=ctx["resume"], progress=report,
                     name=f"{kind}-" + "-".join(str(eta) for eta, _, _ in plan))
    return {str(row["result"]["eta"]): row["result"] for row in rows}


def _quiet():
    """Offline wandb and no repeated warnings (divergences are counted and reported), in every process."""
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*diverged at step.*")
    warnings.filterwarnings("ignore", ".*FiniteLossGuard.*")  # a sweep whose every run diverged stops: recorded
    import logging

    for name in ("lightning.pytorch", "lightning.pytorch.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)


def sweep_trial(config):
    """One learning rate of a sweep: every (scale, repetition) as a replica of one model; JSON in, JSON out."""
    from lightning_flat.datamodules import UnivariateRegressionDataModule
    from lightning_flat.threads import use_threads

    _quiet()
    use_threads(config["threads"])
    dm = UnivariateRegressionDataModule(n=N, d=D, seed=config["data_seed"])
    w = None if config["w"] is None else torch.tensor(config["w"], dtype=torch.float64)
    kind, grid, eta, steps, reps = config["kind"], config["grid"], config["eta"], config["steps"], config["reps"]
    from lightning_flat.sweep import trial_folder  # its wandb runs come back to OUT from any Ray node

    ctx = dict(out=trial_folder(config["out"]), wandb=config["wandb"])
    values = [v for v in grid for _ in range(reps)]
    seeds = [1000 * i + j for i in range(len(grid)) for j in range(reps)]
    model = mlp(values, seeds, eta) if kind == "mlp" else residual(values, seeds, eta, w)
    model = model.double()
    s_init = sharpness(model, dm)
    t0 = time.perf_counter()
    rec = _recorder()(track_from=steps - 50)  # w_prod over the last 50 steps (the swings at large eta)
    fit(model, dm, steps, f"{kind}-eta{eta}", ctx, [rec])
    dist, loss, div = state(model, dm)
    if rec.products:
        last = torch.stack(rec.products).reshape(len(rec.products), len(seeds), -1)
        swing = (last - dm.w_star).square().sum(-1).nan_to_num(float("inf")).amax(0)
    else:  # every run diverged before the last 50 steps (the guard stopped the sweep)
        swing = torch.full((len(seeds),), float("inf"), dtype=torch.float64)
    s_final = sharpness(model, dm, diverged=div)
    out = dict(eta=eta, steps=steps, value=values, seed=seeds, s_init=s_init.tolist(), s_final=s_final.tolist(),
               distance=dist.tolist(), loss=loss.tolist(), diverged=div.tolist(), swing=swing.tolist(),
               seconds=time.perf_counter() - t0)
    if kind == "residual":
        out["theta_max"] = torch.stack([t.detach().double().flatten(-2).norm(dim=-1) for t in model.theta()]
                                       ).amax(0).reshape(-1).tolist()
    return out


def trajectory(kind, dm, scale, etas, steps, ctx, seed=7, w=None, every=5):
    """One init trained at each eta (the same seed: the same initial weights), S every ``every`` steps and at each
    of the last 20 steps, loss and distance at every step."""
    Recorder = _recorder()
    snaps = sorted(set(range(0, steps, every)) | set(range(steps - 20, steps)))
    runs = {}
    for eta in etas:
        model = (mlp([scale], [seed], eta) if kind == "mlp" else residual([scale], [seed], eta, w)).double()
        rec = Recorder(snaps)
        fit(model, dm, steps, f"{kind}-trajectory-eta{eta}-seed{seed}", ctx, [rec])
        steps_done = sorted(rec.snapshots)
        stacked = [torch.stack([rec.snapshots[s][j] for s in steps_done]) for j in range(len(rec.snapshots[0]))]
        S = sharpness(model, dm, weights=stacked)  # every snapshot as a replica: one batched computation
        loss = torch.stack(rec.losses).reshape(-1)
        prod = torch.stack(rec.products).reshape(len(rec.products), -1)
        dist = (prod - dm.w_star).square().sum(-1)
        runs[str(eta)] = dict(eta=eta, s_steps=steps_done, s=S.tolist(), loss=loss.tolist(), distance=dist.tolist(),
                              final_distance=float(state(model, dm)[0][0]))
    return runs


def e5(dm, eta, steps, ctx, depth=3, sigma=0.002, seed=3):
    """Small-init MLP: top singular triplets, the rank-one residual, epsilon_GD and the sharpness ratios."""
    from lightning_flat import functional as F

    model = mlp([sigma], [seed], eta, depth=depth).double()
    W0 = [w.detach().clone() for w in model.weights()]
    fit(model, dm, steps, f"e5-eta{eta}", ctx)
    W = [w.detach().clone() for w in model.weights()]
    eps = float(F.epsilon_gd(W0, W))
    svd = [torch.linalg.svd(w) for w in W]
    sig = [float(s.S[0]) for s in svd]
    rank_one = max(float(w.square().sum()) - s ** 2 for w, s in zip(W, sig))
    spread = max(sig) ** 2 - min(sig) ** 2
    # <v_{k+1}, u_k>^2: the right singular vector of W_{k+1} against the left one of W_k
    align = min(float((svd[k + 1].Vh[0] @ svd[k].U[:, 0]) ** 2) for k in range(depth - 1))
    sig_next = min(sig[1:])
    S = float(sharpness(model, dm)[0])
    D0, DT = F.conserved_gaps(W0), F.conserved_gaps(W)
    drift = sum(float(torch.linalg.matrix_norm(b - a, ord="nuc")) for a, b in zip(D0, DT))
    return dict(eta=eta, steps=steps, eps_gd=eps, sigma=sig, rank_one=rank_one, spread=spread, alignment=align,
                sigma_next=sig_next, S=S, drift=drift, distance=float(state(model, dm)[0][0]))


def e6(X, y, depths=(2, 3, 5, 10), seed=0):
    """Global minimisers without training: the ideal one, random ones, GL(d) moves and W^C; S by the dense Hessian
    and by the closed form."""
    from lightning_flat import functional as F
    from lightning_flat.measurements import RankOne

    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    meas = RankOne(torch.ones(len(y), 1, dtype=f64), X)
    w_star = F.least_squares(X, y)["w_star"]
    w_norm = float(w_star.norm())
    rows = []
    for L in depths:
        s_a = float(F.sharpness_lower_bound(X, y, L, kind="a"))
        s_l = float(F.sharpness_lower_bound(X, y, L))

        def dense(ws):
            return float(torch.linalg.eigvalsh(F.loss_hessian(ws, meas, y))[-1])

        ideal = F.ideal_minimizer(w_star, L)
        cands = [("ideal", ideal)]
        for _ in range(3):
            upper = [torch.randn(D, D, generator=g, dtype=f64) for _ in range(L - 2)] + \
                [torch.randn(1, D, generator=g, dtype=f64)]
            b = F.end_to_end(upper).reshape(-1) if L > 1 else torch.ones(1, dtype=f64)
            P = torch.eye(D, dtype=f64) - torch.outer(b, b) / b.square().sum()
            W1 = torch.outer(b, w_star) / b.square().sum() + P @ torch.randn(D, D, generator=g, dtype=f64)
            cands.append(("random", [W1] + upper))
        if L >= 3:
            A = torch.eye(D, dtype=f64) + 0.3 * torch.randn(D, D, generator=g, dtype=f64)
            Ws = list(cands[1][1])
            Ws[0], Ws[1] = A @ Ws[0], Ws[1] @ torch.linalg.inv(A)
            cands.append(("GL move", Ws))
        for name, Ws in cands:
            S = dense(Ws)
            closed = float(F.minimizer_sharpness(Ws, X))
            frob = 2 * F.least_squares(X, y)["lambda_min"] * w_star.norm() ** (2 - 1 / L) * \
                sum(1 / W.norm() for W in Ws)
            rows.append(dict(depth=L, w_norm=w_norm, kind=name, S=S, closed_form=closed, S_min_a=s_a, S_min=s_l,
                             frob_bound=float(frob),
                             interpolation=float((F.end_to_end(Ws).reshape(-1) - w_star).abs().max())))
        scaled = [dense([C * ideal[0], ideal[1] / C] + ideal[2:]) for C in (1, 3, 10, 30)] if L >= 2 else []
        rows.append(dict(depth=L, w_norm=w_norm, kind="W^C", S_C=scaled,
                         ideal_closed=float(F.ideal_minimizer_sharpness(X, y, L))))
    return rows


# --------------------------------------------------------------------------------------------------- checks
def _median(xs):
    xs = sorted(x for x in xs if x == x)
    if not xs:
        return float("nan")
    m = len(xs) // 2
    return xs[m] if len(xs) % 2 else 0.5 * (xs[m - 1] + xs[m])


def _spearman(a, b):
    import numpy as np

    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def data_checks(dm, consts, e6_rows, prefix, prefix2):
    rows = [(f"{prefix} |w*| = 1 +- 1e-12", abs(float(dm.w_star.norm()) - 1), abs(float(dm.w_star.norm()) - 1) < 1e-12),
            (f"{prefix} |X^T(Xw* - y)| < 1e-10", float((dm.X.T @ (dm.X @ dm.w_star - dm.y)).norm()),
             float((dm.X.T @ (dm.X @ dm.w_star - dm.y)).norm()) < 1e-10),
            (f"{prefix} R_min > 0", dm.r_min, dm.r_min > 0)]
    mins = [r for r in e6_rows if "S" in r]
    rel_closed = max(abs(r["closed_form"] / r["S"] - 1) for r in mins)
    rows.append((f"{prefix2} minimiser S = closed form (max rel)", rel_closed, rel_closed < 1e-8))
    worst = min(r["S"] / (r["S_min_a"] * (1 - 1e-8)) for r in mins)
    rows.append((f"{prefix2} every minimiser S >= S_min^a (min ratio)", worst, worst >= 1.0))
    worst_f = min(r["S"] / (r["frob_bound"] * (1 - 1e-8)) for r in mins)
    rows.append((f"{prefix2} every minimiser S >= 2 lam |w*|^(2-1/L) sum 1/|W_k| (min ratio)",
                 worst_f, worst_f >= 1.0))
    ideal = [r for r in mins if r["kind"] == "ideal"]
    closed = {(r["depth"], r["w_norm"]): r["ideal_closed"] for r in e6_rows if r["kind"] == "W^C"}
    rel_ideal = max(abs(r["S"] / closed[r["depth"], r["w_norm"]] - 1) for r in ideal)
    rows.append((f"{prefix2} ideal minimiser S = its closed form (max rel)", rel_ideal,
                 rel_ideal < 1e-8))
    sc = [r["S_C"] for r in e6_rows if r["kind"] == "W^C" and r["S_C"]]
    grows = all(all(a < b for a, b in zip(s, s[1:])) for s in sc)
    ratio = min(s[2] / s[0] for s in sc)
    rows.append((f"{prefix2} S(W^C) grows with C, S(W^10) >= 5 S(W^1) (min ratio)", ratio,
                 grows and ratio >= 5))
    return rows


def trajectory_checks(runs, lo, hi, consts, prefix, what):
    """Check 8 (and Q2, Q3): no edge of stability at the small eta, the edge at the large one."""
    rows = []
    small, large = runs[str(lo)], runs[str(hi)]
    thr = 2 / lo
    s_after = [s for t, s in zip(small["s_steps"], small["s"]) if t >= 1]
    rows.append((f"{prefix} {what} eta={lo}: max S_t (t >= 1) < 2/eta = {thr:.4g}", max(s_after), max(s_after) < thr))
    loss = small["loss"]
    mono = all(b <= a * (1 + 1e-12) for a, b in zip(loss[50:], loss[51:]))
    rows.append((f"{prefix} {what} eta={lo}: loss monotone after step 50", float(mono), mono))
    rows.append((f"{prefix} {what} eta={lo}: final distance < 1e-4", small["final_distance"],
                 small["final_distance"] < 1e-4))
    thr = 2 / hi
    rows.append((f"{prefix} {what} eta={hi}: max S_t > 2/eta = {thr:.4g}", max(large["s"]), max(large["s"]) > thr))
    loss = large["loss"]
    nonmono = any(b > a for a, b in zip(loss, loss[1:]))
    rows.append((f"{prefix} {what} eta={hi}: loss non-monotone", float(nonmono), nonmono))
    last = large["s"][-21:-1]  # 20 consecutive steps before the end
    med = _median(last) / thr
    rows.append((f"{prefix} {what} eta={hi}: median S over the last 20 steps / (2/eta) in [0.8, 1.25]", med,
                 0.8 <= med <= 1.25))
    rows.append((f"{prefix} {what} eta={hi}: final distance < 0.1", large["final_distance"],
                 large["final_distance"] < 0.1))
    return rows


def e5_checks(res, consts, prefix, L=3):
    c = consts[L]
    rows = [(f"{prefix} eta={res['eta']}: rank-one residual <= eps_GD ({res['eps_gd']:.3g})", res["rank_one"],
             res["rank_one"] <= res["eps_gd"]),
            (f"{prefix} eta={res['eta']}: sigma^2 spread <= eps_GD", res["spread"], res["spread"] <= res["eps_gd"]),
            (f"{prefix} eta={res['eta']}: alignment >= 1 - eps_GD/sigma_next^2", res["alignment"],
             res["alignment"] >= 1 - res["eps_gd"] / res["sigma_next"] ** 2)]
    lo, hi = 2 ** (-1 / L), 2 ** (1 / L)
    ok = all(lo <= s <= hi for s in res["sigma"])
    rows.append((f"{prefix} eta={res['eta']}: sigma_k in [2^(-1/L), 2^(1/L)] (max |sigma - 1|)",
                 max(abs(s - 1) for s in res["sigma"]), ok))
    r = res["S"] / c["S_min"]
    rows.append((f"{prefix} eta={res['eta']}: 1 <= S/S_min <= 4 kappa = {4 * c['kappa']:.3g}", r,
                 1 <= r <= 4 * c["kappa"]))
    ra = res["S"] / c["S_min_a"]
    rows.append((f"{prefix} eta={res['eta']}: S/S_min^a <= 1.1", ra, ra <= 1.1))
    return rows


def sweep_checks(e1, e3, consts, prefix=""):
    """Checks 3-7 and 10 of the full run."""
    c = consts[DEPTH]
    rows = []
    for name, sw in (("E1", e1), ("E3", e3)):
        bad, n = 0, 0
        for rec in sw.values():
            for dist, s in zip(rec["distance"], rec["s_final"]):
                if dist < 1e-10:
                    n += 1
                    bad += not (c["S_min_a"] * (1 - 1e-4) <= s <= (2 / rec["eta"]) * (1 + 1e-2))
        rows.append((f"3 {name}: converged runs with S_min^a <= S <= 2/eta (violations of {n})", float(bad), bad == 0))
    for name, sw, limit in (("E1", e1, 0.4), ("E3", e3, 0.94)):
        r = sw.get("0.2")
        if r:
            ok = [d for d, div in zip(r["distance"], r["diverged"]) if not div and d < 0.1]
            alive = sum(not div for div in r["diverged"])
            rows.append((f"4 {name} eta=0.2: runs ending at distance < 0.1 (of {alive} not diverged)", float(len(ok)),
                         not ok))
            swing = min((w for w, div in zip(r["swing"], r["diverged"]) if not div), default=float("inf"))
            rows.append((f"4 {name} eta=0.2 (diagnostic): every non-diverged run reaches distance >= 0.25 within "
                         f"its last 50 steps (min over runs of the max)", swing, swing >= 0.25))
        for eta in ("0.005", "0.02", "0.07"):
            r = sw.get(eta)
            if r:
                sel = [d for v, d in zip(r["value"], r["distance"]) if v <= limit + 1e-9]
                frac = sum(d < 1e-6 for d in sel) / max(len(sel), 1)
                rows.append((f"4 {name} eta={eta}: fraction at distance < 1e-6 (scale <= {limit}) >= 0.9", frac,
                             frac >= 0.9))
        r = sw.get("0.1")
        if r:
            sel = [d for v, d, div in zip(r["value"], r["distance"], r["diverged"]) if v <= limit + 1e-9 and not div]
            worst = max(sel) if sel else float("nan")
            rows.append((f"4 {name} eta=0.1: non-diverged runs (scale <= {limit}) end at distance < 0.1", worst,
                         bool(sel) and worst < 0.1))

    def med_final(eta, value):
        r = e1[str(eta)]
        return _median([s for v, s in zip(r["value"], r["s_final"]) if abs(v - value) < 1e-9])

    small = [eta for eta in (0.005, 0.02, 0.07) if str(eta) in e1]
    meds = [med_final(eta, SIGMAS[0]) for eta in small]
    spread = max(meds) / min(meds) - 1
    rows.append(("5 sigma=0.25: median final S of the small etas agree within 5%", spread, spread <= 0.05))
    ok = all(c["S_min"] <= m <= c["UB"] for m in meds)
    rows.append(("5 sigma=0.25: median final S in [S_min, UB] (min over etas)", min(meds), ok))
    ratio = max(m / c["S_min_a"] for m in meds)
    rows.append(("5 sigma=0.25: S/S_min^a in [1, 1.5] (max)", ratio,
                 all(1 <= m / c["S_min_a"] <= 1.5 for m in meds)))
    if "0.005" in e1 and "0.07" in e1:
        m005 = [med_final(0.005, s) for s in SIGMAS]
        m007 = [med_final(0.07, s) for s in SIGMAS]
        hits = [b / (2 / 0.07) for a, b in zip(m005, m007) if a > 2 / 0.07]
        empty = sum(not math.isfinite(x) for x in hits)  # every eta=0.07 run diverged there: nothing to compare
        hits = [x for x in hits if math.isfinite(x)]
        ok = all(0.9 <= x <= 1.05 for x in hits)
        rows.append((f"6 where S(0.005) > 2/0.07: S(0.07) / (2/0.07) in [0.9, 1.05] (min over {len(hits)} scales; "
                     f"{empty} without a converged eta=0.07 run)", min(hits, default=float("nan")), ok))
        rho = _spearman(SIGMAS, m005)
        rows.append(("6 median final S at eta=0.005 rises with sigma (Spearman rho >= 0.8)", rho, rho >= 0.8))
    first = next(iter(e1.values()))
    inits = [_median([s for v, s in zip(first["value"], first["s_init"]) if abs(v - x) < 1e-9]) for x in SIGMAS]
    span = max(inits) / min(inits)
    rows.append(("7 MLP median init S spans >= 1e3 over sigma", span, span >= 1e3))
    first3 = next(iter(e3.values()))
    inits3 = [_median([s for v, s in zip(first3["value"], first3["s_init"]) if abs(v - x) < 1e-9]) for x in SCALES]
    rows.append(("7 residual median init S max/min over s <= 20", max(inits3) / min(inits3),
                 max(inits3) / min(inits3) <= 20))

    def pdiv(r, value):
        sel = [div for v, div in zip(r["value"], r["diverged"]) if abs(v - value) < 1e-9]
        return sum(sel) / max(len(sel), 1)

    p025 = max(pdiv(r, SIGMAS[0]) for r in e1.values())
    rows.append(("7 MLP P(div) = 0 at sigma=0.25 for every eta (max)", p025, p025 == 0))
    p06 = min(pdiv(r, SIGMAS[-1]) for r in e1.values())
    rows.append(("7 MLP P(div) >= 0.5 at sigma=0.6 (min over etas)", p06, p06 >= 0.5))
    worst = 0.0
    for eta in ("0.005", "0.02"):
        r = e3.get(eta)
        if r:
            worst = max([t for v, t, d in zip(r["value"], r["theta_max"], r["distance"]) if v <= 1.2 and d < 1e-10]
                        + [worst])
    rows.append(("10 E3 converged runs (s <= 1.2, eta <= 0.02): max |theta_k|_F <= 10", worst, worst <= 10))
    return rows


# -------------------------------------------------------------------------------------------------- figures
def figures(results, out):
    from lightning_flat.plotting import figure, reference, save

    consts = {int(k): v for k, v in results["constants"].items()}
    c = consts[DEPTH]
    paths = []

    def by_value(rec, key, grid, stat="median"):
        xs, ys, lo, hi = [], [], [], []
        for v in grid:
            vals = [x for vv, x, div in zip(rec["value"], rec[key], rec["diverged"])
                    if abs(vv - v) < 1e-9 and not div and x == x]
            if not vals:
                continue
            t = torch.tensor(vals, dtype=torch.float64)
            if stat == "median":
                m = float(t.median())
                xs.append(v), ys.append(m), lo.append(m), hi.append(m)
            else:  # mean with a 95% interval of the log (values span decades)
                lg = t.clamp(min=1e-300).log10()
                m = float(lg.mean())
                h = 1.96 * float(lg.std()) / math.sqrt(len(vals)) if len(vals) > 1 else 0.0
                xs.append(v), ys.append(10 ** m), lo.append(10 ** (m - h)), hi.append(10 ** (m + h))
        return xs, ys, lo, hi

    for kind, key, grid, fname, label in (("mlp", "e1", SIGMAS, "fig1", "sigma"),
                                          ("residual", "e3", SCALES, "fig3_residual", "s")):
        sweeps = results.get(key)
        if not sweeps:
            continue
        fig, axes = figure(1, 3, size=(4.6, 3.6), title=f"Marion & Chizat 2024, {kind} init, L = {DEPTH}, "
                                                        f"n = {N}, d = {D}, |w*| = 1")
        ax = axes[0, 0]
        for eta, rec in sweeps.items():
            xs, ys, lo, hi = by_value(rec, "distance", grid, stat="mean")
            ax.plot(xs, ys, marker="o", ms=3, label=f"eta = {eta}")
            ax.fill_between(xs, lo, hi, alpha=0.2)
        ax.set_yscale("log"), ax.set_xlabel(label), ax.set_title("final |w_prod - w*|^2 (non-diverged)")
        ax.legend(fontsize=7)
        ax = axes[0, 1]
        first = next(iter(sweeps.values()))
        xs, ys, _, _ = by_value({**first, "diverged": [False] * len(first["value"])}, "s_init", grid)
        ax.plot(xs, ys, "k-", marker="s", ms=3, label="S at init")
        for eta, rec in sweeps.items():
            if float(eta) < 0.09:
                xs, ys, _, _ = by_value(rec, "s_final", grid)
                line = ax.plot(xs, ys, marker="o", ms=3, label=f"final S, eta = {eta}")
                ax.axhline(2 / float(eta), color=line[0].get_color(), ls=":", lw=1.0)
        if kind == "mlp":
            reference(ax, c["UB"], "UB", color="tab:red")
        reference(ax, c["S_min"], "S_min", color="tab:gray")
        reference(ax, c["S_min_a"], "S_min^a")
        ax.set_yscale("log"), ax.set_ylim(0.1, 3e4), ax.set_xlabel(label)
        ax.set_title("sharpness (dotted: 2/eta)")
        ax.legend(fontsize=6)
        ax = axes[0, 2]
        for eta, rec in sweeps.items():
            xs = list(grid)
            ps = [sum(d for v, d in zip(rec["value"], rec["diverged"]) if abs(v - x) < 1e-9)
                  / max(sum(abs(v - x) < 1e-9 for v in rec["value"]), 1) for x in xs]
            ax.plot(xs, ps, marker="o", ms=3, label=f"eta = {eta}")
        ax.set_xlabel(label), ax.set_ylim(-0.05, 1.05), ax.set_title("P(divergence)")
        ax.legend(fontsize=7)
        paths.append(save(fig, os.path.join(out, f"{fname}_sweeps.png")))

    traj = results.get("trajectories")
    if traj:
        from lightning_flat.plotting import series

        fig, axes = figure(2, len(traj), size=(4.6, 3.2), title="Trajectories: distance and sharpness against 2/eta")
        for k, (name, runs) in enumerate(traj.items()):
            for eta, r in runs.items():
                series(axes[0, k], list(range(len(r["distance"]))), r["distance"], label=f"eta = {eta}", logy=True)
                series(axes[1, k], r["s_steps"], r["s"], label=f"S, eta = {eta}")
                axes[1, k].axhline(2 / float(eta), ls=":", lw=1.0, color=axes[1, k].lines[-1].get_color(),
                                   label=f"2/eta = {2 / float(eta):.3g}")
            reference(axes[1, k], c["S_min_a"], "S_min^a")
            axes[0, k].set_title(f"{name}: |w_prod - w*|^2")
            axes[1, k].set_title(f"{name}: sharpness")
            for ax in axes[:, k]:
                ax.legend(fontsize=7)
        paths.append(save(fig, os.path.join(out, "fig1cd_trajectories.png")))
    return paths


def constants_for(dm, depths):
    from lightning_flat import functional as F

    out = {}
    for L in depths:
        out[L] = dict(lam=dm.lambda_min, Lam=dm.lambda_max, a=dm.a, kappa=dm.lambda_max / dm.lambda_min,
                      S_min=float(F.sharpness_lower_bound(dm.X, dm.y, L)),
                      S_min_a=float(F.sharpness_lower_bound(dm.X, dm.y, L, kind="a")),
                      UB=float(F.sharpness_upper_bound(dm.X, dm.y, L)))
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.replot:
        with open(args.replot) as f:
            results = json.load(f)
        paths = figures(results, args.out or os.path.dirname(os.path.abspath(args.replot)))
        print(f"wrote {', '.join(paths)}")
        return dict(figures=paths, checks=[])
    _quiet()
    from lightning_flat.datamodules import UnivariateRegressionDataModule
    from lightning_flat.threads import use_threads

    use_threads(args.threads)
    t_start = time.perf_counter()
    out = args.out or os.path.join("outputs", "marion_chizat2024_quick" if args.quick else "marion_chizat2024")
    from lightning_flat.io import output_folder

    output_folder(out)  # fails now, naming it, if nothing can be written there
    ctx = dict(out=out, wandb=not args.no_wandb, threads=args.threads, engine=args.engine,
               workers=args.workers or (1 if args.quick else 2), address=args.address, resume=args.resume)
    seed = args.seed if args.seed is not None else 0
    if args.quick:  # 2/eta vs S_min^a = 2La comparisons need a near 1
        while not 0.85 <= UnivariateRegressionDataModule(n=N, d=D, seed=seed).a <= 1.15:
            seed += 1
    dm = UnivariateRegressionDataModule(n=N, d=D, seed=seed)
    consts = constants_for(dm, (3, DEPTH))
    c = consts[DEPTH]
    print(f"data seed {seed}: lambda={dm.lambda_min:.4f} Lambda={dm.lambda_max:.4f} a={dm.a:.4f} R_min={dm.r_min:.4f}"
          f"  L={DEPTH}: S_min={c['S_min']:.3f} S_min^a={c['S_min_a']:.3f} UB={c['UB']:.3f}"
          f"  (2/S_min={2 / c['S_min']:.4f}, 2/S_min^a={2 / c['S_min_a']:.4f})", flush=True)
    g = torch.Generator().manual_seed(10_000 + seed)
    w_fixed = torch.randn(D, generator=g, dtype=torch.float64)
    w_fixed = w_fixed / w_fixed.norm()  # the residual networks' fixed output, drawn once per experiment

    e6_rows = e6(dm.X, dm.y, depths=(2, 3, 5, DEPTH) if not args.quick else (3, DEPTH))
    e6_rows += e6(dm.X, 2 * dm.y, depths=(3, DEPTH) if not args.quick else (3,), seed=1)  # |w*| = 2
    checks = []
    results = dict(config=dict(quick=args.quick, data_seed=seed, n=N, d=D, depth=DEPTH),
                   constants={str(k): v for k, v in consts.items()}, e6=e6_rows)
    if args.quick:
        checks += data_checks(dm, consts, e6_rows, "Q1 (1)", "Q1 (2)")
        mlp_traj = trajectory("mlp", dm, 0.35, (0.02, 0.1), 450, ctx, every=25)
        results["trajectories"] = {"MLP sigma=0.35": mlp_traj}
        r = mlp_traj["0.02"]
        s_end = r["s"][-1]
        ok = max(s for t, s in zip(r["s_steps"], r["s"]) if t >= 1) < 2 / 0.02 and r["final_distance"] < 1e-4 and \
            c["S_min_a"] * (1 - 1e-3) <= s_end <= c["UB"]
        checks.append(("Q2 eta=0.02: S_t < 2/eta, distance < 1e-4, S_final in [S_min^a, UB] (S_final)", s_end, ok))
        checks += [("Q3" + n[2:], v, p) for n, v, p in trajectory_checks(mlp_traj, 0.02, 0.1, consts, "Q3", "MLP")
                   if "eta=0.1" in n]
        checks.append(("Q4 0.2 >= 1.5 * 2/S_min^a", 0.2 / (2 / c["S_min_a"]), 0.2 >= 1.5 * 2 / c["S_min_a"]))
        Recorder = _recorder()
        rec = Recorder(track_from=0)
        model = mlp([0.3] * 3, [0, 1, 2], 0.2).double()
        fit(model, dm, 500, "q4-eta0.2", ctx, [rec])
        prods = torch.stack(rec.products)  # (steps, 3, 1, d)
        dist = (prods.reshape(prods.shape[0], 3, -1) - dm.w_star).square().sum(-1)
        _, _, div = state(model, dm)
        swings = [float(dist[-50:, r].nan_to_num(float("inf")).max()) for r in range(3)]
        ok = all(bool(d) or s >= 0.25 for d, s in zip(div.tolist(), swings))
        checks.append(("Q4 eta=0.2: each run diverges or swings to distance >= 0.25 in its last 50 steps (min)",
                       min(s if not d else float("inf") for d, s in zip(div.tolist(), swings)), ok))
        results["q4"] = dict(swings=swings, diverged=div.tolist())
        q5 = sweep("residual", dm, [0.5], [(0.02, 1000, 1)], ctx, w=w_fixed)["0.02"]
        ratio = q5["s_final"][0] / c["S_min_a"]
        checks.append(("Q5 residual s=0.5: distance < 1e-8", q5["distance"][0], q5["distance"][0] < 1e-8))
        checks.append(("Q5 residual s=0.5: 1 <= S/S_min^a <= 3", ratio, 1 <= ratio <= 3))
        checks.append(("Q5 residual s=0.5: max |theta_k|_F <= 10", q5["theta_max"][0], q5["theta_max"][0] <= 10))
        q6 = e5(dm, 0.1, 3000, ctx)
        checks += [("Q6" + n[1:], v, p) for n, v, p in e5_checks(q6, consts, "9")]
        q7a = sweep("mlp", dm, [0.3], [(0.02, 1500, 3)], ctx)["0.02"]
        q7b = sweep("mlp", dm, [0.3], [(0.05, 600, 3)], ctx)["0.05"]
        conv = all(d < 1e-6 for d in q7a["distance"] + q7b["distance"])
        agree = max(abs(a / b - 1) for a, b in zip(q7a["s_final"], q7b["s_final"]))
        checks.append(("Q7 sigma=0.3: every seed converges at eta=0.02 and 0.05", float(conv), conv))
        checks.append(("Q7 sigma=0.3: final S agree within 5% (max rel)", agree, agree <= 0.05))
        q8_runs = [trajectory("mlp", dm, 0.45, (0.07,), 1000, ctx, seed=k, every=100)["0.07"] for k in range(3)]
        q8 = q8_runs
        meds = [_median(r["s"][-21:-1]) / (2 / 0.07) for r in q8_runs
                if math.isfinite(r["final_distance"]) and r["final_distance"] < 1e10]
        checks.append(("Q8 sigma=0.45, eta=0.07: median S over the last 20 steps / (2/eta) in [0.9, 1.1]",
                       meds[0] if meds else float("nan"), bool(meds) and all(0.9 <= m <= 1.1 for m in meds)))
        results.update(q5=q5, q6=q6, q7=dict(a=q7a, b=q7b), q8=q8)
    else:
        checks += data_checks(dm, consts, e6_rows, "1", "2")
        print("E1 (MLP sweeps):", flush=True)
        e1 = sweep("mlp", dm, SIGMAS, E1_FULL, ctx)
        print("E3 (residual sweeps):", flush=True)
        e3 = sweep("residual", dm, SCALES, E3_FULL, ctx, w=w_fixed)
        print("E2 and residual trajectories, E5:", flush=True)
        traj_mlp = trajectory("mlp", dm, 0.3, (0.02, 0.1), 400, ctx)
        traj_res = trajectory("residual", dm, 0.5, (0.02, 0.1), 400, ctx, w=w_fixed)
        e5a, e5b = e5(dm, 0.1, 3000, ctx), e5(dm, 0.05, 6000, ctx)
        results.update(e1=e1, e3=e3, trajectories={"MLP sigma=0.3": traj_mlp, "residual s=0.5": traj_res},
                       e5=dict(a=e5a, b=e5b))
        checks += sweep_checks(e1, e3, consts)
        checks += trajectory_checks(traj_mlp, 0.02, 0.1, consts, "8", "MLP")
        checks += trajectory_checks(traj_res, 0.02, 0.1, consts, "8", "residual")
        checks += e5_checks(e5a, consts, "9") + e5_checks(e5b, consts, "9")
        ratio = e5b["drift"] / e5a["drift"]
        checks.append(("9 drift(0.05)/drift(0.1) in [0.35, 0.65]", ratio, 0.35 <= ratio <= 0.65))
    paths = figures(results, out)
    print("\nchecks:")
    for name, value, ok in checks:
        print(f"  [{'PASS' if ok else 'FAIL'}] {name}: {value:.4g}")
    total = time.perf_counter() - t_start
    print(f"\nwrote {', '.join(paths)}; total {total:.0f} s")
    results.update(seconds=total, figures=paths,
                   checks=[dict(name=n, value=float(v), passed=bool(p)) for n, v, p in checks])
    from lightning_flat.io import write_json

    write_json(os.path.join(out, "results.json"), results)
    if ctx["wandb"]:  # one more offline run with the figures, the checks table and the constants
        from lightning_flat.loggers import wandb_report

        consts = {f"L{L}/{k}": v for L, c in results["constants"].items() for k, v in c.items()
                  if isinstance(v, (int, float))}
        wandb_report(out, f"marion_chizat2024{'-quick' if args.quick else ''}-report", results["config"], paths,
                     results["checks"], {**consts, "seconds": total}, group=os.path.basename(out.rstrip("/")))
    return results


if __name__ == "__main__":
    result = main()
    sys.exit(0 if all(c["passed"] for c in result["checks"]) else 1)
