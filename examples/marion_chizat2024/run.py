"""Marion & Chizat (2024): gradient descent on deep linear regression ends at flat minima.

Univariate least squares with a non-zero optimal residual (n = 50, d = 5, |w*| = 1), a deep linear network
f(x) = w^T W_L ... W_1 x (L = 10), full-batch gradient descent in float64 on the library's Trainer and engine. Each
sweep (initial scales x repetitions) is the replicas of one model per learning rate; runs that diverge are frozen and
counted. S is the exact top Hessian eigenvalue of the training loss, for all replicas at once. E1: MLP init
(N(0, sigma^2) entries) against sigma (fig1_sweeps.png); E2: trajectories at eta = 0.02 and 0.1
(fig1cd_trajectories.png); E3: residual init W_k = I + s/sqrt(L d) N_k against s (fig3_residual_sweeps.png); E5: a
small init at depth 3 against the balancedness bounds of gradient flow. Writes the PNGs, ``results.json`` and offline
wandb runs; prints the checks (Q2-Q8 quick, 3-10 full; ``README.md`` says what each means); exit status 1 when one
fails.

    python examples/marion_chizat2024/run.py --quick      # one data seed with a near 1, reduced sweeps (< 1 minute)
    python examples/marion_chizat2024/run.py              # the full sweeps
    python examples/marion_chizat2024/run.py --replot outputs/marion_chizat2024/results.json
"""

from __future__ import annotations

import math
import os
import sys
import time

import torch

from lightning_flat.experiments.checks import Check, Reading, evaluate, nan_median, spearman

NAME = "marion_chizat2024"
N, D, DEPTH = 50, 5, 10
SIGMAS = [round(0.25 + k * (0.6 - 0.25) / 9, 4) for k in range(10)]
SCALES = [round(k * 1.7 / 9, 4) for k in range(10)]
# (eta, steps, repetitions per scale)
E1_FULL = [(0.005, 40_000, 20), (0.02, 10_000, 20), (0.07, 4000, 20), (0.1, 4000, 20), (0.2, 2000, 80)]
E3_FULL = [(0.005, 4000, 20), (0.02, 4000, 20), (0.07, 4000, 20), (0.1, 4000, 20), (0.2, 4000, 20)]
#: Convergence is read over a run's last WINDOW steps (the largest distance to w* there), never at its last step
#: alone: at eta = 0.2 the distance swings from step to step, and a run that passes near w* at its last step is not
#: converged. The full run records each swinging run's longest stay within 0.1 of w* in this window (printed as a
#: diagnostic check); the window is at least twice that.
WINDOW = 50


def parse_args(argv=None):
    from lightning_flat.experiments.scripts import example_parser

    p = example_parser(__doc__, NAME, quick_help="reduced sweeps on one data seed with a in [0.85, 1.15]",
                       sweep_noun="sweeps' learning rates",
                       workers_help="processes for the sweeps (default: 1 quick, 2 full)")
    p.add_argument("--seed", type=int, default=None, help="data seed (quick: the first seed >= it with a near 1)")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------- training
