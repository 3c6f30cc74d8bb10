"""Wang & Jacot (2023): SGD with an L2 ridge jumps from high to low rank, and never back.

A 2 x 2 matrix with three entries observed, [[1, ?], [eps, 1]], completed by a deep linear network (width 100, no
biases, torch's nn.Linear init) trained by SGD on one entry per step, drawn i.i.d., with weight decay. Gradient descent
goes to a rank-2 minimum; SGD with a large learning rate jumps, at a random time, to rank 1 (s2/s1 falls to round-off
in a few steps), one way, and a low-noise phase then fills in the missing entry. Each experiment trains the 16 seeds
of a configuration as the replicas of one ``DeepLinearNet`` with this folder's YAML schedules: E1 annealing with
offshoots (fig1_annealing.png), E2 depth 3 against 4 (fig2_depth.png), E3 the eps x t0 grid (fig3_epsilon.png), E4 a
periodic schedule (fig4_periodic.png), E5 epoch shuffling (fig5_sampler.png), and gradient descent to convergence
against the minima of the 2 x 2 problem. Writes the PNGs, ``results.json``, ``summary.json`` and offline wandb runs;
prints the checks (Q2-Q5 quick, 1-8 full; ``README.md`` says what each means); exit status 1 when one fails.

    python examples/wang_jacot2023/run.py --quick     # depth 4 vs 3 at width 32, 16 seeds (< 1 minute)
    python examples/wang_jacot2023/run.py             # E1-E5 and gradient descent to convergence
    python examples/wang_jacot2023/run.py --replot outputs/wang_jacot2023/results.json
"""

from __future__ import annotations

import math
import os
import sys
import time

import torch

from lightning_flat.experiments.checks import Check, Reading, evaluate, nan_median

NAME = "wang_jacot2023"
HERE = os.path.dirname(os.path.abspath(__file__))
EVERY = 10  # steps between measurements of E
THRESHOLD = 1e-3  # a jump: s2/s1 below this (after the warm-up)
WARMUP = 500
SEEDS = 16
WIDTH = 100
E1_TK = list(range(0, 6001, 500))  # offshoot starts
E1_OFFSHOOT = (0.02, 0.001, 4000)  # lr, ridge, steps
E3_EPS = [1.0, 0.5, 0.25, 0.15, 0.1, 0.05]
E3_T0 = [0, 500, 1000, 2000, 4000]
E3_LOW = 4000
E3_DRIFT = 60_000  # the t0 = 0, eps = 1 cell continued past 1/(lr ridge) = 5e4 steps (a diagnosis, not a check)
E3_DRIFT_AT = [4000, 8000, 15000, 30000, 45000, 60000]
SUCCESS = 0.1  # a completed matrix: final relerr below this
# the 2 x 2 minima by rank (depth, eps, ridge) computed by multi-start BFGS, and those set against gradient descent
T4_ROWS = [(3, 0.25, 0.1), (3, 0.25, 0.001), (3, 0.2, 0.1), (3, 0.1, 0.1), (4, 0.1, 0.1), (4, 0.1, 0.001),
           (4, 0.25, 0.1)]
T4_GD = [(3, 0.25, 0.1), (4, 0.1, 0.1)]
S2S1 = "$s_2/s_1$ of $E$"


def parse_args(argv=None):
    from lightning_flat.experiments.scripts import example_parser

    return example_parser(__doc__, NAME, quick_help="depth 4 vs 3 at width 32, eps = 0.1, 16 seeds (< 1 minute)",
                          sweep_noun="experiments",
                          workers_help="processes for the full run's experiments (default 2)").parse_args(argv)


# ------------------------------------------------------------------------------------------------- configuration
def yaml_config(name):
    """Model dims, data eps, schedule (HyperparameterSchedule init_args) and max_steps of one of this folder's YAML
    files: the example trains exactly what ``lightning-flat fit --config`` trains."""
    import yaml

    with open(os.path.join(HERE, name)) as f:
        cfg = yaml.safe_load(f)
    sched = next(c["init_args"] for c in cfg["trainer"]["callbacks"]
                 if c["class_path"].endswith("HyperparameterSchedule"))
    data = cfg["data"]["init_args"]
    return dict(dims=cfg["model"]["init_args"]["dims"], eps=data["observed"][1][0], steps=cfg["trainer"]["max_steps"],
                lr=sched["lr"], weight_decay=sched["weight_decay"])


def e3_schedule(t0):
    """t0 high-noise steps (the first min(t0, 500) at lr 0.03, the rest at 0.2; ridge 0.1), then lr 0.02, ridge
    0.001."""
    if t0 == 0:
        return [[0, 0.02]], [[0, 0.001]]
    return [[0, 0.03]] + ([[WARMUP, 0.2]] if t0 > WARMUP else []) + [[t0, 0.02]], [[0, 0.1], [t0, 0.001]]


def problem(eps, batch_size=1, sampling="replacement"):
    from lightning_flat.datamodules import ObservedEntriesDataModule

    return ObservedEntriesDataModule(observed=[[1.0, None], [eps, 1.0]], ground_truth=[[1.0, 1.0 / eps], [eps, 1.0]],
                                     batch_size=batch_size, steps_per_epoch=100_000, sampling=sampling)


def network(dims, seeds, dtype=torch.float32):
    from lightning_flat.models import DeepLinearNet

    seed = list(seeds) if len(seeds) > 1 else seeds[0]  # single-run branch
    return DeepLinearNet(dims, init="uniform", lr=0.03, weight_decay=0.1, replicas=len(seeds), seed=seed).to(dtype)


def dims_for(depth, width):
    return [2] + [width] * (depth - 1) + [2]


# ------------------------------------------------------------------------------------------------- training
def completion_callback(dm):
    """``completion/relerr``, the squared error on the missing entry relative to zero filling, (1 - eps E01)^2, and
    ``completion/train_mse``, the full-batch training loss (1/3) sum (E_ij - b)^2, of every replica every EVERY
    steps."""
    from lightning_flat import functional as F
    from lightning_flat.callbacks import MeasuringCallback

    class Completion(MeasuringCallback):
        group = "completion"

        def measure(self, trainer, pl_module):
            E = pl_module.end_to_end()
            meas, b = dm.measurements_as(E.dtype, E.device)
            return {"completion/relerr": dm.test_error(E) / scale,
                    "completion/train_mse": F.measurement_loss(E, meas, b)}

    scale = dm.test_error_scale()
    return Completion(EVERY)


