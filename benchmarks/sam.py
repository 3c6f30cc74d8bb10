"""SAM costs, side by side in one run.

1. The 1-SAM descent gradient at batch 64, vectorised (``F.sam_gradient`` with ``vmap(grad(...))``, what the SAM
   callback runs) vs a per-example Python loop of ``torch.autograd.grad``, on a depth-3 linear net read through
   Gaussian measurements and on a tanh MLP; the results must agree.
2. A training step with the SAM callback (n-SAM, m-SAM with m=10, 1-SAM) vs a plain SGD step, in the Trainer
   (DeepLinearNet [20, 20, 20, 20] on Gaussian matrix sensing, batch 50, float64).

    python benchmarks/sam.py            # 1. and 2.
    python benchmarks/sam.py --quick    # fewer repeats (< 1 minute)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _timing import interleaved, median_time  # noqa: E402

from lightning_flat import functional as F  # noqa: E402

RHO, BATCH = 0.05, 64


def loop_sam(loss_one, params, examples):
    """Per-example loop: g_i, eps_i, grad at W + eps_i, averaged."""
    total = [torch.zeros_like(p) for p in params]
    n = len(examples)
    for ex in examples:
        ps = [p.detach().requires_grad_() for p in params]
        g = torch.autograd.grad(loss_one(ps, ex), ps)
        eps = F.sam_perturbation(g, RHO)
        pp = [(p.detach() + e).requires_grad_() for p, e in zip(params, eps)]
        gp = torch.autograd.grad(loss_one(pp, ex), pp)
        total = [t + gi / n for t, gi in zip(total, gp)]
    return total


def case_linear():
    from lightning_flat.datamodules import MatrixSensingDataModule
    from lightning_flat.measurements import MeasurementBatch

    dm = MatrixSensingDataModule(n=BATCH, d_out=20, d_in=20, rank=2, seed=0)
    g = torch.Generator().manual_seed(1)
    params = [torch.randn(20, 20, generator=g, dtype=torch.float64) / 20**0.5 for _ in range(3)]
    batch = MeasurementBatch(dm.measurements, dm.targets)

    def loss_at(ps, b):
        return (b.measurements(F.end_to_end(ps)) - b.targets).square().mean()

    examples = [batch.with_fields({k: v[i:i + 1] for k, v in batch.fields().items()}) for i in range(BATCH)]
    return "depth-3 linear net (3 x 20x20, Dense)", loss_at, params, batch.fields(), batch.with_fields, examples


def case_mlp():
    g = torch.Generator().manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(),
                              torch.nn.Linear(64, 1)).double()
    names = [n for n, _ in net.named_parameters()]
    params = [p.detach().clone() for p in net.parameters()]
    x = torch.randn(BATCH, 32, generator=g, dtype=torch.float64)
    y = torch.randn(BATCH, 1, generator=g, dtype=torch.float64)

    def loss_at(ps, b):
        return (torch.func.functional_call(net, dict(zip(names, ps)), (b["x"],)) - b["y"]).square().mean()

    examples = [{"x": x[i:i + 1], "y": y[i:i + 1]} for i in range(BATCH)]
    return "tanh MLP 32-64-64-1", loss_at, params, {"x": x, "y": y}, dict, examples


def per_example(repeats: int) -> list[dict]:
    rows = []
    for make in (case_linear, case_mlp):
        name, loss_at, params, fields, rebuild, examples = make()
        out = {}

        def vec():
            out["v"] = F.sam_gradient(loss_at, params, fields, rebuild, RHO, 1)

        def loop():
            out["l"] = loop_sam(loss_at, params, examples)

        t_vec = median_time(vec, repeats=repeats)
        t_loop = median_time(loop, repeats=repeats)
        diff = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(out["v"], out["l"]))
        rows.append(dict(case=name, batch=BATCH, vmap_ms=t_vec * 1e3, loop_ms=t_loop * 1e3, speedup=t_loop / t_vec,
                         rel_diff=diff))
    return rows


def step_costs(steps: int, rounds: int) -> dict:
    import lightning as L

    from lightning_flat.callbacks import SAM
    from lightning_flat.datamodules import MatrixSensingDataModule
    from lightning_flat.models import DeepLinearNet

    dm = MatrixSensingDataModule(n=200, d_out=20, d_in=20, rank=2, batch_size=50, seed=0)

    def run(sam):
        model = DeepLinearNet([20, 20, 20, 20], init_scale=0.9 / 20**0.5, lr=0.05, seed=0)
        tr = L.Trainer(max_steps=steps, precision="64-true", callbacks=[] if sam is None else [sam], logger=False,
                       enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                       log_every_n_steps=100, accelerator="cpu", devices=1)
        t = time.perf_counter()
        tr.fit(model, dm)
        return (time.perf_counter() - t) / steps

    variants = {"SGD": lambda: run(None), "n-SAM": lambda: run(SAM(RHO)), "10-SAM": lambda: run(SAM(RHO, m=10)),
                "1-SAM": lambda: run(SAM(RHO, m=1))}
    for fn in variants.values():
        fn()
    med = interleaved(variants, rounds)
    return {k: v["median"] * 1e6 for k, v in med.items()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    rows = per_example(3 if args.quick else 7)
    costs = step_costs(*((200, 2) if args.quick else (1000, 5)))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float64")
    print("| 1-SAM gradient, batch 64 | vmap (ms) | per-example loop (ms) | loop / vmap | rel diff |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['vmap_ms']:.1f} | {r['loop_ms']:.1f} | {r['speedup']:.1f}x | {r['rel_diff']:.1e} |")
    print("\n| Trainer step, DeepLinearNet [20]*4, batch 50 | us/step | vs SGD |")
    print("|---|---|---|")
    for k, v in costs.items():
        print(f"| {k} | {v:.0f} | {v / costs['SGD']:.2f}x |")
    result = dict(per_example=rows, step_us=costs)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
