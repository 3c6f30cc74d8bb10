"""The curvature callbacks on a user's own module (a tanh MLP, float64), side by side in one run.

1. Sharpness reads during training: warm-started Lanczos (from the previous top eigenvector) vs cold starts, HVPs
   and seconds per read, on the same training run (the callbacks do not change training, so both see the same
   weights).
2. The generic trace: Hutch++ (hessian-eigenthings, what HessianTrace runs) vs PyHessian-style Hutchinson with
   Rademacher probes, at equal accuracy: the HVP budget each needs for a median relative error of 5% against the
   dense torch.func.hessian trace (20 probe seeds).

    python benchmarks/curvature_generic.py            # width 24, 300 steps
    python benchmarks/curvature_generic.py --quick    # width 12, 60 steps (< 1 minute)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "callbacks"))


class Timed:
    """Wrap a callback's measure() to record seconds per read."""

    def __init__(self, cb, cold: bool = False):
        self.cb, self.seconds = cb, []
        inner = cb.measure

        def measure(trainer, pl_module):
            if cold:  # forget the previous read's vector: every Lanczos run starts from a random vector
                cb.load_state_dict({**cb.state_dict(), "v": {}})
            t = time.perf_counter()
            out = inner(trainer, pl_module)
            self.seconds.append(time.perf_counter() - t)
            return out

        cb.measure = measure


def sharpness_reads(width: int, steps: int, every: int) -> dict:
    import lightning as L

    from generic_modules import TanhMLP
    from lightning_flat.callbacks import CurvatureOptions, Sharpness

    model = TanhMLP(width=width, n=256, batch_size=64, lr=0.05)
    warm = Timed(Sharpness(every, tol=1e-8, method="lanczos"))
    cold = Timed(Sharpness(every, tol=1e-8, method="lanczos", options=CurvatureOptions(seed=1)), cold=True)
    trainer = L.Trainer(max_steps=steps, logger=False, callbacks=[warm.cb, cold.cb], enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1)
    trainer.fit(model)
    hw = [v for _, v in warm.cb.history["hessian/sharpness_hvps"]][1:]  # the first read is cold for both
    hc = [v for _, v in cold.cb.history["hessian/sharpness_hvps"]][1:]
    agree = max(abs(a - b) / abs(b) for (_, a), (_, b) in zip(warm.cb.history["hessian/sharpness"],
                                                               cold.cb.history["hessian/sharpness"]))
    return dict(params=sum(p.numel() for p in model.parameters()), reads=len(hw),
                warm_hvps=statistics.mean(hw), cold_hvps=statistics.mean(hc),
                warm_s=statistics.mean(warm.seconds[1:]), cold_s=statistics.mean(cold.seconds[1:]),
                hvp_ratio=statistics.mean(hw) / statistics.mean(hc), max_rel_diff=agree, model=model)


def trace_budgets(model, seeds: int = 20, target: float = 0.05) -> dict:
    from hessian_eigenthings import HessianOperator, hutch_plus_plus, hutchinson

    from generic_modules import dense_hessian

    x, y = model.x[:64], model.y[:64]
    exact = float(torch.trace(dense_hessian(model, x, y)))
    model.eval()
    op = HessianOperator(model, [(x, y)], lambda m, b: torch.nn.functional.mse_loss(m.net(b[0]), b[1]))
    size = op.size

    def median_error(method, budget):
        errs, secs = [], []
        for s in range(seeds):
            t = time.perf_counter()
            if method == "hutch++":
                est = hutch_plus_plus(op, num_matvecs=budget, seed=s).estimate
            else:
                est = hutchinson(op, num_samples=budget, distribution="rademacher", seed=s).estimate
            secs.append(time.perf_counter() - t)
            errs.append(abs(est - exact) / abs(exact))
        return statistics.median(errs), statistics.mean(secs)

    out = {}
    for method in ("hutch++", "hutchinson"):
        budget = 3
        while True:
            err, sec = median_error(method, budget)
            if err <= target or budget >= 3 * size:
                break
            budget = int(budget * 1.5) + 3
        out[method] = dict(hvps=budget, median_rel_err=err, seconds=sec)
    out["params"] = size
    out["exact_trace"] = exact
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    width, steps = (12, 60) if args.quick else (24, 300)
    reads = sharpness_reads(width, steps, every=10 if args.quick else 20)
    model = reads.pop("model")
    budgets = trace_budgets(model, seeds=10 if args.quick else 20)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float64; tanh MLP 4-{width}-{width}-1 "
          f"({reads['params']} parameters), batch 64")
    print("| sharpness read | HVPs per read | seconds per read |")
    print("|---|---|---|")
    print(f"| warm-started Lanczos | {reads['warm_hvps']:.1f} | {reads['warm_s'] * 1e3:.1f} ms |")
    print(f"| cold Lanczos | {reads['cold_hvps']:.1f} | {reads['cold_s'] * 1e3:.1f} ms |")
    print(f"| warm / cold | {reads['hvp_ratio']:.2f} | {reads['warm_s'] / reads['cold_s']:.2f} |")
    print(f"({reads['reads']} reads; warm and cold agree to {reads['max_rel_diff']:.1e})")
    print("\n| trace estimator, median rel. error <= 5% | HVPs | seconds per estimate |")
    print("|---|---|---|")
    for m in ("hutch++", "hutchinson"):
        r = budgets[m]
        print(f"| {m} | {r['hvps']} (median error {r['median_rel_err']:.3f}) | {r['seconds'] * 1e3:.1f} ms |")
    result = dict(sharpness=reads, trace=budgets)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