def train(model, dm, steps, name, ctx, replicas, lr=None, weight_decay=None, extra=(), rank_every=None):
    """Train ``model`` on ``dm`` for ``steps`` steps with the schedule, measuring E every EVERY steps; returns the
    per-replica series as plain lists (steps, s1, ratio, relerr, train_mse[, approx rank, weights_sq, cost])."""
    from lightning_flat.callbacks import (ApproximateRank, FiniteLossGuard, HyperparameterSchedule, MatrixNorms,
                                          SingularValues)
    from lightning_flat.experiments.training import fit

    sv, comp = SingularValues(every_n_steps=EVERY), completion_callback(dm)
    callbacks = [sv, comp, FiniteLossGuard(), *extra]
    if lr is not None or weight_decay is not None:
        callbacks.insert(0, HyperparameterSchedule(lr=lr, weight_decay=weight_decay, every_n_steps=500))
    rank = norms = None
    if rank_every:
        rank, norms = ApproximateRank(every_n_steps=rank_every), MatrixNorms(every_n_steps=rank_every)
        callbacks += [rank, norms]
    done = fit(model, dm, steps, callbacks=callbacks, precision="64-true" if model.dtype == torch.float64 else
               "32-true", log_every_n_steps=100, wandb=f"{NAME}-{name}" if ctx["wandb"] else None, out=ctx["out"])

    def table(cb, key):
        hist = cb.replica_history[key]  # steps, rows (one list of R values per step), 5 significant digits
        return [h[0] for h in hist], [[_r(x) for x in h[1]] for h in hist]

    steps_, ratio = table(sv, "sv/ratio2")
    out = dict(name=name, steps=steps_, ratio=ratio, s1=table(sv, "sv/s1")[1],
               relerr=table(comp, "completion/relerr")[1], train_mse=table(comp, "completion/train_mse")[1],
               seconds=done.seconds,
               active=model.replicas.active.tolist())
    if rank is not None:
        out["rank_steps"], out["approx_rank"] = table(rank, "rank/approx")
        out["weights_sq"] = table(norms, "norm/weights_sq")[1]
        out["representation_cost"] = table(norms, "norm/representation_cost")[1]
    print(f"  {name}: {model.replicas.count} runs x {steps} steps in {done.seconds:.1f} s", flush=True)
    return out


def events(run, horizon=None, after=WARMUP):
    """Per replica: the jump time tau (NaN: none), collapse to E = 0, and the final relerr / train MSE / ratio
    (at step ``horizon`` when given, per replica when a list)."""
    from lightning_flat import functional as F

    steps = torch.tensor(run["steps"])
    ratio = torch.tensor(run["ratio"], dtype=torch.float64)
    s1 = torch.tensor(run["s1"], dtype=torch.float64)
    R = ratio.shape[1]
    horizons = horizon if isinstance(horizon, list) else [horizon if horizon is not None else int(steps[-1])] * R
    rows = [int((steps == h).nonzero()[0, 0]) for h in horizons]
    collapsed = [bool(s1[rows[r], r] < 1e-3) for r in range(R)]  # E -> 0: rank 0, absorbing; not a success
    masked = ratio.clone()
    for r in range(R):
        masked[rows[r] + 1:, r] = float("nan")  # only up to the replica's own horizon
        if collapsed[r]:
            masked[:, r] = float("nan")
    tau = F.jump_time(steps, masked, THRESHOLD, after=after).tolist()
    return dict(tau=tau, collapsed=collapsed, relerr=[run["relerr"][rows[r]][r] for r in range(R)],
                train_mse=[run["train_mse"][rows[r]][r] for r in range(R)],
                ratio=[run["ratio"][rows[r]][r] for r in range(R)])


def jumps(run, horizon=None):
    return sum(not math.isnan(t) for t in events(run, horizon)["tau"])


def max_ratio_after(run, tau, r, until=None):
    """The largest s2/s1 of replica r strictly after step tau (up to ``until``)."""
    vals = [row[r] for t, row in zip(run["steps"], run["ratio"]) if t > tau and (until is None or t <= until)]
    vals = [v for v in vals if not math.isnan(v)]
    return max(vals) if vals else 0.0


def subset(run, replicas):
    """The series of some replicas only (to keep results.json small)."""
    keys = ("ratio", "s1", "relerr", "train_mse", "approx_rank", "weights_sq", "representation_cost")
    out = {k: v for k, v in run.items() if k not in keys}
    for k in keys:
        if k in run:
            out[k] = [[_r(row[r]) for r in replicas] for row in run[k]]
    return out


def _r(x):
    return float(f"{x:.5g}") if isinstance(x, float) and math.isfinite(x) else x


# ------------------------------------------------------------------------------------------------- experiments
def e1(ctx):
    from lightning_flat.experiments.recording import StepRecorder

    cfg = yaml_config("e1_schedule.yaml")
    seeds = list(range(SEEDS))
    snaps = StepRecorder(E1_TK)
    main = train(network(cfg["dims"], seeds), problem(cfg["eps"]), cfg["steps"], "e1-main", ctx, SEEDS, cfg["lr"],
                 cfg["weight_decay"], extra=[snaps], rank_every=100)
    gd = train(network(cfg["dims"], seeds), problem(cfg["eps"], batch_size=None), cfg["steps"], "e1-gd", ctx, SEEDS,
               cfg["lr"], cfg["weight_decay"])
    # offshoots: every (t_k, seed) as one replica of one model, copied from the main path, each with its own stream
    lr, ridge, steps = E1_OFFSHOOT
    pairs = [(tk, r) for tk in E1_TK for r in seeds]
    off_model = network(cfg["dims"], [100_000 + 100 * k + r for k, r in enumerate(r for _, r in pairs)])
    with torch.no_grad():
        for j, W in enumerate(off_model.weights()):
            W.copy_(torch.stack([snaps.snapshots[tk][j][r] for tk, r in pairs]))
    off = train(off_model, problem(cfg["eps"]), steps, "e1-offshoots", ctx, len(pairs), lr=lr, weight_decay=ridge)
    return dict(main=main, gd=gd, offshoots=off, pairs=pairs, eps=cfg["eps"], depth=len(cfg["dims"]) - 1)