def fit(model, dm, steps, name, ctx, callbacks=()):
    """Full-batch GD for ``steps`` steps in float64, stopped if every run diverges (a wandb run when asked)."""
    from lightning_flat.callbacks import FiniteLossGuard
    from lightning_flat.experiments.training import fit as train

    train(model, dm, steps, callbacks=[*callbacks, FiniteLossGuard()], log_every_n_steps=max(steps // 50, 1),
          wandb=f"{NAME}-{name}" if ctx["wandb"] else None, out=ctx["out"])


def state(model, dm):
    """Per replica: |w_prod - w*|^2, the loss, and whether it diverged (frozen, non-finite or loss > 1e10)."""
    from lightning_flat import functional as F

    with torch.no_grad():
        E = model.end_to_end().detach().double()
        loss = F.measurement_loss(E, dm.measurements, dm.targets)
        dist = dm.test_error(E)
    active = model.replicas.active
    diverged = ~active | ~torch.isfinite(loss) | (loss > 1e10) | ~torch.isfinite(dist)
    return dist.reshape(-1), loss.reshape(-1), diverged.reshape(-1)


def sharpness(model, dm, replicas=1, weights=None, diverged=None):
    """S of every replica (NaN where diverged), all dense Hessians at once."""
    from lightning_flat import functional as F

    if weights is None:
        weights = model.weights() if model.replicas.count > 1 else [w.unsqueeze(0) for w in model.weights()]
    Ws = [w.detach().double() for w in weights]
    return F.replica_sharpness(Ws, dm.measurements, dm.targets, end_to_end=model.end_to_end_from,
                               active=None if diverged is None else ~diverged)


def mlp(scales, seeds, lr, depth=DEPTH):
    from lightning_flat.models import DeepLinearNet

    if len(seeds) == 1:  # single-run branch
        return DeepLinearNet([D] * depth + [1], init="gaussian", init_scale=scales[0], lr=lr, seed=seeds[0])
    return DeepLinearNet([D] * depth + [1], init="gaussian", init_scale=list(scales), lr=lr, replicas=len(seeds),
                         seed=list(seeds))


def residual(scales, seeds, lr, w, depth=DEPTH):
    from lightning_flat.models import ResidualLinearNet

    if len(seeds) == 1:  # single-run branch
        return ResidualLinearNet(D, depth, scale=scales[0], w=w, lr=lr, seed=seeds[0])
    return ResidualLinearNet(D, depth, scale=list(scales), w=w, lr=lr, replicas=len(seeds), seed=list(seeds))


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


def longest_stretch(inside):
    """Per run (column of the ``(steps, runs)`` booleans ``inside``), the longest run of consecutive steps inside."""
    best = torch.zeros(inside.shape[1], dtype=torch.long)
    current = torch.zeros_like(best)
    for row in inside:
        current = (current + 1) * row
        best = torch.maximum(best, current)
    return best


def sweep_trial(config):
    """One learning rate of a sweep: every (scale, repetition) as a replica of one model; JSON in, JSON out."""
    from lightning_flat.datamodules import UnivariateRegressionDataModule
    from lightning_flat.experiments.recording import StepRecorder
    from lightning_flat.experiments.training import quiet

    quiet(config["threads"])
    dm = UnivariateRegressionDataModule(n=N, d=D, seed=config["data_seed"])
    w = None if config["w"] is None else torch.tensor(config["w"], dtype=torch.float64)
    kind, grid, eta, steps, reps = config["kind"], config["grid"], config["eta"], config["steps"], config["reps"]
    values = [v for v in grid for _ in range(reps)]
    seeds = [1000 * i + j for i in range(len(grid)) for j in range(reps)]
    model = (mlp(values, seeds, eta) if kind == "mlp" else residual(values, seeds, eta, w)).double()
    s_init = sharpness(model, dm, len(seeds))
    t0 = time.perf_counter()
    rec = StepRecorder(track_from=steps - WINDOW)  # w_prod over the last WINDOW steps (the swings at large eta)
    from lightning_flat.sweep import trial_folder  # its wandb runs come back to OUT from any Ray node

    fit(model, dm, steps, f"{kind}-eta{eta}", dict(out=trial_folder(config["out"]), wandb=config["wandb"]), [rec])
    dist, loss, div = state(model, dm)
    if rec.products:
        last = torch.stack(rec.products).reshape(len(rec.products), len(seeds), -1)
        window = (last - dm.w_star).square().sum(-1).nan_to_num(float("inf"))  # (WINDOW, runs) distances
        swing = window.amax(0)
        near = longest_stretch(window < 0.1)
    else:  # every run diverged before the last WINDOW steps (the guard stopped the sweep)
        swing = torch.full((len(seeds),), float("inf"), dtype=torch.float64)
        near = torch.zeros(len(seeds), dtype=torch.long)
    s_final = sharpness(model, dm, len(seeds), diverged=div)
    out = dict(eta=eta, steps=steps, value=values, seed=seeds, s_init=s_init.tolist(), s_final=s_final.tolist(),
               distance=dist.tolist(), loss=loss.tolist(), diverged=div.tolist(), swing=swing.tolist(),
               near_stretch=near.tolist(),
               seconds=time.perf_counter() - t0)
    if kind == "residual":
        out["theta_max"] = torch.stack([t.detach().double().flatten(-2).norm(dim=-1) for t in model.theta()]
                                       ).amax(0).reshape(-1).tolist()
    return out


def trajectory(kind, dm, scale, etas, steps, ctx, seed=7, w=None, every=5):
    """One init trained at each eta (the same seed: the same initial weights), S every ``every`` steps and at each
    of the last 20 steps, loss and distance at every step."""
    from lightning_flat.experiments.recording import StepRecorder

    runs = {}
    for eta in etas:
        model = (mlp([scale], [seed], eta) if kind == "mlp" else residual([scale], [seed], eta, w)).double()
        rec = StepRecorder(sorted(set(range(0, steps, every)) | set(range(steps - 20, steps))), track_from=0)
        fit(model, dm, steps, f"{kind}-trajectory-eta{eta}-seed{seed}", ctx, [rec])
        done = sorted(rec.snapshots)
        stacked = [torch.stack([rec.snapshots[s][j] for s in done]) for j in range(len(rec.snapshots[0]))]
        S = sharpness(model, dm, weights=stacked)  # every snapshot as a replica: one batched computation
        prod = torch.stack(rec.products).reshape(len(rec.products), -1)
        runs[str(eta)] = dict(eta=eta, s_steps=done, s=S.tolist(), loss=torch.stack(rec.losses).reshape(-1).tolist(),
                              distance=(prod - dm.w_star).square().sum(-1).tolist(),
                              final_distance=float(state(model, dm)[0][0]))
    return runs


def e5(dm, eta, steps, ctx, depth=3, sigma=0.002, seed=3):
    """Small-init MLP: top singular triplets, the rank-one residual, epsilon_GD and the sharpness ratios."""
    from lightning_flat import functional as F

    model = mlp([sigma], [seed], eta, depth=depth).double()
    W0 = [w.detach().clone() for w in model.weights()]
    fit(model, dm, steps, f"e5-eta{eta}", ctx)
    W = [w.detach().clone() for w in model.weights()]
    svd = [torch.linalg.svd(w) for w in W]
    sig = [float(s.S[0]) for s in svd]
    D0, DT = F.conserved_gaps(W0), F.conserved_gaps(W)
    return dict(eta=eta, steps=steps, eps_gd=float(F.epsilon_gd(W0, W)), sigma=sig,
                rank_one=max(float(w.square().sum()) - s ** 2 for w, s in zip(W, sig)),
                spread=max(sig) ** 2 - min(sig) ** 2,
                # <v_{k+1}, u_k>^2: the right singular vector of W_{k+1} against the left one of W_k
                alignment=min(float((svd[k + 1].Vh[0] @ svd[k].U[:, 0]) ** 2) for k in range(depth - 1)),
                sigma_next=min(sig[1:]), S=float(sharpness(model, dm)[0]),
                drift=sum(float(torch.linalg.matrix_norm(b - a, ord="nuc")) for a, b in zip(D0, DT)),
                distance=float(state(model, dm)[0][0]))


def quick_runs(dm, ctx, w_fixed):
    """The quick mode's runs (Q2-Q8): one MLP trajectory pair, eta = 0.2 swings, one residual run, E5, two
    learning rates at sigma = 0.3, and three runs at the edge of stability."""
    from lightning_flat.experiments.recording import StepRecorder

    traj = {"MLP sigma=0.35": trajectory("mlp", dm, 0.35, (0.02, 0.1), 450, ctx, every=25)}
    rec = StepRecorder(track_from=0)
    model = mlp([0.3] * 3, [0, 1, 2], 0.2).double()
    fit(model, dm, 500, "q4-eta0.2", ctx, [rec])
    prods = torch.stack(rec.products)  # (steps, 3, 1, d)
    dist = (prods.reshape(prods.shape[0], 3, -1) - dm.w_star).square().sum(-1)
    div = state(model, dm)[2]
    q4 = dict(swings=[float(dist[-50:, r].nan_to_num(float("inf")).max()) for r in range(3)], diverged=div.tolist())
    return dict(trajectories=traj, q4=q4,
                q5=sweep("residual", dm, [0.5], [(0.02, 1000, 1)], ctx, w=w_fixed)["0.02"], q6=e5(dm, 0.1, 3000, ctx),
                q7=dict(a=sweep("mlp", dm, [0.3], [(0.02, 1500, 3)], ctx)["0.02"],
                        b=sweep("mlp", dm, [0.3], [(0.05, 600, 3)], ctx)["0.05"]),
                q8=[trajectory("mlp", dm, 0.45, (0.07,), 1000, ctx, seed=k, every=100)["0.07"] for k in range(3)])


def full_runs(dm, ctx, w_fixed):
    print("E1 (MLP sweeps):", flush=True)
    e1 = sweep("mlp", dm, SIGMAS, E1_FULL, ctx)
    print("E3 (residual sweeps):", flush=True)
    e3 = sweep("residual", dm, SCALES, E3_FULL, ctx, w=w_fixed)
    print("E2 and residual trajectories, E5:", flush=True)
    traj = {"MLP sigma=0.3": trajectory("mlp", dm, 0.3, (0.02, 0.1), 400, ctx),
            "residual s=0.5": trajectory("residual", dm, 0.5, (0.02, 0.1), 400, ctx, w=w_fixed)}
    return dict(e1=e1, e3=e3, trajectories=traj, e5=dict(a=e5(dm, 0.1, 3000, ctx), b=e5(dm, 0.05, 6000, ctx)))


# --------------------------------------------------------------------------------------------------- checks
def K(r, L=DEPTH):
    """The data's constants at depth L (S_min, S_min_a, UB, kappa, ...)."""
    return r["constants"][str(L)]


def at(rec, value, key):
    """``rec[key]`` of the runs of one grid value."""
    return [x for v, x in zip(rec["value"], rec[key]) if abs(v - value) < 1e-9]


def p_div(rec, value):
    sel = at(rec, value, "diverged")
    return sum(sel) / max(len(sel), 1)


def median_final(r, eta, value):
    return nan_median(at(r["e1"][str(eta)], value, "s_final"))


def small_eta_medians(r):  # check 5: the median final S at sigma = 0.25 for the three small rates
    return [median_final(r, eta, SIGMAS[0]) for eta in (0.005, 0.02, 0.07)]


def violations(s):  # check 3: converged runs outside [S_min^a, 2/eta]
    def read(r):
        ends = [(rec["eta"], x) for rec in r[s].values() for d, x in zip(rec["swing"], rec["s_final"]) if d < 1e-10]
        lo = K(r)["S_min_a"] * (1 - 1e-4)
        return Reading(float(sum(not lo <= x <= (2 / eta) * (1 + 1e-2) for eta, x in ends)), n=len(ends))
    return read


def plateau(r):  # check 6: S(0.07) / (2/0.07) where the smallest rate ends sharper than 2/0.07
    hits = [median_final(r, 0.07, s) / (2 / 0.07) for s in SIGMAS if median_final(r, 0.005, s) > 2 / 0.07]
    return Reading([x for x in hits if math.isfinite(x)], n=sum(map(math.isfinite, hits)),
                   empty=sum(not math.isfinite(x) for x in hits))


def init_span(s, grid):  # check 7: max / min over the grid of the median initial S
    def read(r):
        meds = [nan_median(at(next(iter(r[s].values())), x, "s_init")) for x in grid]
        return max(meds) / min(meds)
    return read


def theta_max(r):  # check 10: the largest |theta_k|_F of the converged residual runs (s <= 1.2, eta <= 0.02)
    return max([t for eta in ("0.005", "0.02") for v, t, d in zip(r["e3"][eta]["value"], r["e3"][eta]["theta_max"],
                                                                    r["e3"][eta]["swing"]) if v <= 1.2 and d < 1e-10]
               + [0.0])


def convergence_checks(k, limit):
    """Check 4 for one sweep: eta = 0.2 never converges, the small rates do (scales <= limit), eta = 0.1 stays near."""
    def runs(r, eta, small=True):  # (swing, diverged, near stretch) of the runs at eta (of the scales <= limit)
        rec = r[k.lower()][eta]
        return [(w, div, n) for v, w, div, n in zip(rec["value"], rec["swing"], rec["diverged"], rec["near_stretch"])
                if not small or v <= limit + 1e-9]

    def near(r):  # runs at eta = 0.2 within 0.1 of w* at every one of their last WINDOW steps, of those not diverged
        alive = [w for w, div, _ in runs(r, "0.2", False) if not div]
        return Reading(float(sum(w < 0.1 for w in alive)), alive=len(alive))

    rows = [Check(f"4 {k} eta=0.2: runs within 0.1 of w* over their last {WINDOW} steps (of {{alive}} not diverged)",
                  "eta = 0.2 (above 2/S_min^a) never converges", near, "==", 0),
            Check(f"4 {k} eta=0.2 (diagnostic): every non-diverged run reaches distance >= 0.25 within its last "
                  f"{WINDOW} steps (min over runs of the max)", "they swing far from w*",
                  lambda r: min((w for w, div, _ in runs(r, "0.2", False) if not div), default=math.inf), ">=", 0.25),
            Check(f"4 {k} eta=0.2 (diagnostic): longest stay within 0.1 of w* in the last {WINDOW} steps <= "
                  f"{WINDOW // 2} (max over runs)", "the window is at least twice any stay near w* of a swinging run",
                  lambda r: max((n for _, div, n in runs(r, "0.2", False) if not div), default=0), "<=",
                  WINDOW // 2)]
    rows += [Check(f"4 {k} eta={eta}: fraction within 1e-6 of w* over the last {WINDOW} steps (scale <= {limit}) "
                   ">= 0.9", "the small rates converge", lambda r, eta=eta: sum(w < 1e-6 for w, _, _ in runs(r, eta))
                   / max(len(runs(r, eta)), 1), ">=", 0.9) for eta in ("0.005", "0.02", "0.07")]
    return rows + [Check(f"4 {k} eta=0.1: non-diverged runs (scale <= {limit}) stay within 0.1 of w* over their last "
                         f"{WINDOW} steps", "eta = 0.1 stays near w* without converging",
                         lambda r: [w for w, div, _ in runs(r, "0.1") if not div], "<", 0.1)]


def sweep_checks():
    """Checks 3-7 and 10 of the full run (E1 and E3)."""
    rows = [Check(f"3 {k}: converged runs with S_min^a <= S <= 2/eta (violations of {{n}})",
                  "no run converges sharper than 2/eta or flatter than S_min^a", violations(k.lower()), "==", 0)
            for k in ("E1", "E3")]
    for k, limit in (("E1", 0.4), ("E3", 0.94)):
        rows += convergence_checks(k, limit)
    return rows + [
        Check("5 sigma=0.25: median final S of the small etas agree within 5%", "the end does not depend on eta",
              lambda r: max(small_eta_medians(r)) / min(small_eta_medians(r)) - 1, "<=", 0.05),
        Check("5 sigma=0.25: median final S in [S_min, UB] (min over etas)", "a small init ends between the bounds",
              small_eta_medians, "in", lambda r: (K(r)["S_min"], K(r)["UB"]), show=min),
        Check("5 sigma=0.25: S/S_min^a in [1, 1.5] (max)", "close to the tight bound",
              lambda r: [m / K(r)["S_min_a"] for m in small_eta_medians(r)], "in", (1, 1.5), show=max),
        Check("6 where S(0.005) > 2/0.07: S(0.07) / (2/0.07) in [0.9, 1.05] (min over {n} scales; {empty} without a "
              "converged eta=0.07 run)", "GD ends at 2/eta where GF ends sharper", plateau, "in", (0.9, 1.05),
              show=min),
        Check("6 median final S at eta=0.005 rises with sigma (Spearman rho >= 0.8)", "larger inits end sharper",
              lambda r: spearman(SIGMAS, [median_final(r, 0.005, s) for s in SIGMAS]), ">=", 0.8),
        Check("7 MLP median init S spans >= 1e3 over sigma", "an MLP can start far sharper than 2/eta",
              init_span("e1", SIGMAS), ">=", 1e3),
        Check("7 residual median init S max/min over s <= 20", "a residual init hardly depends on s",
              init_span("e3", SCALES), "<=", 20),
        Check("7 MLP P(div) = 0 at sigma=0.25 for every eta (max)", "small MLP inits never diverge",
              lambda r: max(p_div(rec, SIGMAS[0]) for rec in r["e1"].values()), "==", 0),
        Check("7 MLP P(div) >= 0.5 at sigma=0.6 (min over etas)", "large ones mostly do",
              lambda r: min(p_div(rec, SIGMAS[-1]) for rec in r["e1"].values()), ">=", 0.5),
        Check("10 E3 converged runs (s <= 1.2, eta <= 0.02): max |theta_k|_F <= 10", "they stay near their init",
              theta_max, "<=", 10)]


def trajectory_checks(prefix, what, key, lo, hi, parts=("stable", "monotone", "converges", "edge")):
    """Check 8 (and Q2, Q3): no edge of stability at the small eta, the edge at the large one."""
    def small(r):
        return r["trajectories"][key][str(lo)]

    def large(r):
        return r["trajectories"][key][str(hi)]

    p = f"{prefix} {what} eta="
    rows = [
        ("stable", Check(f"{p}{lo}: max S_t (t >= 1) < 2/eta = {2 / lo:.4g}", "no edge of stability",
                         lambda r: max(s for t, s in zip(small(r)["s_steps"], small(r)["s"]) if t >= 1), "<", 2 / lo)),
        ("monotone", Check(f"{p}{lo}: loss monotone after step 50", "a stable descent", lambda r: all(
            b <= a * (1 + 1e-12) for a, b in zip(small(r)["loss"][50:], small(r)["loss"][51:])), "true")),
        ("converges", Check(f"{p}{lo}: final distance < 1e-4", "it converges", lambda r: small(r)["final_distance"],
                            "<", 1e-4)),
        ("edge", Check(f"{p}{hi}: max S_t > 2/eta = {2 / hi:.4g}", "the sharpness crosses 2/eta",
                       lambda r: max(large(r)["s"]), ">", 2 / hi)),
        ("edge", Check(f"{p}{hi}: loss non-monotone", "the edge of stability",
                       lambda r: any(b > a for a, b in zip(large(r)["loss"], large(r)["loss"][1:])), "true")),
        ("edge", Check(f"{p}{hi}: median S over the last 20 steps / (2/eta) in [0.8, 1.25]", "S hovers at 2/eta",
                       lambda r: nan_median(large(r)["s"][-21:-1]) / (2 / hi), "in", (0.8, 1.25))),
        ("edge", Check(f"{p}{hi}: final distance < 0.1", "the run ends near w*", lambda r: large(r)["final_distance"],
                       "<", 0.1))]
    return [check for part, check in rows if part in parts]


def e5_checks(prefix, eta, get, L=3):
    """Check 9 (and Q6): a small init stays balanced, rank one and near S_min^a."""
    def eps(r):
        return get(r)["eps_gd"]

    p = f"{prefix} eta={eta}:"
    return [
        Check(p + " rank-one residual <= eps_GD ({eps:.3g})", "the layers are rank one up to eps_GD",
              lambda r: Reading(get(r)["rank_one"], eps=eps(r)), "<=", eps),
        Check(f"{p} sigma^2 spread <= eps_GD", "their top singular values agree", lambda r: get(r)["spread"], "<=",
              eps),
        Check(f"{p} alignment >= 1 - eps_GD/sigma_next^2", "consecutive layers are aligned",
              lambda r: get(r)["alignment"], ">=", lambda r: 1 - eps(r) / get(r)["sigma_next"] ** 2),
        Check(f"{p} sigma_k in [2^(-1/L), 2^(1/L)] (max |sigma - 1|)", "singular values near 1",
              lambda r: get(r)["sigma"], "in", (2 ** (-1 / L), 2 ** (1 / L)),
              show=lambda s: max(abs(x - 1) for x in s)),
        Check(p + " 1 <= S/S_min <= 4 kappa = {k:.3g}", "as flat as gradient flow promises",
              lambda r: Reading(get(r)["S"] / K(r, L)["S_min"], k=4 * K(r, L)["kappa"]), "in",
              lambda r: (1, 4 * K(r, L)["kappa"])),
        Check(f"{p} S/S_min^a <= 1.1", "close to the tight bound", lambda r: get(r)["S"] / K(r, L)["S_min_a"], "<=",
              1.1)]


def min_swing(r):  # Q4: the smallest of the runs' largest distances over their last 50 steps (diverged: inf)
    return min(s if not d else math.inf for d, s in zip(r["q4"]["diverged"], r["q4"]["swings"]))


def edge_medians(r):  # Q8: median S over the last 20 steps / (2/eta) of the runs that did not diverge
    return [nan_median(t["s"][-21:-1]) / (2 / 0.07) for t in r["q8"]
            if math.isfinite(t["final_distance"]) and t["final_distance"] < 1e10]


def checks(quick):
    if not quick:
        return [*sweep_checks(), *trajectory_checks("8", "MLP", "MLP sigma=0.3", 0.02, 0.1),
                *trajectory_checks("8", "residual", "residual s=0.5", 0.02, 0.1),
                *e5_checks("9", 0.1, lambda r: r["e5"]["a"]), *e5_checks("9", 0.05, lambda r: r["e5"]["b"]),
                Check("9 drift(0.05)/drift(0.1) in [0.35, 0.65]", "gradient descent's drift is O(eta)",
                      lambda r: r["e5"]["b"]["drift"] / r["e5"]["a"]["drift"], "in", (0.35, 0.65))]
    q5, q7 = (lambda r: r["q5"]), (lambda r: r["q7"])
    return [
        *trajectory_checks("Q2", "MLP", "MLP sigma=0.35", 0.02, 0.1, parts=("stable", "converges")),
        Check("Q2 MLP eta=0.02: S_final in [S_min^a, UB]", "it ends between the bounds",
              lambda r: r["trajectories"]["MLP sigma=0.35"]["0.02"]["s"][-1], "in",
              lambda r: (K(r)["S_min_a"] * (1 - 1e-3), K(r)["UB"])),
        *trajectory_checks("Q3", "MLP", "MLP sigma=0.35", 0.02, 0.1, parts=("edge",)),
        Check("Q4 0.2 >= 1.5 * 2/S_min^a", "eta = 0.2 is far above the stable rates",
              lambda r: 0.2 / (2 / K(r)["S_min_a"]), ">=", 1.5),
        Check("Q4 eta=0.2: each run diverges or swings to distance >= 0.25 in its last 50 steps (min)",
              "no run converges at eta = 0.2", min_swing, ">=", 0.25),
        Check("Q5 residual s=0.5: distance < 1e-8", "a residual init converges", lambda r: q5(r)["distance"][0], "<",
              1e-8),
        Check("Q5 residual s=0.5: 1 <= S/S_min^a <= 3", "to a flat minimum",
              lambda r: q5(r)["s_final"][0] / K(r)["S_min_a"], "in", (1, 3)),
        Check("Q5 residual s=0.5: max |theta_k|_F <= 10", "near its init", lambda r: q5(r)["theta_max"][0], "<=", 10),
        *e5_checks("Q6", 0.1, lambda r: r["q6"]),
        Check("Q7 sigma=0.3: every seed converges at eta=0.02 and 0.05", "both rates converge",
              lambda r: all(d < 1e-6 for d in q7(r)["a"]["distance"] + q7(r)["b"]["distance"]), "true"),
        Check("Q7 sigma=0.3: final S agree within 5% (max rel)", "to the same sharpness", lambda r: max(
            abs(a / b - 1) for a, b in zip(q7(r)["a"]["s_final"], q7(r)["b"]["s_final"])), "<=", 0.05),
        Check("Q8 sigma=0.45, eta=0.07: median S over the last 20 steps / (2/eta) in [0.9, 1.1]",
              "a sharp init ends at the edge of stability", edge_medians, "in", (0.9, 1.1), show="first")]


# -------------------------------------------------------------------------------------------------- figures
def by_value(rec, key, grid, stat="median"):
    """Per grid value, over the runs that did not diverge: xs, the median (or, with ``stat="gmean"``, the geometric
    mean: the values span decades), and the 95% interval of the geometric mean (the median twice otherwise)."""
    rows = []
    for v in grid:
        t = torch.tensor([x for x, d in zip(at(rec, v, key), at(rec, v, "diverged")) if not d and x == x],
                         dtype=torch.float64)
        if len(t) and stat == "median":
            rows.append((v, *[float(t.median())] * 3))
        elif len(t):
            lg = t.clamp(min=1e-300).log10()
            m, h = float(lg.mean()), 1.96 * float(lg.std()) / math.sqrt(len(t)) if len(t) > 1 else 0.0
            rows.append((v, 10 ** m, 10 ** (m - h), 10 ** (m + h)))
    return [list(c) for c in zip(*rows)] if rows else ([], [], [], [])


DIST, SMIN, SMIN_A = r"$|w_{\mathrm{prod}} - w^*|^2$", r"$S_{\min}$", r"$S_{\min}^a$"


def figures(results, out):
    from lightning_flat.plotting import figure, figure_legend, legend_outside, log_axis, reference, save, series

    c = results["constants"][str(DEPTH)]
    paths = []
    for kind, key, grid, fname, label in (("mlp", "e1", SIGMAS, "fig1", r"$\sigma$"),
                                          ("residual", "e3", SCALES, "fig3_residual", "$s$")):
        sweeps = results.get(key)
        if not sweeps:
            continue
        fig, axes = figure(1, 3, size=(4.6, 3.6), title=f"Marion & Chizat 2024, {kind} init, $L$ = {DEPTH}, "
                                                        f"$n$ = {N}, $d$ = {D}, $|w^*|$ = 1")
        ax = axes[0, 0]
        for eta, rec in sweeps.items():
            xs, ys, lo, hi = by_value(rec, "distance", grid, stat="gmean")
            ax.plot(xs, ys, marker="o", ms=3, label=rf"$\eta$ = {eta}")
            ax.fill_between(xs, lo, hi, alpha=0.2)
        log_axis(ax)
        ax.set_xlabel(label), ax.set_ylabel(DIST), ax.set_title(f"final {DIST} (non-diverged)")
        ax = axes[0, 1]
        first = next(iter(sweeps.values()))
        xs, ys, _, _ = by_value({**first, "diverged": [False] * len(first["value"])}, "s_init", grid)
        ax.plot(xs, ys, "k-", marker="s", ms=3, label="$S$ at init")
        for eta, rec in sweeps.items():
            if float(eta) < 0.09:
                xs, ys, _, _ = by_value(rec, "s_final", grid)
                line = ax.plot(xs, ys, marker="o", ms=3, label=rf"final $S$, $\eta$ = {eta}")
                ax.axhline(2 / float(eta), color=line[0].get_color(), ls=":", lw=1.0)
        if kind == "mlp":
            reference(ax, c["UB"], "UB", color="tab:red")
        reference(ax, c["S_min"], SMIN, color="tab:gray")
        reference(ax, c["S_min_a"], SMIN_A)
        ax.set_ylim(0.1, 3e4), log_axis(ax)
        ax.set_xlabel(label), ax.set_ylabel("sharpness $S$"), ax.set_title(r"sharpness (dotted: $2/\eta$)")
        legend_outside(ax)
        ax = axes[0, 2]
        for eta, rec in sweeps.items():
            ax.plot(list(grid), [p_div(rec, x) for x in grid], marker="o", ms=3, label=rf"$\eta$ = {eta}")
        ax.set_xlabel(label), ax.set_ylim(-0.05, 1.05), ax.set_title("P(divergence)")
        figure_legend(fig, ax, ncol=len(sweeps))
        paths.append(save(fig, os.path.join(out, f"{fname}_sweeps.png")))

    traj = results.get("trajectories")
    if traj:
        fig, axes = figure(2, len(traj), size=(4.6, 3.2),
                           title=r"Trajectories: distance and sharpness against $2/\eta$")
        for k, (name, runs) in enumerate(traj.items()):
            for eta, r in runs.items():
                series(axes[0, k], list(range(len(r["distance"]))), r["distance"], label=rf"$\eta$ = {eta}", logy=True)
                series(axes[1, k], r["s_steps"], r["s"], label=rf"$S$, $\eta$ = {eta}")
                axes[1, k].axhline(2 / float(eta), ls=":", lw=1.0, color=axes[1, k].lines[-1].get_color(),
                                   label=rf"$2/\eta$ = {2 / float(eta):.3g}")
            reference(axes[1, k], c["S_min_a"], SMIN_A)
            title = name.replace("sigma", r"$\sigma$").replace(" s=", " $s$=")
            axes[0, k].set_title(f"{title}: {DIST}")
            axes[1, k].set_title(f"{title}: sharpness $S$")
        for row in axes:  # the same entries in every column: one legend per row, right of the last panel
            legend_outside(row[-1])
        paths.append(save(fig, os.path.join(out, "fig1cd_trajectories.png")))
    return paths


def constants_for(dm, depths):
    from lightning_flat import functional as F

    return {L: dict(lam=dm.lambda_min, Lam=dm.lambda_max, a=dm.a, kappa=dm.lambda_max / dm.lambda_min,
                    S_min=float(F.sharpness_lower_bound(dm.X, dm.y, L)),
                    S_min_a=float(F.sharpness_lower_bound(dm.X, dm.y, L, kind="a")),
                    UB=float(F.sharpness_upper_bound(dm.X, dm.y, L))) for L in depths}


def main(argv=None) -> dict:
    from lightning_flat.datamodules import UnivariateRegressionDataModule
    from lightning_flat.experiments import scripts

    args = parse_args(argv)
    if args.replot:
        return scripts.replot(args.replot, args.out, figures)
    out, t_start = scripts.start(args, NAME)
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

    results = dict(config=dict(quick=args.quick, data_seed=seed, n=N, d=D, depth=DEPTH),
                   constants={str(k): v for k, v in consts.items()})
    results.update((quick_runs if args.quick else full_runs)(dm, ctx, w_fixed))
    paths = figures(results, out)
    rows = evaluate(checks(args.quick), results)
    total = time.perf_counter() - t_start
    print(f"\nwrote {', '.join(paths)}; total {total:.0f} s")
    results.update(seconds=total, figures=paths, checks=rows)
    from lightning_flat.io import write_json

    write_json(os.path.join(out, "results.json"), results)
    if ctx["wandb"]:  # one more offline run with the figures, the checks table and the constants
        summary = {f"L{L}/{k}": v for L, c in results["constants"].items() for k, v in c.items()
                   if isinstance(v, (int, float))}
        scripts.report(out, NAME, args.quick, results["config"], paths, rows, {**summary, "seconds": total})
    return results


if __name__ == "__main__":
    result = main()
    sys.exit(0 if all(c["passed"] for c in result["checks"]) else 1)
