"""Wang & Jacot (2023): SGD with an L2 ridge jumps from high to low rank, and never back.

A 2 x 2 matrix with three entries observed, [[1, ?], [eps, 1]], completed by a deep linear network (width 100, no
biases, torch's nn.Linear init) trained by SGD on one entry per step, drawn i.i.d., with weight decay. Gradient descent
goes to a rank-2 minimum, whose missing entry is far from the rank-1 completion 1/eps. SGD with a large learning rate
jumps, at a random time, to rank 1 (s2/s1 falls from order one to round-off in a few steps); after the jump a
low-noise phase fills in the missing entry. A jump is one way: the rank never comes back. Every experiment trains the
16 seeds of a configuration (init and minibatch stream) as the replicas of one ``DeepLinearNet`` in one Trainer, with
the schedules of this folder's YAML files as ``HyperparameterSchedule``:

- E1, annealing (eps = 0.25, depth 3): the main path (lr 0.2 after a warm-up, ridge 0.1), gradient descent on the
  same inits, and offshoots copied from the main path every 500 steps and run 4000 steps at lr 0.02, ridge 0.001
  (fig1_annealing.png);
- E2, depth (eps = 0.1): depth 3 against depth 4 on one schedule (fig2_depth.png);
- E3, the eps x t0 grid (depth 4): how long a high-noise phase must last to complete a matrix of ratio eps
  (fig3_epsilon.png);
- E4, a periodic schedule (eps = 0.2, depth 3): jumps happen in the high phases only (fig4_periodic.png);
- E5, the sampler: E1 and E2 (depth 4) with epoch shuffling instead of i.i.d. draws (fig5_sampler.png);
- theory: the representation cost, the exact balancedness recursion of an SGD step, the conditions of a critical
  point after gradient descent, the minima of the 2 x 2 problem by rank, and the exact decay of an unfed column.

It writes the PNGs, ``results.json`` and one wandb run per training run (offline) under the output folder, and prints
the acceptance checks (Q1-Q5 for ``--quick``, 1-8 for the full run; ``README.md`` in this folder says what each one
means). Exit status 1 when a check fails.

    python examples/wang_jacot2023/run.py --quick     # depth 4 vs 3 at width 32, 16 seeds (< 1 minute)
    python examples/wang_jacot2023/run.py             # E1-E5 and the theory checks
    python examples/wang_jacot2023/run.py --replot outputs/wang_jacot2023/results.json
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
SUCCESS = 0.1  # a completed matrix: final relerr below this
# the 2 x 2 minima by rank (depth, eps, ridge) computed by multi-start BFGS and set against gradient descent
T4_ROWS = [(3, 0.25, 0.1), (3, 0.25, 0.001), (3, 0.2, 0.1), (3, 0.1, 0.1), (4, 0.1, 0.1), (4, 0.1, 0.001),
           (4, 0.25, 0.1)]
T4_GD = [(3, 0.25, 0.1), (4, 0.1, 0.1)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="depth 4 vs 3 at width 32, eps = 0.1, 16 seeds (< 1 minute)")
    p.add_argument("--out", default=None, help="output folder (default outputs/wang_jacot2023[_quick])")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads per process (default 1)")
    p.add_argument("--workers", type=int, default=None, help="processes for the full run's experiments (default 2)")
    p.add_argument("--no-wandb", action="store_true", help="skip the wandb runs")
    p.add_argument("--replot", metavar="RESULTS_JSON", default=None, help="redraw the figures from a results.json")
    from lightning_flat.sweep import add_sweep_arguments

    add_sweep_arguments(p, "experiments")
    return p.parse_args(argv)


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
                lr=sched["lr"], weight_decay=sched["weight_decay"], sampling=data.get("sampling", "replacement"))


def e3_schedule(t0):
    """t0 high-noise steps (the first min(t0, 500) at lr 0.03, the rest at 0.2; ridge 0.1), then lr 0.02, ridge
    0.001."""
    if t0 == 0:
        return [[0, 0.02]], [[0, 0.001]]
    lr = [[0, 0.03]] + ([[WARMUP, 0.2]] if t0 > WARMUP else []) + [[t0, 0.02]]
    return lr, [[0, 0.1], [t0, 0.001]]


def problem(eps, batch_size=1, sampling="replacement"):
    from lightning_flat.datamodules import ObservedEntriesDataModule

    return ObservedEntriesDataModule(observed=[[1.0, None], [eps, 1.0]], ground_truth=[[1.0, 1.0 / eps], [eps, 1.0]],
                                     batch_size=batch_size, steps_per_epoch=100_000, sampling=sampling)


def network(dims, seeds, dtype=torch.float32):
    from lightning_flat.models import DeepLinearNet

    seed = list(seeds) if len(seeds) > 1 else seeds[0]
    return DeepLinearNet(dims, init="uniform", lr=0.03, weight_decay=0.1, replicas=len(seeds), seed=seed).to(dtype)


def dims_for(depth, width):
    return [2] + [width] * (depth - 1) + [2]


# ------------------------------------------------------------------------------------------------- training
def _callbacks():
    """The example's two step-level pieces: the completion error of every replica (a measuring callback) and the
    weights at chosen steps (through the engine's step interface, so chunks stay fused)."""
    from lightning.pytorch.callbacks import Callback

    from lightning_flat import functional as F
    from lightning_flat.callbacks import MeasuringCallback
    from lightning_flat.engine import StepHook

    class Completion(MeasuringCallback):
        """``completion/relerr``: the squared error on the missing entry relative to zero filling, (1 - eps E01)^2;
        ``completion/train_mse``: the full-batch training loss (1/3) sum (E_ij - b)^2."""

        group = "completion"

        def __init__(self, dm, every_n_steps=EVERY):
            super().__init__(every_n_steps)
            self.dm, self.scale = dm, dm.test_error_scale()

        def measure(self, trainer, pl_module):
            E = pl_module.end_to_end()
            meas, b = self.dm.measurements_as(E.dtype, E.device)
            return {"completion/relerr": self.dm.test_error(E) / self.scale,
                    "completion/train_mse": F.measurement_loss(E, meas, b)}

    class Snapshots(StepHook, Callback):
        def __init__(self, steps):
            self.steps, self.weights = set(steps), {}

        def step_check(self, ctx):  # the last phase before the update: the state after ctx.step updates
            if ctx.step in self.steps:
                self.weights[ctx.step] = [w.detach().clone() for w in ctx.weights]

        def on_train_end(self, trainer, pl_module):
            if trainer.global_step in self.steps:
                self.weights[trainer.global_step] = [w.detach().clone() for w in pl_module.weights()]

    return Completion, Snapshots


def train(model, dm, steps, name, ctx, lr=None, weight_decay=None, extra=(), rank_every=None):
    """Train ``model`` on ``dm`` for ``steps`` steps with the schedule, measuring E every EVERY steps; returns the
    per-replica series as plain lists (steps, s1, ratio, relerr, train_mse[, approx rank, weights_sq, cost])."""
    import lightning as L

    from lightning_flat.callbacks import (ApproximateRank, FiniteLossGuard, HyperparameterSchedule, MatrixNorms,
                                          SingularValues)
    from lightning_flat.loggers import MemoryLogger

    Completion, _ = _callbacks()
    sv, comp = SingularValues(every_n_steps=EVERY), Completion(dm)
    callbacks = [sv, comp, FiniteLossGuard(), *extra]
    if lr is not None or weight_decay is not None:
        callbacks.insert(0, HyperparameterSchedule(lr=lr, weight_decay=weight_decay, every_n_steps=500))
    rank = norms = None
    if rank_every:
        rank, norms = ApproximateRank(every_n_steps=rank_every), MatrixNorms(every_n_steps=rank_every)
        callbacks += [rank, norms]
    loggers = [MemoryLogger()]
    if ctx["wandb"]:
        from lightning_flat.loggers import WandbLogger

        loggers.append(WandbLogger(project="lightning-flat", name=f"wang_jacot2023-{name}", save_dir=ctx["out"],
                                   offline=True, group=os.path.basename(ctx["out"].rstrip("/"))))
    precision = "64-true" if model.dtype == torch.float64 else "32-true"
    trainer = L.Trainer(max_steps=steps, precision=precision, logger=loggers, callbacks=callbacks,
                        log_every_n_steps=100, enable_checkpointing=False, enable_model_summary=False,
                        enable_progress_bar=False, accelerator="cpu", devices=1)
    t0 = time.perf_counter()
    trainer.fit(model, dm)
    seconds = time.perf_counter() - t0
    if ctx["wandb"]:
        loggers[-1].experiment.finish()

    def table(cb, key):
        hist = cb.replica_history[key]  # steps, rows (one list of R values per step), 5 significant digits
        return [h[0] for h in hist], [[_r(x) for x in h[1]] for h in hist]

    steps_, ratio = table(sv, "sv/ratio2")
    out = dict(name=name, steps=steps_, ratio=ratio, s1=table(sv, "sv/s1")[1],
               relerr=table(comp, "completion/relerr")[1], train_mse=table(comp, "completion/train_mse")[1],
               seconds=seconds, active=[True] if model.replicas.active is None else model.replicas.active.tolist())
    if rank is not None:
        out["rank_steps"], out["approx_rank"] = table(rank, "rank/approx")
        out["weights_sq"] = table(norms, "norm/weights_sq")[1]
        out["representation_cost"] = table(norms, "norm/representation_cost")[1]
    print(f"  {name}: {model.replicas.count} runs x {steps} steps in {seconds:.1f} s", flush=True)
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
    return dict(tau=tau, collapsed=collapsed,
                relerr=[run["relerr"][rows[r]][r] for r in range(R)],
                train_mse=[run["train_mse"][rows[r]][r] for r in range(R)],
                ratio=[run["ratio"][rows[r]][r] for r in range(R)])


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
    cfg = yaml_config("e1_schedule.yaml")
    seeds = list(range(SEEDS))
    _, Snapshots = _callbacks()
    dm = problem(cfg["eps"])
    model = network(cfg["dims"], seeds)
    snaps = Snapshots(E1_TK)
    main = train(model, dm, cfg["steps"], "e1-main", ctx, cfg["lr"], cfg["weight_decay"], extra=[snaps],
                 rank_every=100)
    gd = train(network(cfg["dims"], seeds), problem(cfg["eps"], batch_size=None), cfg["steps"], "e1-gd", ctx,
               cfg["lr"], cfg["weight_decay"])
    # offshoots: every (t_k, seed) as one replica of one model, copied from the main path, each with its own stream
    lr, ridge, steps = E1_OFFSHOOT
    pairs = [(tk, r) for tk in E1_TK for r in seeds]
    off_model = network(cfg["dims"], [100_000 + 100 * k + r for k, r in enumerate(r for _, r in pairs)])
    with torch.no_grad():
        for j, W in enumerate(off_model.weights()):
            W.copy_(torch.stack([snaps.weights[tk][j][r] for tk, r in pairs]))
    off = train(off_model, problem(cfg["eps"]), steps, "e1-offshoots", ctx, lr=lr, weight_decay=ridge)
    return dict(main=main, gd=gd, offshoots=off, pairs=pairs, eps=cfg["eps"], depth=len(cfg["dims"]) - 1)


def e2(depth, ctx, sampling="replacement", name=None):
    cfg = yaml_config("e2_schedule.yaml")
    dims = dims_for(depth, WIDTH)
    model = network(dims, list(range(SEEDS)))
    return train(model, problem(cfg["eps"], sampling=sampling), cfg["steps"], name or f"e2-L{depth}", ctx, cfg["lr"],
                 cfg["weight_decay"], rank_every=100 if sampling == "replacement" else None)


def e3(eps, ctx):
    """All t0 of one eps as replicas (per-replica schedules), each read at its own end t0 + 4000."""
    specs = [e3_schedule(t0) for t0 in E3_T0 for _ in range(SEEDS)]
    seeds = [1000 * i + s for i in range(len(E3_T0)) for s in range(SEEDS)]
    model = network(dims_for(4, WIDTH), seeds)
    run = train(model, problem(eps), max(E3_T0) + E3_LOW, f"e3-eps{eps}", ctx,
                lr={"replicas": [s[0] for s in specs]}, weight_decay={"replicas": [s[1] for s in specs]})
    ends = [t0 + E3_LOW for t0 in E3_T0 for _ in range(SEEDS)]
    ev = events(run, horizon=ends)
    return dict(eps=eps, t0=[t0 for t0 in E3_T0 for _ in range(SEEDS)], relerr=ev["relerr"], tau=ev["tau"],
                collapsed=ev["collapsed"], seconds=run["seconds"])


def e4(ctx):
    cfg = yaml_config("e4_schedule.yaml")
    model = network(cfg["dims"], list(range(SEEDS)))
    return train(model, problem(cfg["eps"]), cfg["steps"], "e4", ctx, cfg["lr"], cfg["weight_decay"], rank_every=100)


def e5(which, ctx):
    if which == "e1":
        cfg = yaml_config("e1_schedule.yaml")
        model = network(cfg["dims"], list(range(SEEDS)))
        return train(model, problem(cfg["eps"], sampling="shuffle"), cfg["steps"], "e5-e1-shuffle", ctx, cfg["lr"],
                     cfg["weight_decay"])
    return e2(4, ctx, sampling="shuffle", name="e5-e2L4-shuffle")


def quick_runs(ctx):
    cfg = yaml_config("quick.yaml")
    seeds = list(range(SEEDS))
    width = cfg["dims"][1]
    out = {}
    for depth in (4, 3):
        out[f"L{depth}"] = train(network(dims_for(depth, width), seeds), problem(cfg["eps"]), cfg["steps"],
                                 f"quick-L{depth}", ctx, cfg["lr"], cfg["weight_decay"])
    out["gd"] = train(network(dims_for(4, width), seeds), problem(cfg["eps"], batch_size=None), 3000, "quick-L4-gd",
                      ctx, cfg["lr"], cfg["weight_decay"])
    out["shuffle"] = train(network(dims_for(4, width), seeds), problem(cfg["eps"], sampling="shuffle"), cfg["steps"],
                           "quick-L4-shuffle", ctx, cfg["lr"], cfg["weight_decay"])
    return out


# ------------------------------------------------------------------------------------------------- theory
def theory(ctx, full):
    """T1, T2 and T5 on small random instances (and, for the full run, T3 and T4 after gradient descent to
    convergence); each check is (name, value, passed)."""
    import lightning as L

    from lightning_flat import functional as F
    from lightning_flat.datamodules import MeasurementDataModule, MeasurementSampler
    from lightning_flat.measurements import Entries

    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    f64 = torch.float64
    eps64 = torch.finfo(f64).eps
    checks, record = [], {}
    g = torch.Generator().manual_seed(0)

    def fit(model, dm, steps, lr, ridge):
        """``steps`` more library SGD steps (a new Trainer: its steps count from 0)."""
        model.lr, model.weight_decay = lr, ridge
        trainer = L.Trainer(max_steps=steps, precision="64-true", logger=False, enable_checkpointing=False,
                            enable_model_summary=False, enable_progress_bar=False, accelerator="cpu", devices=1)
        trainer.fit(model, dm)

    # T1: sum |W_j|^2 >= L sum s_i^(2/L), with equality at the balanced factors
    worst_gap, worst_eq = float("inf"), 0.0
    for depth in (3, 4, 5):
        dims = [4] + [5] * (depth - 1) + [3]
        for _ in range(20):
            Ws = [torch.randn(dims[j + 1], dims[j], generator=g, dtype=f64) for j in range(depth)]
            E = F.end_to_end(Ws)
            cost = F.representation_cost(E, depth)
            worst_gap = min(worst_gap, float(sum(W.square().sum() for W in Ws) - cost) / float(cost))
            bal = F.balanced_factors(E, dims)
            worst_eq = max(worst_eq, abs(float(sum(W.square().sum() for W in bal)) / float(cost) - 1))
    checks.append(("T1 sum|W|^2 >= L sum s^(2/L) on 60 random factorisations (min relative gap)", worst_gap,
                   worst_gap >= 0))
    # equality: a few flops of rounding per entry, relative 1e-10 leaves a wide margin
    checks.append(("T1 equality at the balanced factors (max relative error)", worst_eq, worst_eq <= 1e-10))

    # T2: one library SGD step with weight decay,
    # D_l(t+1) = (1 - lr ridge)^2 D_l(t) + lr^2 (T_{l+1}^T T_{l+1} - T_l T_l^T)
    worst = 0.0
    for depth, batch in ((3, 1), (4, 2), (3, None)):
        meas = Entries(torch.tensor([0, 1, 1]), torch.tensor([0, 0, 1]), (2, 2), dtype=f64)
        b = torch.tensor([1.0, 0.25, 1.0], dtype=f64)
        dm = MeasurementDataModule.from_problem(meas, b, batch_size=batch, seed=3)
        model = network(dims_for(depth, 6), [7], f64)
        lr, ridge = 0.2, 0.1
        fit(model, dm, 5, lr, ridge)  # a few steps first: the state is not the init
        W0 = [w.detach().clone() for w in model.weights()]
        sampler = MeasurementSampler(meas, b, batch, dm.seed, 100_000, streams=model.replicas.seeds)
        batch_ = sampler.batch(0)  # the batch the engine draws at the next Trainer's first step
        Ws = [w.clone().requires_grad_(True) for w in W0]
        loss = F.measurement_loss(F.end_to_end(Ws), batch_.measurements, batch_.targets)
        T = torch.autograd.grad(loss, Ws)  # by autograd, independent of the engine's analytic gradients
        fit(model, dm, 1, lr, ridge)  # one more library step
        W1 = [w.detach() for w in model.weights()]
        for l in range(depth - 1):
            D = lambda W: W[l + 1].T @ W[l + 1] - W[l] @ W[l].T  # noqa: E731
            want = (1 - lr * ridge) ** 2 * D(W0) + lr ** 2 * (T[l + 1].T @ T[l + 1] - T[l] @ T[l].T)
            worst = max(worst, float((D(W1) - want).abs().max() / D(W0).abs().max()))
    # float64: O(10) roundings of O(|W|^2) terms, relative 1e-12 is 100x above them
    checks.append(("T2 balancedness recursion of an SGD step, 3 configurations (max relative error)", worst,
                   worst <= 1e-12))

    # T5: only column 0 sampled for T steps -> W_1[:, 1] scales by (1 - lr ridge)^T exactly; row-1 entries only ->
    # W_L[0, :] does; theta = 0 is a fixed point
    T, lr, ridge = 300, 0.2, 0.1
    cases = {"column 0 only": (torch.tensor([0, 1]), torch.tensor([0, 0]), lambda W: W[0][:, 1]),
             "row 1 only": (torch.tensor([1, 1]), torch.tensor([0, 1]), lambda W: W[-1][0, :])}
    worst, bound_ok = 0.0, True
    for label, (rows, cols, part) in cases.items():
        dm = MeasurementDataModule.from_problem(Entries(rows, cols, (2, 2), dtype=f64),
                                                torch.tensor([1.0, 0.25], dtype=f64), batch_size=1, seed=1)
        model = network(dims_for(3, 6), [11], f64)
        before = [w.detach().clone() for w in model.weights()]
        fit(model, dm, T, lr, ridge)
        after = [w.detach() for w in model.weights()]
        want = (1 - lr * ridge) ** T * part(before)
        worst = max(worst, float((part(after) - want).abs().max() / want.abs().max()))
        if label == "column 0 only":
            E = F.end_to_end(after)
            bound = (1 - lr * ridge) ** T * float(part(before).norm()) * math.prod(
                float(torch.linalg.matrix_norm(W, 2)) for W in after[1:])
            bound_ok = float(torch.linalg.svdvals(E)[1]) <= bound * (1 + 1e-12)
            record["t5_s2"], record["t5_bound"] = float(torch.linalg.svdvals(E)[1]), bound
    # each step rounds the decayed entries once: T steps, relative error <= 2 T eps
    checks.append((f"T5 an unfed column / row decays as (1 - lr ridge)^T, T = {T} (max relative error)", worst,
                   worst <= 2 * T * eps64))
    checks.append(("T5 s2(E) <= (1 - lr ridge)^T |W_1[:, 1](0)| prod_l>=2 |W_l|_2 (s2)", record["t5_s2"], bound_ok))
    meas = Entries(torch.tensor([0, 1, 1]), torch.tensor([0, 0, 1]), (2, 2), dtype=f64)
    dm = MeasurementDataModule.from_problem(meas, torch.tensor([1.0, 0.25, 1.0], dtype=f64), batch_size=1)
    model = network(dims_for(3, 6), [0], f64)
    with torch.no_grad():
        for W in model.weights():
            W.zero_()
    fit(model, dm, 50, 0.4, 0.1)
    zero = max(float(w.detach().abs().max()) for w in model.weights())
    checks.append(("T5 theta = 0 stays 0 under SGD (max |W|)", zero, zero == 0.0))
    if not full:
        return checks, record

    # T4: the minima of the 2 x 2 problem by rank (BFGS), and gradient descent's end point against the rank-2 one
    minima = {}
    for depth, eps, ridge in T4_ROWS:
        meas = Entries(torch.tensor([0, 1, 1]), torch.tensor([0, 0, 1]), (2, 2), dtype=f64)
        b = torch.tensor([1.0, eps, 1.0], dtype=f64)
        starts = [torch.tensor([[1.0, x], [eps, 1.0]], dtype=f64) for x in (0.1, 0.3, 0.5, 0.8, 1.0)]
        r2 = F.ridge_local_minimum(meas, b, ridge, depth, 2, starts=starts)
        r1 = F.ridge_local_minimum(meas, b, ridge, depth, 1, starts=[torch.tensor([[1.0, 1 / eps], [eps, 1.0]],
                                                                                  dtype=f64)])
        minima[f"{depth},{eps},{ridge}"] = dict(rank2=None if r2 is None else _describe(r2[0], eps) | {"J": r2[1]},
                                                 rank1=None if r1 is None else _describe(r1[0], eps) | {"J": r1[1]})
    record["t4"] = minima
    # T3 + T4: gradient descent (float64, width 100) through the E1 schedule then 20000 steps at lr 0.2, ridge 0.1
    record["gd"] = {}
    for depth, eps, ridge in T4_GD:
        meas = Entries(torch.tensor([0, 1, 1]), torch.tensor([0, 0, 1]), (2, 2), dtype=f64)
        b = torch.tensor([1.0, eps, 1.0], dtype=f64)
        dm = MeasurementDataModule.from_problem(meas, b, batch_size=None)
        model = network(dims_for(depth, WIDTH), [0], f64)
        fit(model, dm, WARMUP, 0.03, ridge)
        fit(model, dm, 20_000, 0.2, ridge)
        Ws = [w.detach() for w in model.weights()]
        res = F.ridge_critical_residuals(Ws, meas, b, ridge)
        E = F.end_to_end(Ws)
        got = _describe(E, eps)
        ref = minima[f"{depth},{eps},{ridge}"]["rank2"]
        dev = max(abs(got[k] - ref[k]) for k in ("E01", "ratio", "relerr"))
        record["gd"][f"{depth},{eps},{ridge}"] = dict(got, residuals=res, deviation=dev)
        checks.append((f"T4 GD end point = the rank-2 minimum (L={depth}, eps={eps}, ridge={ridge}): max |diff| of "
                       f"E01, s2/s1, relerr", dev, dev <= 2e-3))
        if (depth, eps) == (3, 0.25):
            worst = max(res["balance"], res["layer_singular_values"], abs(res["cost_gap"]), res["stationarity"])
            # converged in float64: the conditions hold to round-off of O(1) quantities after 20000 contracting steps
            checks.append(("T3 critical point after GD (L=3, eps=0.25): max of balance, layer singular values, "
                           "cost gap, stationarity residuals", worst, worst <= 1e-9 and res["rank"] == 2))
    return checks, record


def _describe(E, eps):
    s = torch.linalg.svdvals(E)
    return dict(E01=float(E[0, 1]), ratio=float(s[1] / s[0]), s1=float(s[0]), s2=float(s[1]),
                relerr=float((1 - eps * E[0, 1]) ** 2))


# ------------------------------------------------------------------------------------------------- checks
def checks_quick(q):
    out = []
    L4, L3 = events(q["L4"], horizon=3000), events(q["L3"], horizon=3000)
    n4 = sum(not math.isnan(t) for t in L4["tau"])
    n3 = sum(not math.isnan(t) for t in L3["tau"])
    out.append(("Q2 depth 4: runs that jump by step 3000 (>= 5/16)", n4, n4 >= 5))
    out.append(("Q2 depth 3: runs that jump by step 3000 (<= 1/16)", n3, n3 <= 1))
    gd = events(q["gd"])
    lo, hi = min(gd["ratio"]), max(gd["ratio"])
    ok = all(0.345 <= r <= 0.362 for r in gd["ratio"])
    out.append((f"Q3 gradient descent, depth 4, step 3000: every s2/s1 in [0.345, 0.362] (range {lo:.4f}-{hi:.4f})",
                hi, ok))
    # Q4: one way, and what the low phase makes of each run
    worst = 0.0
    for run in (q["L4"], q["L3"]):
        ev = events(run, after=WARMUP)
        for r, tau in enumerate(ev["tau"]):
            if not math.isnan(tau):
                worst = max(worst, max_ratio_after(run, tau, r))
    out.append(("Q4 after a jump s2/s1 stays < 1e-2 through step 4000 (max after tau)", worst, worst < 1e-2))
    final = events(q["L4"])
    bad_jumped, bad_stayed, middle = [], [], 0
    for r in range(SEEDS):
        jumped = not math.isnan(L4["tau"][r])
        low = min(row[r] for t, row in zip(q["L4"]["steps"], q["L4"]["ratio"]) if 2900 <= t <= 3000)
        if jumped:
            bad_jumped += [final["relerr"][r]] if not final["relerr"][r] < 0.3 else []
        elif low > 0.1:
            bad_stayed += [final["relerr"][r]] if not final["relerr"][r] > 0.6 else []
        else:
            middle += 1
    out.append(("Q4 depth 4 at step 4000: runs that jumped have relerr < 0.3 (failures)", len(bad_jumped),
                not bad_jumped))
    out.append(("Q4 depth 4 at step 4000: runs with min s2/s1 > 0.1 over 2900-3000 have relerr > 0.6 (failures)",
                len(bad_stayed), not bad_stayed))
    out.append(("Q4 depth 4: runs caught mid-jump at the switch (<= 2/16)", middle, middle <= 2))
    sh = events(q["shuffle"])
    ns = sum(not math.isnan(t) for t in sh["tau"])
    out.append(("Q5 shuffled sampling, depth 4: runs that jump (<= 1/16)", ns, ns <= 1))
    return out


def _high_phase(step):
    """E4: is ``step`` in a high phase (lr 0.4) of the periodic schedule?"""
    return step >= WARMUP and (step - WARMUP) % 2000 < 1000


def checks_full(res):
    out = []
    e1r = res["e1"]
    main, gd = e1r["main"], e1r["gd"]
    ev = events(main)
    jumped = [r for r, t in enumerate(ev["tau"]) if not math.isnan(t)]
    out.append(("2 E1: runs that jump by step 6000 (>= 6/16)", len(jumped), len(jumped) >= 6))
    g = events(gd)
    n_gd = sum(0.20 <= r <= 0.215 for r in g["ratio"])
    out.append(("2 E1: gradient descent ends with s2/s1 in [0.20, 0.215] (>= 15/16)", n_gd, n_gd >= 15))
    # 3: one way, everywhere
    worst = 0.0
    runs = [main, res["e2"]["L3"], res["e2"]["L4"], res["e4"]]
    for run in runs:
        for r, tau in enumerate(events(run)["tau"]):
            if not math.isnan(tau):
                worst = max(worst, max_ratio_after(run, tau, r))
    # offshoots started after their seed's jump never come back either
    for k, (tk, r) in enumerate(e1r["pairs"]):
        tau = ev["tau"][r]
        if not math.isnan(tau) and tk >= tau:
            worst = max(worst, e1r["offshoot_final"]["max_ratio"][k])
    out.append(("3 one way: after tau, s2/s1 <= 1e-2 in E1, E2, E4 and the offshoots after tau (max)", worst,
                worst <= 1e-2))
    # 4: offshoots
    oev = e1r["offshoot_final"]
    late_bad, early_bad, n_late, n_early = [], [], 0, 0
    for k, (tk, r) in enumerate(e1r["pairs"]):
        tau = ev["tau"][r]
        if math.isnan(tau):
            continue
        if tk >= tau + 200:
            n_late += 1
            if not oev["relerr"][k] < 0.05:
                late_bad.append(oev["relerr"][k])
        elif tk <= tau - 200:
            n_early += 1
            if not (oev["relerr"][k] > 0.3 and oev["train_mse"][k] < 1e-3):
                early_bad.append(oev["relerr"][k])
    out.append((f"4 E1 offshoots from t_k >= tau + 200 end with relerr < 0.05 (failures of {n_late})", len(late_bad),
                not late_bad))
    out.append((f"4 E1 offshoots from t_k <= tau - 200 end with relerr > 0.3, train MSE < 1e-3 (failures of "
                f"{n_early})", len(early_bad), not early_bad))
    # 5: depth
    e4_, e3_ = events(res["e2"]["L4"], horizon=5000), events(res["e2"]["L3"], horizon=5000)
    n4 = sum(not math.isnan(t) for t in e4_["tau"])
    n3 = sum(not math.isnan(t) for t in e3_["tau"])
    out.append(("5 E2 depth 4: runs that jump before step 5000 (>= 10/16)", n4, n4 >= 10))
    out.append(("5 E2 depth 3: runs that jump before step 5000 (<= 2/16)", n3, n3 <= 2))
    m4, m3 = _median(events(res["e2"]["L4"])["relerr"]), _median(events(res["e2"]["L3"])["relerr"])
    out.append(("5 E2 at step 8000: median relerr, depth 4 (< 0.15)", m4, m4 < 0.15))
    out.append(("5 E2 at step 8000: median relerr, depth 3 (> 0.8)", m3, m3 > 0.8))
    # 6: the eps x t0 grid
    table = e3_table(res["e3"])
    worst0 = min(table[eps][0]["median"] for eps in E3_EPS)
    out.append(("6 E3 t0 = 0: median relerr > 0.5 at every eps (min)", worst0, worst0 > 0.5))
    smallest = [e3_smallest(table, t0) for t0 in E3_T0]
    mono = all(_le(b, a) for a, b in zip(smallest, smallest[1:]))
    out.append(("6 E3 smallest eps with >= 3/4 successes is non-increasing in t0 (" +
                ", ".join(f"t0={t0}: {s}" for t0, s in zip(E3_T0, smallest)) + ")", float(mono), mono))
    s4000 = smallest[-1]
    out.append(("6 E3 t0 = 4000: smallest eps with >= 3/4 successes (<= 0.15)", s4000 if s4000 else float("nan"),
                s4000 is not None and s4000 <= 0.15))
    # 7: periodic
    e4ev = events(res["e4"])
    taus = [t for t in e4ev["tau"] if not math.isnan(t)]
    outside = [t for t in taus if not _high_phase(int(t))]
    out.append((f"7 E4 every jump falls in a high phase ({len(taus)} jumps; outside)", len(outside), not outside))
    counts = e4_counts(res["e4"])
    mono = all(b >= a for a, b in zip(counts, counts[1:]))
    out.append((f"7 E4 runs with relerr < 0.05 at the ends of the low phases never decrease ({counts})", float(mono),
                mono))
    out.append(("7 E4 runs with relerr < 0.05 at the end (>= 10/16)", counts[-1], counts[-1] >= 10))
    # 8: sampler
    for key, label in (("e1", "E1"), ("e2", "E2 depth 4")):
        n = sum(not math.isnan(t) for t in events(res["e5"][key])["tau"])
        out.append((f"8 E5 shuffled sampling, {label}: runs that jump (<= 1/16)", n, n <= 1))
    return out


def _le(b, a):
    """b <= a for 'smallest successful eps' values, where None (no eps succeeds) is the largest."""
    if b is None:
        return a is None
    return a is None or b <= a


def e3_table(cells):
    table = {}
    for cell in cells:
        eps = cell["eps"]
        table[eps] = {}
        for t0 in E3_T0:
            vals = [v for v, t in zip(cell["relerr"], cell["t0"]) if t == t0]
            col = [c for c, t in zip(cell["collapsed"], cell["t0"]) if t == t0]
            ok = sum(v < SUCCESS and not c for v, c in zip(vals, col))
            table[eps][t0] = dict(median=_median(vals), successes=ok, runs=len(vals), values=vals)
    return table


def e3_smallest(table, t0):
    good = [eps for eps in E3_EPS if table[eps][t0]["successes"] >= 0.75 * table[eps][t0]["runs"]]
    return min(good) if good else None


def e4_counts(run):
    """Runs with relerr < 0.05 at the end of each low phase (steps 2500, 4500, 6500, 8500)."""
    ends = [WARMUP + 2000 * (k + 1) for k in range(4)]
    counts = []
    for t in ends:
        row = run["relerr"][run["steps"].index(t)]
        counts.append(sum(v < 0.05 for v in row))
    return counts


def _median(xs):
    xs = sorted(x for x in xs if not math.isnan(x))
    if not xs:
        return float("nan")
    m = len(xs) // 2
    return xs[m] if len(xs) % 2 else 0.5 * (xs[m - 1] + xs[m])


# ------------------------------------------------------------------------------------------------- figures
def figures(res, out):
    from lightning_flat import plotting as P

    paths = []
    if "quick" in res:
        paths.append(fig_quick(res["quick"], out, P))
    if "e1" in res:
        paths.append(fig_e1(res["e1"], out, P))
        paths.append(fig_e2(res["e2"], out, P))
        paths.append(fig_e3(res["e3"], out, P))
        paths.append(fig_e4(res["e4"], out, P))
        paths.append(fig_e5(res, out, P))
    return paths


def _curves(ax, run, key, replicas, color, label, P, logy=False, **kw):
    for i, r in enumerate(replicas):
        P.series(ax, run["steps"], [row[r] for row in run[key]], label=label if i == 0 else None, logy=logy,
                 color=color, **kw)


def fig_quick(q, out, P):
    fig, axes = P.figure(1, 3, size=(4.6, 3.4), title="Rank jumps, --quick: eps = 0.1, width 32, 16 seeds")
    ax = axes[0][0]
    _curves(ax, q["L4"], "ratio", range(SEEDS), "tab:blue", "SGD, depth 4", P, logy=True, alpha=0.6)
    _curves(ax, q["L3"], "ratio", range(SEEDS), "tab:orange", "SGD, depth 3", P, logy=True, alpha=0.6)
    ax.set_ylabel("s2/s1 of E")
    ax.axhline(THRESHOLD, color="k", ls=":", lw=1, label="jump threshold 1e-3")
    ax.set_title("SGD")
    ax = axes[0][1]
    _curves(ax, q["gd"], "ratio", range(SEEDS), "tab:green", "GD, depth 4", P, logy=True, alpha=0.6)
    _curves(ax, q["shuffle"], "ratio", range(SEEDS), "tab:purple", "SGD, shuffled, depth 4", P, logy=True, alpha=0.6)
    P.reference(ax, 0.3535, "rank-2 minimum s2/s1")
    ax.axhline(THRESHOLD, color="k", ls=":", lw=1)
    ax.set_ylabel("s2/s1 of E")
    ax.set_title("gradient descent and shuffled sampling")
    ax = axes[0][2]
    _curves(ax, q["L4"], "relerr", range(SEEDS), "tab:blue", "depth 4", P, alpha=0.6)
    _curves(ax, q["L3"], "relerr", range(SEEDS), "tab:orange", "depth 3", P, alpha=0.6)
    ax.set_ylabel("relerr (missing entry, vs zero filling)")
    ax.set_title("completion error")
    for a in axes[0]:
        a.axvspan(500, 3000, color="0.9", zorder=0, label="lr 0.25, ridge 0.1 (then lr 0.05, ridge 0.001)")
        a.legend(fontsize=7, loc="lower left")
    return P.save(fig, os.path.join(out, "fig_quick.png"))


def fig_e1(r, out, P):
    main, off, gd = r["main"], r["offshoots"], r["gd"]
    taus, shown = e1_shown(r)
    tau = taus.get(shown, float("nan"))
    fig, axes = P.figure(2, 3, size=(4.6, 3.4),
                         title=f"E1, annealing: eps = {r['eps']}, depth {r['depth']}; seed {shown} (tau = {tau:.0f}) "
                               f"and its offshoots")
    cmap = __import__("matplotlib").colormaps["coolwarm"]
    for panel, key, logy, ylabel in ((axes[0][0], "relerr", False, "relerr (missing entry, vs zero filling)"),
                                     (axes[0][1], "train_mse", True, "train MSE")):
        P.series(panel, main["steps"], [row[shown] for row in main[key]], label="main path (lr 0.2, ridge 0.1)",
                 logy=logy, color="k")
        for i, k in enumerate(off["kept"]):  # the offshoots of the seed shown (results.json keeps only theirs)
            tk = r["pairs"][k][0]
            after = not math.isnan(tau) and tk >= tau
            P.series(panel, [tk + s for s in off["steps"]], [row[i] for row in off[key]], logy=logy,
                     color=cmap(0.05 if after else 0.95), alpha=0.8, lw=0.9,
                     label=None if tk else "offshoots (lr 0.02, ridge 0.001): red before tau, blue after")
        if not math.isnan(tau):
            panel.axvline(tau, color="tab:green", ls="--", lw=1, label="jump time tau")
        panel.set_ylabel(ylabel)
        panel.legend(fontsize=7, loc="upper right" if key == "relerr" else "lower left")
    axes[0][1].set_ylim(bottom=1e-12)
    ax = axes[0][2]
    for k in range(SEEDS):
        P.series(ax, main["steps"], [row[k] for row in main["ratio"]], logy=True, color="0.6", lw=0.6)
    P.series(ax, main["steps"], [row[shown] for row in main["ratio"]], logy=True, color="k", label=f"SGD seed {shown}")
    _curves(ax, gd, "ratio", range(SEEDS), "tab:blue", "gradient descent, 16 seeds", P, logy=True, lw=0.8)
    P.reference(ax, 0.2074, "rank-2 minimum", ls="-.")
    ax.axhline(THRESHOLD, color="k", ls=":", lw=1, label="threshold 1e-3")
    ax.set_ylabel("s2/s1 of E (gray: the other SGD seeds)")
    ax.legend(fontsize=7, loc="lower left")
    ax = axes[1][0]
    for k in range(SEEDS):
        P.series(ax, main["rank_steps"], [row[k] for row in main["approx_rank"]], color="0.6", lw=0.6)
    P.series(ax, main["rank_steps"], [row[shown] for row in main["approx_rank"]], color="k", label=f"seed {shown}")
    ax.set_yscale("log")
    ax.set_ylabel("approximate rank of the factors (alpha = 1e-3)")
    ax.axhline(2, color="tab:red", ls="--", lw=1, label="2")
    ax.axhline(1, color="tab:blue", ls="--", lw=1, label="1")
    ax.legend(fontsize=7)
    ax = axes[1][1]
    P.series(ax, main["rank_steps"], [row[shown] for row in main["weights_sq"]], label="sum_l |W_l|_F^2", color="k")
    P.series(ax, main["rank_steps"], [row[shown] for row in main["representation_cost"]],
             label="L sum_i s_i(E)^(2/L) (its minimum over factorisations)", color="tab:red", ls="--")
    ax.set_yscale("log")
    ax.set_ylabel(f"parameter norm, seed {shown}")
    ax.legend(fontsize=7)
    ax = axes[1][2]
    xs, ys, cs = [], [], []
    for k, (tk, rr) in enumerate(r["pairs"]):
        if rr in taus:
            xs.append(tk - taus[rr])
            ys.append(r["offshoot_final"]["relerr"][k])
            cs.append(cmap(0.05 if tk >= taus[rr] else 0.95))
    ax.scatter(xs, ys, c=cs, s=12)
    ax.axvline(0, color="tab:green", ls="--", lw=1, label="t_k = tau")
    ax.axhline(0.05, color="k", ls=":", lw=1, label="0.05")
    ax.axhline(0.3, color="k", ls="-.", lw=1, label="0.3")
    ax.set_yscale("log")
    ax.set_xlabel("offshoot start t_k - tau (runs that jumped)")
    ax.set_ylabel("offshoot final relerr")
    ax.legend(fontsize=7)
    return P.save(fig, os.path.join(out, "fig1_annealing.png"))


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


def fig_e2(r, out, P):
    fig, axes = P.figure(2, 2, size=(4.8, 3.2), title="E2, depth: eps = 0.1, width 100 (5 of 16 seeds; schedule "
                                                        "switches dotted)")
    for col, key in enumerate(("L3", "L4")):
        run = r[key]
        for row, (what, logy, label) in enumerate((("relerr", False, "relerr"), ("ratio", True, "s2/s1 of E"))):
            ax = axes[row][col]
            for k in range(5):
                P.series(ax, run["steps"], [x[k] for x in run[what]], logy=logy, label=f"seed {k}")
            for t in (500, 5000):
                ax.axvline(t, color="k", ls=":", lw=0.8)
            ax.set_ylabel(label)
            ax.set_title(f"depth {key[1]}")
            if what == "ratio":
                ax.axhline(THRESHOLD, color="k", ls="--", lw=0.8)
                ax.set_ylim(1e-8, 2)
            else:
                ax.set_ylim(-0.05, 1.3)
    axes[0][0].legend(fontsize=7, loc="lower left")
    return P.save(fig, os.path.join(out, "fig2_depth.png"))


def fig_e3(cells, out, P):
    table = e3_table(cells)
    fig, axes = P.figure(1, 1, size=(6.0, 4.2), title="E3: final relerr vs eps, depth 4 (dots: 16 seeds; lines: "
                                                        "median)")
    ax = axes[0][0]
    colors = __import__("matplotlib").colormaps["viridis"]
    for i, t0 in enumerate(E3_T0):
        c = colors(i / (len(E3_T0) - 1))
        xs = [eps * (1 + 0.04 * (i - 2)) for eps in E3_EPS]  # a small offset per t0, so the dots do not overlap
        for x, eps in zip(xs, E3_EPS):
            ax.scatter([x] * len(table[eps][t0]["values"]), table[eps][t0]["values"], color=c, s=6, alpha=0.5)
        ax.plot(xs, [table[eps][t0]["median"] for eps in E3_EPS], color=c, marker="o", label=f"t0 = {t0}")
    ax.axhline(SUCCESS, color="k", ls=":", lw=1, label=f"success: relerr < {SUCCESS}")
    ax.set_xscale("log")
    ax.set_xlabel("eps (observed entry; the missing one is 1/eps)")
    ax.set_ylabel("relerr after t0 + 4000 steps")
    ax.legend(fontsize=7)
    return P.save(fig, os.path.join(out, "fig3_epsilon.png"))


def fig_e4(run, out, P):
    fig, axes = P.figure(2, 1, size=(8.0, 2.8), title="E4, periodic schedule: eps = 0.2, depth 3 (5 of 16 seeds; "
                                                        "shaded: high phases, lr 0.4, ridge 0.1)")
    for row, (what, logy, label) in enumerate((("relerr", False, "relerr"), ("ratio", True, "s2/s1 of E"))):
        ax = axes[row][0]
        for k in range(5):
            P.series(ax, run["steps"], [x[k] for x in run[what]], logy=logy, label=f"seed {k}")
        for c in range(4):
            ax.axvspan(WARMUP + 2000 * c, WARMUP + 2000 * c + 1000, color="tab:red", alpha=0.08, lw=0)
        ax.set_ylabel(label)
        if what == "ratio":
            ax.axhline(THRESHOLD, color="k", ls="--", lw=0.8)
            ax.set_ylim(1e-8, 2)
    axes[0][0].legend(fontsize=7, loc="upper right", ncol=5)
    return P.save(fig, os.path.join(out, "fig4_periodic.png"))


def fig_e5(res, out, P):
    fig, axes = P.figure(1, 2, size=(4.6, 3.4), title="E5, the sampler: i.i.d. draws vs epoch shuffling")
    ax = axes[0][0]
    labels, iid, shuf = [], [], []
    for label, a, b in (("E1 (depth 3, eps 0.25)", res["e1"]["main"], res["e5"]["e1"]),
                        ("E2 (depth 4, eps 0.1)", res["e2"]["L4"], res["e5"]["e2"])):
        labels.append(label)
        iid.append(sum(not math.isnan(t) for t in events(a)["tau"]))
        shuf.append(sum(not math.isnan(t) for t in events(b)["tau"]))
    x = range(len(labels))
    for bars in (ax.bar([i - 0.2 for i in x], iid, width=0.4, label="i.i.d. (with replacement)"),
                 ax.bar([i + 0.2 for i in x], shuf, width=0.4, label="shuffled (without)")):
        ax.bar_label(bars)  # the counts, zeros included
    ax.set_xticks(list(x), labels, fontsize=8)
    ax.set_ylabel(f"runs that jump (of {SEEDS})")
    ax.legend(fontsize=7)
    ax = axes[0][1]
    _curves(ax, res["e5"]["e2"], "ratio", range(SEEDS), "tab:purple", "shuffled, E2 depth 4", P, logy=True, lw=0.7)
    ax.axhline(THRESHOLD, color="k", ls=":", lw=1, label="threshold 1e-3")
    ax.set_ylabel("s2/s1 of E")
    ax.set_ylim(1e-8, 2)
    ax.legend(fontsize=7, loc="lower left")
    return P.save(fig, os.path.join(out, "fig5_sampler.png"))


# ------------------------------------------------------------------------------------------------- driver
def _setup_worker(threads):
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    for pattern in (".*does not have many workers.*", ".*diverged at step.*"):
        warnings.filterwarnings("ignore", pattern)
    import logging

    for name in ("lightning.pytorch", "lightning.pytorch.utilities.rank_zero", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    from lightning_flat.threads import use_threads

    use_threads(threads)


def trial(config):
    """One experiment as a sweep trial (``lightning_flat.sweep``): JSON in, JSON out."""
    from lightning_flat.sweep import trial_folder  # its wandb runs come back to OUT from any Ray node

    return run_job(tuple(config["job"]), {**config["ctx"], "out": trial_folder(config["ctx"]["out"])})


def run_job(job, ctx):
    """One experiment (run in a worker process for the full run)."""
    _setup_worker(ctx["threads"])
    kind = job[0]
    if kind == "e1":
        return e1(ctx)
    if kind == "e2":
        return e2(job[1], ctx)
    if kind == "e3":
        return e3(job[1], ctx)
    if kind == "e4":
        return e4(ctx)
    if kind == "e5":
        return e5(job[1], ctx)
    if kind == "theory":
        return theory(ctx, full=job[1])
    if kind == "quick":
        return quick_runs(ctx)
    raise ValueError(job)


def assemble(jobs, results):
    res = dict(e2={}, e3=[], e5={})
    for job, r in zip(jobs, results):
        if job[0] == "e2":
            res["e2"][f"L{job[1]}"] = r
        elif job[0] == "e3":
            res["e3"].append(r)
        elif job[0] == "e5":
            res["e5"][job[1]] = r
        else:
            res[job[0]] = r
    res["e3"].sort(key=lambda c: -c["eps"])
    return res


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.replot:
        with open(args.replot) as f:
            res = json.load(f)
        paths = figures(res, args.out or os.path.dirname(os.path.abspath(args.replot)))
        print(f"wrote {', '.join(paths)}")
        return dict(figures=paths, checks=[])
    _setup_worker(args.threads)
    t_start = time.perf_counter()
    out = args.out or os.path.join("outputs", "wang_jacot2023_quick" if args.quick else "wang_jacot2023")
    from lightning_flat.io import output_folder

    output_folder(out)  # fails now, naming it, if nothing can be written there
    ctx = dict(out=out, wandb=not args.no_wandb, threads=args.threads)
    if args.quick:
        jobs = [("theory", False), ("quick",)]
    else:  # the longest first
        jobs = [("e3", eps) for eps in E3_EPS] + [("e1",), ("e2", 4), ("e5", "e2"), ("e2", 3), ("e4",), ("e5", "e1"),
                                                  ("theory", True)]
    workers = args.workers or (1 if args.quick else 2)
    from lightning_flat.sweep import run_sweep

    sweep_dir = os.path.join(out, "sweep")
    rows = run_sweep(trial, [{"job": list(job), "ctx": ctx} for job in jobs], sweep_dir, engine=args.engine,
                     workers=workers, address=args.address, resume=args.resume,
                     progress=lambda row: print(f"  done: {row['config']['job']} in {row['seconds']:.0f} s",
                                                flush=True))
    results = [row["result"] for row in rows]
    res = assemble(jobs, results)
    theory_checks, theory_record = res.pop("theory")
    res["theory"] = theory_record
    if args.quick:
        checks = [("Q1 " + n, v, p) for n, v, p in theory_checks] + checks_quick(res["quick"])
    else:
        reduce_e1(res["e1"])  # keeps results.json small
        checks = [("1 " + n, v, p) for n, v, p in theory_checks] + checks_full(res)
        print_tables(res)
    print("\nchecks:")
    for name, value, ok in checks:
        print(f"  [{'PASS' if ok else 'FAIL'}] {name}: {value:.4g}")
    res.update(config=dict(quick=args.quick, seeds=SEEDS, every=EVERY, threshold=THRESHOLD), workers=workers,
               checks=[dict(name=n, value=float(v), passed=bool(p)) for n, v, p in checks])
    from lightning_flat.io import write_json

    path = os.path.join(out, "results.json")
    write_json(path, res, indent=None)  # before the figures: --replot redraws them from it
    res["figures"] = figures(res, out)
    res["seconds"] = time.perf_counter() - t_start
    write_json(path, res, indent=None)
    summary = summarize(res)
    write_json(os.path.join(out, "summary.json"), summary)
    if ctx["wandb"]:  # one more offline run with the figures, the checks table and the jump counts
        from lightning_flat.loggers import wandb_report

        finals = {f"{exp}/{k}/jumped": sum(t == t for t in v["tau"]) for exp in ("quick", "e2", "e5")
                  for k, v in summary.get(exp, {}).items()}
        if "e1" in summary:
            finals["e1/main/jumped"] = sum(t == t for t in summary["e1"]["main"]["tau"])
        wandb_report(out, f"wang_jacot2023{'-quick' if args.quick else ''}-report", res["config"], res["figures"],
                     res["checks"], {**finals, "seconds": res["seconds"]}, group=os.path.basename(out.rstrip("/")))
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
        out["e4"] = dict(runs(res["e4"]), low_phase_counts=e4_counts(res["e4"]))
        out["e5"] = {k: runs(v) for k, v in res["e5"].items()}
    return out


def print_tables(res):
    ev = events(res["e1"]["main"])
    taus = sorted(t for t in ev["tau"] if not math.isnan(t))
    print(f"\nE1: {len(taus)}/16 jump by step 6000, tau = {', '.join(f'{t:.0f}' for t in taus)}; "
          f"{sum(ev['collapsed'])} collapsed to E = 0")
    for key in ("L3", "L4"):
        e = events(res["e2"][key], horizon=5000)
        print(f"E2 depth {key[1]}: {sum(not math.isnan(t) for t in e['tau'])}/16 jump before 5000; median relerr at "
              f"8000 {_median(events(res['e2'][key])['relerr']):.3f}")
    table = e3_table(res["e3"])
    print("\nE3 median relerr [successes/16]:\n| eps \\ t0 | " + " | ".join(map(str, E3_T0)) + " |")
    print("|---" * (len(E3_T0) + 1) + "|")
    for eps in E3_EPS:
        print(f"| {eps} | " + " | ".join(f"{table[eps][t0]['median']:.2f} [{table[eps][t0]['successes']}]"
                                         for t0 in E3_T0) + " |")
    print(f"\nE4: relerr < 0.05 at the ends of the low phases: {e4_counts(res['e4'])}")
    print("\nT4, minima of the 2 x 2 problem (E01, s2/s1, relerr; rank 1: E01, s1, relerr):")
    for key, m in res["theory"]["t4"].items():
        r2 = m["rank2"]
        r1 = m["rank1"]
        two = "none" if r2 is None else f"{r2['E01']:.4f}, {r2['ratio']:.4f}, {r2['relerr']:.3f}"
        one = "none" if r1 is None else f"{r1['E01']:.4f}, {r1['s1']:.4f}, {r1['relerr']:.3f}"
        print(f"  L, eps, ridge = {key}: rank 2: {two} | rank 1: {one}")


if __name__ == "__main__":
    result = main()
    sys.exit(0 if all(c["passed"] for c in result["checks"]) else 1)