def e2(depth, ctx, sampling="replacement", name=None):
    cfg = yaml_config("e2_schedule.yaml")
    return train(network(dims_for(depth, WIDTH), list(range(SEEDS))), problem(cfg["eps"], sampling=sampling),
                 cfg["steps"], name or f"e2-L{depth}", ctx, SEEDS, cfg["lr"], cfg["weight_decay"],
                 rank_every=100 if sampling == "replacement" else None)


def e3(eps, ctx):
    """All t0 of one eps as replicas (per-replica schedules), each read at its own end t0 + 4000."""
    specs = [e3_schedule(t0) for t0 in E3_T0 for _ in range(SEEDS)]
    seeds = [1000 * i + s for i in range(len(E3_T0)) for s in range(SEEDS)]
    run = train(network(dims_for(4, WIDTH), seeds), problem(eps), max(E3_T0) + E3_LOW, f"e3-eps{eps}", ctx,
                len(seeds), lr={"replicas": [s[0] for s in specs]}, weight_decay={"replicas": [s[1] for s in specs]})
    ev = events(run, horizon=[t0 + E3_LOW for t0 in E3_T0 for _ in range(SEEDS)])
    return dict(eps=eps, t0=[t0 for t0 in E3_T0 for _ in range(SEEDS)], relerr=ev["relerr"], tau=ev["tau"],
                collapsed=ev["collapsed"], seconds=run["seconds"])


def e3_drift(ctx):
    """E3's t0 = 0 cell at eps = 1 (no noisy phase: lr 0.02, ridge 0.001 from the start, the same 16 inits) continued
    to E3_DRIFT steps, past the weak ridge's time scale 1/(lr ridge) = 5e4 steps: where its drift takes the runs.
    Read at E3_DRIFT_AT: median relerr and completed runs."""
    run = train(network(dims_for(4, WIDTH), list(range(SEEDS))), problem(1.0), E3_DRIFT, "e3-drift", ctx, SEEDS,
                lr=[[0, 0.02]], weight_decay=[[0, 0.001]])
    at = [events(run, horizon=h) for h in E3_DRIFT_AT]
    return dict(steps=E3_DRIFT_AT, median=[nan_median(a["relerr"]) for a in at],
                successes=[sum(v < SUCCESS and not c for v, c in zip(a["relerr"], a["collapsed"])) for a in at],
                relerr=[a["relerr"] for a in at], seconds=run["seconds"])


def e4(ctx):
    cfg = yaml_config("e4_schedule.yaml")
    return train(network(cfg["dims"], list(range(SEEDS))), problem(cfg["eps"]), cfg["steps"], "e4", ctx, SEEDS,
                 cfg["lr"], cfg["weight_decay"], rank_every=100)


def e5(which, ctx):
    if which == "e1":
        cfg = yaml_config("e1_schedule.yaml")
        return train(network(cfg["dims"], list(range(SEEDS))), problem(cfg["eps"], sampling="shuffle"), cfg["steps"],
                     "e5-e1-shuffle", ctx, SEEDS, cfg["lr"], cfg["weight_decay"])
    return e2(4, ctx, sampling="shuffle", name="e5-e2L4-shuffle")


def quick_runs(ctx):
    cfg = yaml_config("quick.yaml")
    seeds, width = list(range(SEEDS)), cfg["dims"][1]
    out = {f"L{depth}": train(network(dims_for(depth, width), seeds), problem(cfg["eps"]), cfg["steps"],
                              f"quick-L{depth}", ctx, SEEDS, cfg["lr"], cfg["weight_decay"]) for depth in (4, 3)}
    out["gd"] = train(network(dims_for(4, width), seeds), problem(cfg["eps"], batch_size=None), 3000, "quick-L4-gd",
                      ctx, SEEDS, cfg["lr"], cfg["weight_decay"])
    out["shuffle"] = train(network(dims_for(4, width), seeds), problem(cfg["eps"], sampling="shuffle"), cfg["steps"],
                           "quick-L4-shuffle", ctx, SEEDS, cfg["lr"], cfg["weight_decay"])
    return out


def minima(ctx):
    """The minima of the 2 x 2 problem by rank (multi-start BFGS on E), and gradient descent (float64, width 100)
    through the E1 warm-up then 20000 steps at lr 0.2 to convergence, against the rank-2 minimum."""
    from lightning_flat import functional as F
    from lightning_flat.datamodules import MeasurementDataModule
    from lightning_flat.experiments.training import trainer
    from lightning_flat.measurements import Entries

    f64 = torch.float64
    meas = Entries(torch.tensor([0, 1, 1]), torch.tensor([0, 0, 1]), (2, 2), dtype=f64)
    record = dict(t4={}, gd={})
    for depth, eps, ridge in T4_ROWS:
        b = torch.tensor([1.0, eps, 1.0], dtype=f64)
        starts = [torch.tensor([[1.0, x], [eps, 1.0]], dtype=f64) for x in (0.1, 0.3, 0.5, 0.8, 1.0)]
        r2 = F.ridge_local_minimum(meas, b, ridge, depth, 2, starts=starts)
        r1 = F.ridge_local_minimum(meas, b, ridge, depth, 1, starts=[torch.tensor([[1.0, 1 / eps], [eps, 1.0]],
                                                                                  dtype=f64)])
        record["t4"][f"{depth},{eps},{ridge}"] = {k: None if m is None else describe(m[0], eps) | {"J": m[1]}
                                                  for k, m in (("rank2", r2), ("rank1", r1))}
    for depth, eps, ridge in T4_GD:
        b = torch.tensor([1.0, eps, 1.0], dtype=f64)
        dm = MeasurementDataModule.from_problem(meas, b, batch_size=None)
        model = network(dims_for(depth, WIDTH), [0], f64)
        for steps, lr in ((WARMUP, 0.03), (20_000, 0.2)):  # a new Trainer each: its steps count from 0
            model.lr, model.weight_decay = lr, ridge
            trainer(steps).fit(model, dm)
        Ws = [w.detach() for w in model.weights()]
        got, ref = describe(F.end_to_end(Ws), eps), record["t4"][f"{depth},{eps},{ridge}"]["rank2"]
        record["gd"][f"{depth},{eps},{ridge}"] = dict(got, residuals=F.ridge_critical_residuals(Ws, meas, b, ridge),
                                                     deviation=max(abs(got[k] - ref[k]) for k in ("E01", "ratio",
                                                                                                  "relerr")))
    return record


