"""The training step's measurement kernel, side by side in one run.

Predictions ``y_i = <A_i, E>`` with gradient (forward + backward) for replica-stacked minibatches ``A (R, B, D)``:
   ours (``Dense.__call__``: ``(R, 1, D) @ (R, D, B)``) vs the textbook batched matrix-vector product
   ``(R, B, D) @ (R, D, 1)``, which torch runs on a slow path on CPU (forward and, for ``E``, backward) and vs a
   Python loop of ``torch.mv`` over the replicas. The values must agree.

    python benchmarks/measurements.py            # Gatmiry size (R = 1, 2; 60 x 60) and R = 32 replicas (20 x 20)
    python benchmarks/measurements.py --quick    # fewer repeats (about 10 s)
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _timing import interleaved, per_call  # noqa: E402

from lightning_flat.measurements import Dense  # noqa: E402

CASES = [  # replicas, batch, d, dtype
    (1, 50, 60, torch.float64),
    (2, 50, 60, torch.float64),
    (2, 50, 60, torch.float32),
    (32, 50, 20, torch.float64),
]


def predictions(R, B, d, dtype, calls, rounds):
    g = torch.Generator().manual_seed(0)
    A = torch.randn(R, B, d, d, generator=g, dtype=dtype)
    E = torch.randn(R, d, d, generator=g, dtype=dtype).requires_grad_()
    meas, A2 = Dense(A), A.reshape(R, B, d * d)

    def ours():
        meas(E).square().sum().backward()

    def batched_mv():
        torch.matmul(A2, E.reshape(R, -1, 1)).squeeze(-1).square().sum().backward()

    def loop_mv():
        torch.stack([torch.mv(A2[r], E[r].reshape(-1)) for r in range(R)]).square().sum().backward()

    with torch.no_grad():
        ref = torch.matmul(A2, E.reshape(R, -1, 1)).squeeze(-1)
        diff = float((meas(E) - ref).abs().max() / ref.abs().max())
    t = interleaved({k: per_call(f, calls) for k, f in
                     (("ours", ours), ("batched_mv", batched_mv), ("loop_mv", loop_mv))}, rounds)
    us = {k: v["median"] * 1e6 for k, v in t.items()}
    return dict(replicas=R, batch=B, d=d, dtype=str(dtype).removeprefix("torch."), ours_us=us["ours"],
                batched_mv_us=us["batched_mv"], loop_mv_us=us["loop_mv"], speedup=us["batched_mv"] / us["ours"],
                rel_diff=diff)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as in the example workers)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    calls, rounds = (20, 3) if args.quick else (200, 7)
    rows = [predictions(*case, calls, rounds) for case in CASES]
    print("predictions <A_i, E> with gradient, per call (median of interleaved rounds)")
    print("| R | batch | d | dtype | ours (us) | batched mv (us) | loop of mv (us) | speedup vs batched mv | rel diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['replicas']} | {r['batch']} | {r['d']} | {r['dtype']} | {r['ours_us']:.0f} | "
              f"{r['batched_mv_us']:.0f} | {r['loop_mv_us']:.0f} | {r['speedup']:.2f}x | {r['rel_diff']:.1e} |")
    result = dict(predictions=rows)
    if not args.quick:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
