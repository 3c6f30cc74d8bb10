"""Exact Hessian trace (closed form) vs Hutch++ (hessian-eigenthings, 99 HVPs) vs a dense torch.func.hessian.

At the Gatmiry size (n=600 Gaussian measurements of 60x60 matrices, depth 5, 18,000 parameters, float64) the dense
Hessian (2.6 GB, 18,000 HVP columns) is out of reach, so the dense reference runs at a smaller size too
(d=20, n=200, depth 5, 2,000 parameters) where all three fit. Prints times, ratios and relative errors side by side.

    python benchmarks/trace.py            # both sizes
    python benchmarks/trace.py --quick    # the small size only (< 1 minute)
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _timing import median_time  # noqa: E402

from lightning_flat import functional as F  # noqa: E402
from lightning_flat.datamodules import MatrixSensingDataModule  # noqa: E402
from lightning_flat.measurements import MeasurementBatch  # noqa: E402
from lightning_flat.models import DeepLinearNet  # noqa: E402


def bench(d: int, n: int, depth: int, dense: bool, repeats: int) -> dict:
    from hessian_eigenthings import HessianOperator, trace

    dm = MatrixSensingDataModule(n=n, d_out=d, d_in=d, rank=3, batch_size=None, seed=0)
    model = DeepLinearNet([d] * (depth + 1), init_scale=0.9 / d**0.5, seed=0).double()
    W = [w.detach() for w in model.weights()]
    params = sum(w.numel() for w in W)
    out = dict(d=d, n=n, depth=depth, params=params)

    meas = dm.measurements.to(torch.float64)
    fresh = meas.subset(slice(None))  # same data, no cached moment
    t = time.perf_counter()
    exact = float(F.hessian_trace(W, fresh))
    out["exact_first_call_s"] = time.perf_counter() - t  # builds and caches the fourth moment (Dense, "auto")
    out["exact_s"] = median_time(lambda: F.hessian_trace(W, fresh), repeats=repeats)
    out["exact"] = exact

    def direct_trace():  # the same closed form with the batched-matmul curvature (no fourth moment)
        P, S = F.partial_products(W)
        G = torch.stack([Pj.T @ Pj for Pj in P])
        K = torch.stack([Sj @ Sj.T for Sj in S])
        return fresh.curvature(G, K, method="direct").sum() * (2.0 / n)

    out["exact_direct_s"] = median_time(direct_trace, repeats=max(1, repeats // 2))
    out["exact_direct_rel_diff"] = abs(float(direct_trace()) - exact) / exact

    batch = MeasurementBatch(meas, dm.targets)
    op = HessianOperator(model, [batch], lambda m, b: m.loss(b), full_dataset=True)
    res = {}

    def hpp():
        res["r"] = trace(op, num_matvecs=99, method="hutch++", seed=0)

    out["hutchpp_s"] = median_time(hpp, repeats=max(1, repeats // 2), warmup=1)
    out["hutchpp"] = res["r"].estimate
    out["hutchpp_rel_err"] = abs(res["r"].estimate - exact) / exact
    out["hutchpp_stderr_rel"] = res["r"].stderr / exact
    out["speedup_vs_hutchpp"] = out["hutchpp_s"] / out["exact_s"]
    out["speedup_vs_hutchpp_first_call"] = out["hutchpp_s"] / out["exact_first_call_s"]
    if dense:
        t = time.perf_counter()
        H = F.loss_hessian(W, meas, dm.targets)
        dense_tr = float(torch.trace(H))
        out["dense_s"] = time.perf_counter() - t
        out["dense_rel_diff"] = abs(dense_tr - exact) / exact
        out["speedup_vs_dense"] = out["dense_s"] / out["exact_s"]
    return out


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [(20, 200, 5, True)] + ([] if args.quick else [(60, 600, 5, False)])
    rows = [bench(d, n, L, dense, repeats=5 if args.quick else 7) for d, n, L, dense in sizes]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float64")
    print("| size | params | exact (s) | exact 1st call (s) | direct (s) | Hutch++ 99 HVPs (s) | Hutch++ rel err | "
          "dense (s) | exact vs dense | speedup vs Hutch++ | speedup vs dense |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        dense = (f"{r['dense_s']:.2f} | {r['dense_rel_diff']:.1e} | " if "dense_s" in r else "n/a | n/a | ")
        sd = f"{r['speedup_vs_dense']:.0f}x" if "speedup_vs_dense" in r else "n/a"
        print(f"| d={r['d']} n={r['n']} L={r['depth']} | {r['params']} | {r['exact_s'] * 1e3:.2f} ms | "
              f"{r['exact_first_call_s'] * 1e3:.1f} ms | {r['exact_direct_s'] * 1e3:.1f} ms | {r['hutchpp_s']:.3f} | "
              f"{r['hutchpp_rel_err']:.1e} | {dense}{r['speedup_vs_hutchpp']:.0f}x | {sd} |")
    print(json.dumps(rows))
    return rows


if __name__ == "__main__":
    main()