def describe(E, eps):
    s = torch.linalg.svdvals(E)
    return dict(E01=float(E[0, 1]), ratio=float(s[1] / s[0]), s1=float(s[0]), s2=float(s[1]),
                relerr=float((1 - eps * E[0, 1]) ** 2))


# ------------------------------------------------------------------------------------------------- checks
def one_way(runs, after=()):
    """The largest s2/s1 after tau over the runs (and the ``after`` values, e.g. offshoots started after tau)."""
    worst = 0.0
    for run in runs:
        for r, tau in enumerate(events(run)["tau"]):
            if not math.isnan(tau):
                worst = max(worst, max_ratio_after(run, tau, r))
    return max([worst, *after])


def quick_switch(q):
    """Q4 at step 4000: relerr of the depth-4 runs that jumped by 3000 (should be < 0.3), of those that stayed
    rank 2 over 2900-3000 (> 0.6), and the number caught in between."""
    jumped, final, out = events(q["L4"], horizon=3000)["tau"], events(q["L4"])["relerr"], dict(bad=[], stay=[], mid=0)
    for r in range(SEEDS):
        low = min(row[r] for t, row in zip(q["L4"]["steps"], q["L4"]["ratio"]) if 2900 <= t <= 3000)
        if not math.isnan(jumped[r]):
            out["bad"] += [final[r]] if not final[r] < 0.3 else []
        elif low > 0.1:
            out["stay"] += [final[r]] if not final[r] > 0.6 else []
        else:
            out["mid"] += 1
    return out


def offshoot_failures(late):
    """Check 4: offshoots from t_k >= tau + 200 that do not complete (relerr >= 0.05), or from t_k <= tau - 200 that
    do not stay at rank 2 while fitting (relerr <= 0.3 or train MSE >= 1e-3), of how many."""
    def read(r):
        e1r, tau = r["e1"], events(r["e1"]["main"])["tau"]
        oev, bad, n = e1r["offshoot_final"], 0, 0
        for k, (tk, s) in enumerate(e1r["pairs"]):
            if math.isnan(tau[s]) or not (tk >= tau[s] + 200 if late else tk <= tau[s] - 200):
                continue
            n += 1
            bad += not (oev["relerr"][k] < 0.05 if late else oev["relerr"][k] > 0.3 and oev["train_mse"][k] < 1e-3)
        return Reading(bad, n=n)
    return read


def late_offshoots(r):  # check 3: the largest s2/s1 of the offshoots started after their seed's jump
    tau = events(r["e1"]["main"])["tau"]
    return [r["e1"]["offshoot_final"]["max_ratio"][k] for k, (tk, s) in enumerate(r["e1"]["pairs"])
            if not math.isnan(tau[s]) and tk >= tau[s]]


def _le(b, a):
    """b <= a for 'smallest successful eps' values, where None (no eps succeeds) is the largest."""
    if b is None:
        return a is None
    return a is None or b <= a


def e3_table(cells):
    table = {}
    for cell in cells:
        table[cell["eps"]] = {}
        for t0 in E3_T0:
            vals = [v for v, t in zip(cell["relerr"], cell["t0"]) if t == t0]
            col = [c for c, t in zip(cell["collapsed"], cell["t0"]) if t == t0]
            table[cell["eps"]][t0] = dict(median=nan_median(vals), successes=sum(
                v < SUCCESS and not c for v, c in zip(vals, col)), runs=len(vals), values=vals)
    return table


def e3_smallest(table, t0):
    good = [eps for eps in E3_EPS if table[eps][t0]["successes"] >= 0.75 * table[eps][t0]["runs"]]
    return min(good) if good else None


def smallest_monotone(r):  # check 6: the smallest eps with >= 3/4 successes never grows with t0
    smallest = [e3_smallest(e3_table(r["e3"]), t0) for t0 in E3_T0]
    return Reading(all(_le(b, a) for a, b in zip(smallest, smallest[1:])),
                   table=", ".join(f"t0={t0}: {s}" for t0, s in zip(E3_T0, smallest)))


def e4_counts(run):
    """Runs with relerr < 0.05 at the end of each low phase (steps 2500, 4500, 6500, 8500)."""
    return [sum(v < 0.05 for v in run["relerr"][run["steps"].index(WARMUP + 2000 * (k + 1))]) for k in range(4)]


def e4_outside(r):  # check 7: jumps outside the high phases (lr 0.4) of the periodic schedule
    taus = [t for t in events(r["e4"])["tau"] if not math.isnan(t)]
    return Reading(sum(not (int(t) >= WARMUP and (int(t) - WARMUP) % 2000 < 1000) for t in taus), n=len(taus))


def critical(key):  # T3: the largest critical-point residual at gradient descent's end (inf unless rank 2)
    def read(r):
        res = r["theory"]["gd"][key]["residuals"]
        worst = max(res["balance"], res["layer_singular_values"], abs(res["cost_gap"]), res["stationarity"])
        return worst if res["rank"] == 2 else math.inf
    return read


