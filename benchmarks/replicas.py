"""Replicas vs sequential single runs: network-steps per second, side by side in one run.

1. Wang & Jacot size: 2x2 completion from 3 observed entries, DeepLinearNet [2, 32, 32, 32, 2] (depth 4, width 32),
   SGD with batch 1 (i.i.d. with replacement), float32: R = 32 replicas in one Trainer vs 32 single runs one after
   the other.
2. Marion & Chizat size: univariate regression, d = 5, depth 10, full-batch GD, float64: R = 32 vs 32 single runs.

The replica run is also checked against the single runs. They cannot agree bitwise: the replicas' batched kernels
round differently from the single runs' ones (O(1) ulps per step), and training amplifies those differences. The
benchmark measures that amplification per replica: the replica run started again from weights moved by one ulp ends
``sensitivity[r]`` away from the unmoved run. To first order each step's rounding difference is amplified no more than
that, so replica ``r`` must agree with its single run to ``steps * sensitivity[r]`` plus the last step's own rounding
(``eps * max|W|``); ``tolerance_ratio`` is the largest difference over that bound (<= 1 expected).

    python benchmarks/replicas.py            # 1000 steps per run
    python benchmarks/replicas.py --quick    # 200 steps per run (< 1 minute)
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import warnings

import torch

R = 32


def problems():
    from lightning_flat.datamodules import MeasurementDataModule
    from lightning_flat.measurements import Entries, RankOne

    wj = MeasurementDataModule.from_problem(Entries(torch.tensor([0, 1, 1]), torch.tensor([0, 0, 1]), (2, 2)),
                                            torch.tensor([1.0, 0.1, 1.0], dtype=torch.float64), batch_size=1)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(100, 5, generator=g, dtype=torch.float64)
    w = torch.randn(5, generator=g, dtype=torch.float64)
    mc = MeasurementDataModule.from_problem(RankOne(torch.ones(100, 1, dtype=torch.float64), X), X @ w,
                                            batch_size=None)
    return {
        "Wang & Jacot: 2x2, [2,32,32,32,2], batch 1, float32": dict(
            dm=wj, dims=[2, 32, 32, 32, 2], init="uniform", lr=0.03, weight_decay=0.1, precision="32-true"),
        "Marion & Chizat: d=5, depth 10, full batch, float64": dict(
            dm=mc, dims=[5] * 10 + [1], init="gaussian", lr=0.005, weight_decay=0.0, precision="64-true"),
    }


def fit(cfg, steps, replicas, seed, nudge=False):
    import lightning as L

    from lightning_flat.models import DeepLinearNet

    model = DeepLinearNet(cfg["dims"], init=cfg["init"], lr=cfg["lr"], weight_decay=cfg["weight_decay"],
                          replicas=replicas, seed=seed)
    if nudge:  # every initial weight moved by one ulp of the training dtype
        dtype = torch.float64 if cfg["precision"] == "64-true" else torch.float32
        model.to(dtype)
        with torch.no_grad():
            for W in model.weights():
                W.copy_(torch.nextafter(W, torch.full_like(W, float("inf"))))
    tr = L.Trainer(max_steps=steps, precision=cfg["precision"], logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=100, accelerator="cpu",
                   devices=1)
    t = time.perf_counter()
    tr.fit(model, cfg["dm"])
    return model, time.perf_counter() - t


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    steps = 200 if args.quick else 1000
    rows = []
    for name, cfg in problems().items():
        fit(cfg, 20, R, 0)  # warm-up
        rep, t_rep = fit(cfg, steps, R, 0)
        nudged = fit(cfg, steps, R, 0, nudge=True)[0]
        eps = torch.finfo(rep.weights()[0].dtype).eps
        t_single, diffs, bounds = 0.0, [], []
        for r in range(R):
            single, t = fit(cfg, steps, 1, r)
            t_single += t
            diffs.append(max(float((W[r] - S).abs().max()) for W, S in zip(rep.weights(), single.weights())))
            sensitivity = max(float((W[r] - V[r]).abs().max()) for W, V in zip(nudged.weights(), rep.weights()))
            bounds.append(steps * sensitivity + eps * max(float(W[r].abs().max()) for W in rep.weights()))
        rows.append(dict(problem=name, replicas=R, steps=steps, replica_s=t_rep, sequential_s=t_single,
                         replica_net_steps_per_s=R * steps / t_rep, single_net_steps_per_s=R * steps / t_single,
                         speedup=t_single / t_rep, max_abs_diff=max(diffs),
                         tolerance_ratio=max(d / b for d, b in zip(diffs, bounds))))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {R} networks x {steps} steps each")
    print("| problem | R replicas, one Trainer (s) | R single runs (s) | network-steps/s: replicas | single | speedup |"
          " max |W_replica - W_single| | over its rounding bound |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['problem']} | {r['replica_s']:.2f} | {r['sequential_s']:.1f} | {r['replica_net_steps_per_s']:.0f} |"
              f" {r['single_net_steps_per_s']:.0f} | {r['speedup']:.1f}x | {r['max_abs_diff']:.1e} |"
              f" {r['tolerance_ratio']:.2g} |")
    print(json.dumps(rows))
    return rows


if __name__ == "__main__":
    main()
