"""Per-step cost of our Trainer-based label-noise SGD vs a hand-written plain PyTorch loop doing the same math.

A third contender, a bare LightningModule doing the same math on batches from a plain generator (no callbacks,
no logging), measures the Trainer's own fixed per-step cost. All train E = W_5 ... W_1 (60x60 factors) on n=600 Gaussian measurements with minibatches of 50 drawn with
replacement, label noise N(0, 1) and torch.optim.SGD; ours is `Trainer.fit(DeepLinearNet, MatrixSensingDataModule)`
with the LabelNoise callback (logging every 100 steps, no progress bar or checkpoints). The two run interleaved
several times; medians are reported.

    python benchmarks/step_overhead.py            # float64 and float32, 3000 steps x 5 rounds
    python benchmarks/step_overhead.py --quick    # float64, 1000 steps x 3 rounds (< 1 minute)
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
from _timing import interleaved  # noqa: E402

N, D, DEPTH, B = 600, 60, 5, 50


def plain_loop(dm, dtype, steps: int) -> float:
    """The same math by hand: one gather, noise, forward, backward, SGD step."""
    A = dm.measurements.A.to(dtype).reshape(N, -1)
    b = dm.targets.to(dtype)
    g = torch.Generator().manual_seed(1)
    Ws = [torch.nn.Parameter(w.detach().to(dtype).clone()) for w in _model(dtype).weights()]
    opt = torch.optim.SGD(Ws, lr=0.01)
    t = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(N, (B,), generator=g)
        y = torch.index_select(b, 0, idx) + torch.randn(B, generator=g, dtype=dtype)
        E = Ws[0]
        for W in Ws[1:]:
            E = W @ E
        loss = (torch.index_select(A, 0, idx) @ E.reshape(-1) - y).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (time.perf_counter() - t) / steps


def bare_lightning(dm, dtype, steps: int) -> float:
    """Lightning's own floor: a minimal LightningModule doing the same math on batches from a plain generator, no
    callbacks, no logging. The gap to the plain loop is the Trainer's fixed per-step cost."""
    import lightning as L

    A = dm.measurements.A.to(dtype).reshape(N, -1)
    b = dm.targets.to(dtype)

    class Bare(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.Ws = torch.nn.ParameterList([w.detach().to(dtype).clone() for w in _model(dtype).weights()])
            self.g = torch.Generator().manual_seed(2)

        def training_step(self, batch, batch_idx):
            A_b, b_b = batch
            Ws = list(self.Ws)
            E = Ws[0]
            for W in Ws[1:]:
                E = W @ E
            y = b_b + torch.randn(B, generator=self.g, dtype=dtype)
            return (A_b @ E.reshape(-1) - y).square().mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    class Batches:
        def __len__(self):
            return steps

        def __iter__(self):
            g = torch.Generator().manual_seed(1)
            for _ in range(steps):
                idx = torch.randint(N, (B,), generator=g)
                yield [torch.index_select(A, 0, idx), torch.index_select(b, 0, idx)]

    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", devices=1)
    model = Bare()
    t = time.perf_counter()
    trainer.fit(model, train_dataloaders=Batches())
    return (time.perf_counter() - t) / steps


def _model(dtype):
    from lightning_flat.models import DeepLinearNet
    return DeepLinearNet([D] * (DEPTH + 1), init_scale=0.9 / D**0.5, lr=0.01, seed=0).to(dtype)


def lightning_run(dm, dtype, steps: int) -> float:
    import lightning as L

    from lightning_flat.callbacks import LabelNoise

    model = _model(dtype)
    trainer = L.Trainer(max_steps=steps, precision="64-true" if dtype == torch.float64 else "32-true",
                        callbacks=[LabelNoise(1.0)], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=100,
                        accelerator="cpu", devices=1)
    t = time.perf_counter()
    trainer.fit(model, dm)
    return (time.perf_counter() - t) / steps


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)
    from lightning_flat.datamodules import MatrixSensingDataModule

    dm = MatrixSensingDataModule(n=N, d_out=D, d_in=D, rank=3, batch_size=B, seed=0)
    steps, rounds = (1000, 3) if args.quick else (2000, 7)
    dtypes = [torch.float64] if args.quick else [torch.float64, torch.float32]
    rows = []
    for dtype in dtypes:
        plain_loop(dm, dtype, 200)
        lightning_run(dm, dtype, 200)
        bare_lightning(dm, dtype, 200)
        med = interleaved({"plain": lambda: plain_loop(dm, dtype, steps),
                           "bare": lambda: bare_lightning(dm, dtype, steps),
                           "lightning": lambda: lightning_run(dm, dtype, steps)}, rounds)
        rows.append(dict(dtype=str(dtype).replace("torch.", ""), steps=steps, rounds=rounds,
                         plain_us=med["plain"]["median"] * 1e6, ours_us=med["lightning"]["median"] * 1e6,
                         ratio=med["lightning"]["median"] / med["plain"]["median"],
                         plain_min_us=med["plain"]["min"] * 1e6, ours_min_us=med["lightning"]["min"] * 1e6,
                         ratio_min=med["lightning"]["min"] / med["plain"]["min"],
                         bare_us=med["bare"]["median"] * 1e6, bare_ratio=med["bare"]["median"] / med["plain"]["median"]))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; n={N}, {D}x{D}, depth {DEPTH}, batch {B}")
    print("| dtype | plain loop (us/step) | bare LightningModule (us/step, ratio) | ours: Trainer + DeepLinearNet + "
          "LabelNoise (us/step) | ours / plain | best rounds: plain, ours, ratio |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['dtype']} | {r['plain_us']:.0f} | {r['bare_us']:.0f} ({r['bare_ratio']:.2f}x) | {r['ours_us']:.0f} | "
              f"{r['ratio']:.2f}x | {r['plain_min_us']:.0f}, {r['ours_min_us']:.0f}, {r['ratio_min']:.2f}x |")
    print(json.dumps(rows))
    return rows


if __name__ == "__main__":
    main()