def checks(quick):
    if quick:
        q = lambda r: r["quick"]  # noqa: E731
        return [
            Check("Q2 depth 4: runs that jump by step 3000 (>= 5/16)", "depth 4 jumps",
                  lambda r: jumps(q(r)["L4"], 3000), ">=", 5),
            Check("Q2 depth 3: runs that jump by step 3000 (<= 1/16)", "depth 3 does not",
                  lambda r: jumps(q(r)["L3"], 3000), "<=", 1),
            Check("Q3 gradient descent, depth 4, step 3000: every s2/s1 in [0.345, 0.362] (range {lo:.4f}-{hi:.4f})",
                  "gradient descent ends at the rank-2 minimum, 0.3535", lambda r: (lambda x: Reading(
                      x, lo=min(x), hi=max(x)))(events(q(r)["gd"])["ratio"]), "in", (0.345, 0.362), show=max),
            Check("Q4 after a jump s2/s1 stays < 1e-2 through step 4000 (max after tau)", "a jump is one way",
                  lambda r: one_way([q(r)["L4"], q(r)["L3"]]), "<", 1e-2),
            Check("Q4 depth 4 at step 4000: runs that jumped have relerr < 0.3 (failures)", "jumped runs complete",
                  lambda r: len(quick_switch(q(r))["bad"]), "==", 0),
            Check("Q4 depth 4 at step 4000: runs with min s2/s1 > 0.1 over 2900-3000 have relerr > 0.6 (failures)",
                  "rank-2 runs do not", lambda r: len(quick_switch(q(r))["stay"]), "==", 0),
            Check("Q4 depth 4: runs caught mid-jump at the switch (<= 2/16)", "few are in between",
                  lambda r: quick_switch(q(r))["mid"], "<=", 2),
            Check("Q5 shuffled sampling, depth 4: runs that jump (<= 1/16)", "shuffling removes the jumps",
                  lambda r: jumps(q(r)["shuffle"]), "<=", 1)]
    rows = []
    for depth, eps, ridge in T4_GD:
        key = f"{depth},{eps},{ridge}"
        rows.append(Check(f"1 T4 GD end point = the rank-2 minimum (L={depth}, eps={eps}, ridge={ridge}): max |diff| "
                          "of E01, s2/s1, relerr", "gradient descent stays at rank 2",
                          f"theory/gd/{key}/deviation", "<=", 2e-3))
        if (depth, eps) == (3, 0.25):
            rows.append(Check("1 T3 critical point after GD (L=3, eps=0.25): max of balance, layer singular values, "
                              "cost gap, stationarity residuals", "at a critical point of the ridge objective",
                              critical(key), "<=", 1e-9))
    smallest_4000 = lambda r: (lambda s: s if s else math.nan)(e3_smallest(e3_table(r["e3"]), E3_T0[-1]))  # noqa
    return rows + [
        Check("2 E1: runs that jump by step 6000 (>= 6/16)", "SGD jumps to rank 1",
              lambda r: jumps(r["e1"]["main"]), ">=", 6),
        Check("2 E1: gradient descent ends with s2/s1 in [0.20, 0.215] (>= 15/16)", "gradient descent does not",
              lambda r: sum(0.20 <= x <= 0.215 for x in events(r["e1"]["gd"])["ratio"]), ">=", 15),
        Check("3 one way: after tau, s2/s1 <= 1e-2 in E1, E2, E4 and the offshoots after tau (max)", "never back",
              lambda r: one_way([r["e1"]["main"], r["e2"]["L3"], r["e2"]["L4"], r["e4"]], late_offshoots(r)), "<=",
              1e-2),
        Check("4 E1 offshoots from t_k >= tau + 200 end with relerr < 0.05 (failures of {n})",
              "a quiet phase after the jump completes the matrix", offshoot_failures(True), "==", 0),
        Check("4 E1 offshoots from t_k <= tau - 200 end with relerr > 0.3, train MSE < 1e-3 (failures of {n})",
              "before it, the network fits at rank 2", offshoot_failures(False), "==", 0),
        Check("5 E2 depth 4: runs that jump before step 5000 (>= 10/16)", "depth helps the jump",
              lambda r: jumps(r["e2"]["L4"], 5000), ">=", 10),
        Check("5 E2 depth 3: runs that jump before step 5000 (<= 2/16)", "depth 3 hardly",
              lambda r: jumps(r["e2"]["L3"], 5000),
              "<=", 2),
        Check("5 E2 at step 8000: median relerr, depth 4 (< 0.15)", "depth 4 completes",
              lambda r: nan_median(events(r["e2"]["L4"])["relerr"]), "<", 0.15),
        Check("5 E2 at step 8000: median relerr, depth 3 (> 0.8)", "depth 3 does not",
              lambda r: nan_median(events(r["e2"]["L3"])["relerr"]), ">", 0.8),
        Check(f"6 E3 t0 = 0: runs that complete the matrix (relerr < {SUCCESS}) by step {E3_LOW}, any eps",
              "no noisy phase, no completion", lambda r: sum(e3_table(r["e3"])[eps][0]["successes"]
                                                            for eps in E3_EPS), "==", 0),
        Check("6 E3 smallest eps with >= 3/4 successes is non-increasing in t0 ({table})",
              "longer noisy phases complete smaller eps", smallest_monotone, "true"),
        Check("6 E3 t0 = 4000: smallest eps with >= 3/4 successes (<= 0.15)", "a long noisy phase completes eps 0.15",
              smallest_4000, "<=", 0.15),
        Check("7 E4 every jump falls in a high phase ({n} jumps; outside)", "jumps need noise", e4_outside, "==", 0),
        Check("7 E4 runs with relerr < 0.05 at the ends of the low phases never decrease ({counts})", "one way",
              lambda r: (lambda c: Reading(all(b >= a for a, b in zip(c, c[1:])), counts=c))(e4_counts(r["e4"])),
              "true"),
        Check("7 E4 runs with relerr < 0.05 at the end (>= 10/16)", "most runs end completed",
              lambda r: e4_counts(r["e4"])[-1], ">=", 10),
        *[Check(f"8 E5 shuffled sampling, {label}: runs that jump (<= 1/16)", "the jumps need i.i.d. draws",
                lambda r, key=key: jumps(r["e5"][key]), "<=", 1)
          for key, label in (("e1", "E1"), ("e2", "E2 depth 4"))]]


# ------------------------------------------------------------------------------------------------- figures
def figures(res, out):
    paths = [fig_quick(res["quick"], out)] if "quick" in res else []
    if "e1" in res:
        paths += [fig_e1(res["e1"], out), fig_e2(res["e2"], out), fig_e3(res["e3"], out), fig_e4(res["e4"], out),
                  fig_e5(res, out)]
    return paths


def threshold(ax, **kw):
    ax.axhline(THRESHOLD, **({"color": "k", "ls": ":", "lw": 1} | kw))


def fig_quick(q, out):
    from lightning_flat.plotting import figure, figure_legend, reference, replica_series, save

    fig, axes = figure(1, 3, size=(4.6, 3.4), title=r"Rank jumps, --quick: $\epsilon$ = 0.1, width 32, 16 seeds")
    a, b, c = axes[0]
    for ax, run, key, color, label, logy in (
            (a, "L4", "ratio", "tab:blue", "SGD, depth 4", True),
            (a, "L3", "ratio", "tab:orange", "SGD, depth 3", True),
            (b, "gd", "ratio", "tab:green", "GD, depth 4", True),
            (b, "shuffle", "ratio", "tab:purple", "SGD, shuffled, depth 4", True),
            (c, "L4", "relerr", "tab:blue", None, False), (c, "L3", "relerr", "tab:orange", None, False)):
        replica_series(ax, q[run]["steps"], q[run][key], label=label, logy=logy, color=color, alpha=0.6)
    reference(b, 0.3535, "rank-2 minimum $s_2/s_1$")
    for ax, title in ((a, "SGD"), (b, "gradient descent and shuffled sampling"), (c, "completion error")):
        ax.axvspan(500, 3000, color="0.9", zorder=0, label=None if ax is not a else
                   "lr 0.25, ridge 0.1 (then lr 0.05, ridge 0.001)")
        ax.set_title(title), ax.set_ylabel(S2S1 if ax is not c else "relerr (missing entry, vs zero filling)")
    threshold(a, label="jump threshold $10^{-3}$"), threshold(b)
    figure_legend(fig, a, b, ncol=3)  # one legend for the figure, below the panels
    return save(fig, os.path.join(out, "fig_quick.png"))


def e1_shown(r):
    """The jump times of E1's main path and the seed the figure shows: the jumped one with the median jump time."""
    ev = events(r["main"])
    taus = {k: t for k, t in enumerate(ev["tau"]) if not math.isnan(t)}
    return taus, (sorted(taus, key=lambda k: taus[k])[len(taus) // 2] if taus else 0)


def reduce_e1(r):
    """E1 as results.json keeps it: the end points of every offshoot, the series of the shown seed's offshoots."""
    oev = events(r["offshoots"])
    r["offshoot_final"] = dict(relerr=oev["relerr"], train_mse=oev["train_mse"], ratio=oev["ratio"],
                               max_ratio=[max_ratio_after(r["offshoots"], -1, k) for k in range(len(r["pairs"]))])
    _, shown = e1_shown(r)
    keep = [k for k, (_, rr) in enumerate(r["pairs"]) if rr == shown]
    r["offshoots"] = subset(r["offshoots"], keep) | dict(kept=keep)


def fig_e1(r, out):
    import matplotlib

    from lightning_flat.plotting import figure, legend_outside, log_axis, reference, replica_series, save, series

    main, off, gd = r["main"], r["offshoots"], r["gd"]
    taus, shown = e1_shown(r)
    tau = taus.get(shown, math.nan)
    fig, axes = figure(2, 3, size=(4.8, 3.4), title=rf"E1, annealing: $\epsilon$ = {r['eps']}, depth {r['depth']}; "
                                                    rf"seed {shown} ($\tau$ = {tau:.0f}) and its offshoots")
    color = lambda after: matplotlib.colormaps["coolwarm"](0.05 if after else 0.95)  # noqa: E731
    for ax, key, logy, ylabel in ((axes[0][0], "relerr", False, "relerr (missing entry, vs zero filling)"),
                                  (axes[0][1], "train_mse", True, "train MSE")):
        series(ax, main["steps"], [row[shown] for row in main[key]], label="main path (lr 0.2, ridge 0.1)", logy=logy,
               color="k")
        for i, k in enumerate(off["kept"]):  # the offshoots of the seed shown (results.json keeps only theirs)
            tk = r["pairs"][k][0]
            series(ax, [tk + s for s in off["steps"]], [row[i] for row in off[key]], logy=logy, alpha=0.8, lw=0.9,
                   color=color(not math.isnan(tau) and tk >= tau),
                   label=None if tk else "offshoots (lr 0.02, ridge 0.001):\nred before $\\tau$, blue after")
        if not math.isnan(tau):
            ax.axvline(tau, color="tab:green", ls="--", lw=1, label=r"jump time $\tau$")
        ax.set_ylabel(ylabel)
    axes[0][1].set_ylim(bottom=1e-12)
    legend_outside(axes[0][1])
    ax = axes[0][2]
    replica_series(ax, main["steps"], main["ratio"], logy=True, color="0.6", lw=0.6, label="other SGD seeds")
    series(ax, main["steps"], [row[shown] for row in main["ratio"]], logy=True, color="k", label=f"SGD seed {shown}")
    replica_series(ax, gd["steps"], gd["ratio"], label="gradient descent,\n16 seeds", logy=True, color="tab:blue",
                   lw=0.8)
    reference(ax, 0.2074, "rank-2 minimum", ls="-.")
    threshold(ax, label="threshold $10^{-3}$")
    ax.set_ylabel(S2S1), legend_outside(ax)
    ax = axes[1][0]
    replica_series(ax, main["rank_steps"], main["approx_rank"], color="0.6", lw=0.6, label="other seeds")
    series(ax, main["rank_steps"], [row[shown] for row in main["approx_rank"]], color="k", label=f"seed {shown}")
    log_axis(ax)
    ax.axhline(2, color="tab:red", ls="--", lw=1, label="2"), ax.axhline(1, color="tab:blue", ls="--", lw=1, label="1")
    ax.set_ylabel(r"approximate rank of the factors ($\alpha = 10^{-3}$)"), legend_outside(ax)
    ax = axes[1][1]
    series(ax, main["rank_steps"], [row[shown] for row in main["weights_sq"]], label=r"$\sum_l \|W_l\|_F^2$",
           color="k", logy=True)
    series(ax, main["rank_steps"], [row[shown] for row in main["representation_cost"]], logy=True, ls="--",
           label="$L \\sum_i s_i(E)^{2/L}$\n(its minimum over\nfactorisations)", color="tab:red")
    ax.set_ylabel(f"parameter norm, seed {shown}"), legend_outside(ax)
    ax = axes[1][2]
    pts = [(tk - taus[s], r["offshoot_final"]["relerr"][k], color(tk >= taus[s])) for k, (tk, s) in
           enumerate(r["pairs"]) if s in taus]
    ax.scatter([p[0] for p in pts], [p[1] for p in pts], c=[p[2] for p in pts], s=12)
    ax.axvline(0, color="tab:green", ls="--", lw=1, label=r"$t_k = \tau$")
    ax.axhline(0.05, color="k", ls=":", lw=1, label="0.05"), ax.axhline(0.3, color="k", ls="-.", lw=1, label="0.3")
    log_axis(ax)
    ax.set_xlabel(r"offshoot start $t_k - \tau$ (runs that jumped)"), ax.set_ylabel("offshoot final relerr")
    legend_outside(ax)
    return save(fig, os.path.join(out, "fig1_annealing.png"))


def five_seeds(axes, run, mark):
    """relerr (top) and s2/s1 (bottom) of the first five seeds of ``run``, with ``mark(ax)`` drawing the schedule."""
    from lightning_flat.plotting import series

    for ax, (what, logy, label) in zip(axes, (("relerr", False, "relerr"), ("ratio", True, S2S1))):
        for k in range(5):
            series(ax, run["steps"], [x[k] for x in run[what]], logy=logy, label=f"seed {k}")
        mark(ax)
        ax.set_ylabel(label)
        if what == "ratio":
            threshold(ax, ls="--", lw=0.8), ax.set_ylim(1e-8, 2)


def fig_e2(r, out):
    from lightning_flat.plotting import figure, legend_outside, save

    fig, axes = figure(2, 2, size=(4.8, 3.2), title=r"E2, depth: $\epsilon$ = 0.1, width 100 (5 of 16 seeds; schedule "
                                                    "switches dotted)")
    for col, key in enumerate(("L3", "L4")):
        five_seeds(axes[:, col], r[key], lambda ax: [ax.axvline(t, color="k", ls=":", lw=0.8) for t in (500, 5000)])
        axes[0, col].set_ylim(-0.05, 1.3)
        for ax in axes[:, col]:
            ax.set_title(f"depth {key[1]}")
    legend_outside(axes[0][1])
    return save(fig, os.path.join(out, "fig2_depth.png"))


def fig_e3(cells, out):
    import matplotlib

    from lightning_flat.plotting import figure, legend_outside, log_axis, save

    table = e3_table(cells)
    fig, axes = figure(1, 1, size=(7.2, 4.2), title=r"E3: final relerr vs $\epsilon$, depth 4 (dots: 16 seeds; lines: "
                                                    "median)")
    ax = axes[0][0]
    for i, t0 in enumerate(E3_T0):
        c = matplotlib.colormaps["viridis"](i / (len(E3_T0) - 1))
        xs = [eps * (1 + 0.04 * (i - 2)) for eps in E3_EPS]  # a small offset per t0, so the dots do not overlap
        for x, eps in zip(xs, E3_EPS):
            ax.scatter([x] * len(table[eps][t0]["values"]), table[eps][t0]["values"], color=c, s=6, alpha=0.5)
        ax.plot(xs, [table[eps][t0]["median"] for eps in E3_EPS], color=c, marker="o", label=f"$t_0$ = {t0}")
    ax.axhline(SUCCESS, color="k", ls=":", lw=1, label=f"success: relerr < {SUCCESS}")
    log_axis(ax, "x")
    ax.set_xlabel(r"$\epsilon$ (observed entry; the missing one is $1/\epsilon$)")
    ax.set_ylabel("relerr after $t_0$ + 4000 steps"), legend_outside(ax)
    return save(fig, os.path.join(out, "fig3_epsilon.png"))


def fig_e4(run, out):
    from lightning_flat.plotting import figure, legend_outside, save

    fig, axes = figure(2, 1, size=(9.0, 2.8), title=r"E4, periodic schedule: $\epsilon$ = 0.2, depth 3 (5 of 16 seeds;"
                                                    " shaded: high phases, lr 0.4, ridge 0.1)")
    five_seeds(axes[:, 0], run, lambda ax: [ax.axvspan(WARMUP + 2000 * c, WARMUP + 2000 * c + 1000, color="tab:red",
                                                       alpha=0.08, lw=0) for c in range(4)])
    legend_outside(axes[0][0])
    return save(fig, os.path.join(out, "fig4_periodic.png"))


def fig_e5(res, out):
    from lightning_flat.plotting import figure, legend_outside, replica_series, save

    fig, axes = figure(1, 2, size=(4.6, 3.4), title="E5, the sampler: i.i.d. draws vs epoch shuffling")
    ax = axes[0][0]
    pairs = ((r"E1 (depth 3, $\epsilon$ 0.25)", res["e1"]["main"], res["e5"]["e1"]),
             (r"E2 (depth 4, $\epsilon$ 0.1)", res["e2"]["L4"], res["e5"]["e2"]))
    x = range(len(pairs))
    for shift, label, i in ((-0.2, "i.i.d. (with replacement)", 1), (0.2, "shuffled (without)", 2)):
        ax.bar_label(ax.bar([k + shift for k in x], [jumps(p[i]) for p in pairs], width=0.4, label=label))
    ax.set_xticks(list(x), [p[0] for p in pairs], fontsize=8)
    ax.set_ylabel(f"runs that jump (of {SEEDS})"), ax.set_ylim(0, SEEDS + 1), ax.legend(fontsize=7, loc="upper left")
    ax = axes[0][1]
    replica_series(ax, res["e5"]["e2"]["steps"], res["e5"]["e2"]["ratio"], label="shuffled, E2 depth 4", logy=True,
                   color="tab:purple", lw=0.7)
    threshold(ax, label="threshold $10^{-3}$")
    ax.set_ylabel(S2S1), ax.set_ylim(1e-8, 2), legend_outside(ax)
    return save(fig, os.path.join(out, "fig5_sampler.png"))


# ------------------------------------------------------------------------------------------------- driver
def trial(config):
    """One experiment as a sweep trial (``lightning_flat.sweep``): JSON in, JSON out."""
    from lightning_flat.experiments.training import quiet
    from lightning_flat.sweep import trial_folder  # its wandb runs come back to OUT from any Ray node

    job, ctx = config["job"], {**config["ctx"], "out": trial_folder(config["ctx"]["out"])}
    quiet(ctx["threads"])
    run = dict(e1=lambda: e1(ctx), e2=lambda: e2(job[1], ctx), e3=lambda: e3(job[1], ctx), e4=lambda: e4(ctx),
               e5=lambda: e5(job[1], ctx), theory=lambda: minima(ctx), quick=lambda: quick_runs(ctx),
               e3_drift=lambda: e3_drift(ctx))
    return run[job[0]]()


def main(argv=None) -> dict:
    from lightning_flat.experiments import scripts
    from lightning_flat.io import write_json
    from lightning_flat.sweep import run_sweep

    args = parse_args(argv)
    if args.replot:
        return scripts.replot(args.replot, args.out, figures)
    out, t_start = scripts.start(args, NAME)
    ctx = dict(out=out, wandb=not args.no_wandb, threads=args.threads)
    jobs = [("quick",)] if args.quick else [("e3", eps) for eps in E3_EPS] + [  # the longest first
        ("e3_drift",), ("e1",), ("e2", 4), ("e5", "e2"), ("e2", 3), ("e4",), ("e5", "e1"), ("theory", True)]
    workers = args.workers or (1 if args.quick else 2)
    rows = run_sweep(trial, [{"job": list(job), "ctx": ctx} for job in jobs], os.path.join(out, "sweep"),
                     engine=args.engine, workers=workers, address=args.address, resume=args.resume,
                     progress=lambda row: print(f"  done: {row['config']['job']} in {row['seconds']:.0f} s",
                                                flush=True))
    res = dict(e2={}, e3=[], e5={})
    for job, row in zip(jobs, rows):
        if job[0] in ("e2", "e5"):
            res[job[0]][f"L{job[1]}" if job[0] == "e2" else job[1]] = row["result"]
        elif job[0] == "e3":
            res["e3"].append(row["result"])
        else:
            res[job[0]] = row["result"]
    res["e3"].sort(key=lambda c: -c["eps"])
    if args.quick:
        res = dict(quick=res["quick"])
    else:
        reduce_e1(res["e1"])  # keeps results.json small
        print_tables(res)
    checks_ = evaluate(checks(args.quick), res)
    res.update(config=dict(quick=args.quick, seeds=SEEDS, every=EVERY, threshold=THRESHOLD), workers=workers,
               checks=checks_)
    path = os.path.join(out, "results.json")
    write_json(path, res, indent=None)  # before the figures: --replot redraws them from it
    res["figures"] = figures(res, out)
    res["seconds"] = time.perf_counter() - t_start
    write_json(path, res, indent=None)
    summary = summarize(res)
    write_json(os.path.join(out, "summary.json"), summary)
    if ctx["wandb"]:  # one more offline run with the figures, the checks table and the jump counts
        finals = {f"{exp}/{k}/jumped": sum(t == t for t in v["tau"]) for exp in ("quick", "e2", "e5")
                  for k, v in summary.get(exp, {}).items()}
        if "e1" in summary:
            finals["e1/main/jumped"] = sum(t == t for t in summary["e1"]["main"]["tau"])
        scripts.report(out, NAME, args.quick, res["config"], res["figures"], checks_,
                       {**finals, "seconds": res["seconds"]})
    print(f"\nwrote {path}, {', '.join(res['figures'])}; total {res['seconds']:.0f} s ({workers} worker(s))")
    return res


def summarize(res):
    """The numbers behind the checks without the series (a few kB): jump times, end points, tables, theory."""
    out = {k: res[k] for k in ("config", "checks", "seconds", "workers", "theory") if k in res}

    def runs(run, horizon=None):
        ev = events(run, horizon=horizon)
        return dict(tau=ev["tau"], collapsed=ev["collapsed"], relerr=[_r(x) for x in ev["relerr"]],
                    ratio=[_r(x) for x in ev["ratio"]], seconds=run["seconds"])

    if "quick" in res:
        out["quick"] = {k: runs(v) for k, v in res["quick"].items()}
    if "e1" in res:
        out["e1"] = dict(main=runs(res["e1"]["main"]), gd=runs(res["e1"]["gd"]), pairs=res["e1"]["pairs"],
                         offshoot_final={k: [_r(x) for x in v] for k, v in res["e1"]["offshoot_final"].items()})
        out["e2"] = {k: dict(runs(v), before_5000=runs(v, horizon=5000)["tau"]) for k, v in res["e2"].items()}
        out["e3"] = {str(eps): {str(t0): {k: v for k, v in cell.items() if k != "values"} for t0, cell in row.items()}
                     for eps, row in e3_table(res["e3"]).items()}
        out["e3_drift"] = res["e3_drift"]
        out["e4"] = dict(runs(res["e4"]), low_phase_counts=e4_counts(res["e4"]))
        out["e5"] = {k: runs(v) for k, v in res["e5"].items()}
    return out


def print_tables(res):
    ev = events(res["e1"]["main"])
    taus = sorted(t for t in ev["tau"] if not math.isnan(t))
    print(f"\nE1: {len(taus)}/16 jump by step 6000, tau = {', '.join(f'{t:.0f}' for t in taus)}; "
          f"{sum(ev['collapsed'])} collapsed to E = 0")
    for key in ("L3", "L4"):
        print(f"E2 depth {key[1]}: {jumps(res['e2'][key], 5000)}/16 jump before 5000; median relerr at "
              f"8000 {nan_median(events(res['e2'][key])['relerr']):.3f}")
    table = e3_table(res["e3"])
    print("\nE3 median relerr [successes/16]:\n| eps \\ t0 | " + " | ".join(map(str, E3_T0)) + " |")
    print("|---" * (len(E3_T0) + 1) + "|")
    for eps in E3_EPS:
        print(f"| {eps} | " + " | ".join(f"{table[eps][t0]['median']:.2f} [{table[eps][t0]['successes']}]"
                                         for t0 in E3_T0) + " |")
    drift = res["e3_drift"]
    print("E3 t0 = 0, eps = 1 continued (diagnosis): median relerr [successes/16] at step " + ", ".join(
        f"{t}: {m:.2f} [{n}]" for t, m, n in zip(drift["steps"], drift["median"], drift["successes"])))
    print(f"\nE4: relerr < 0.05 at the ends of the low phases: {e4_counts(res['e4'])}")
    print("\nT4, minima of the 2 x 2 problem (E01, s2/s1, relerr; rank 1: E01, s1, relerr):")
    for key, m in res["theory"]["t4"].items():
        r2, r1 = m["rank2"], m["rank1"]
        two = "none" if r2 is None else f"{r2['E01']:.4f}, {r2['ratio']:.4f}, {r2['relerr']:.3f}"
        one = "none" if r1 is None else f"{r1['E01']:.4f}, {r1['s1']:.4f}, {r1['relerr']:.3f}"
        print(f"  L, eps, ridge = {key}: rank 2: {two} | rank 1: {one}")


if __name__ == "__main__":
    result = main()
    sys.exit(0 if all(c["passed"] for c in result["checks"]) else 1)
