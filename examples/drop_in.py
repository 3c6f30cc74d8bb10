"""Our callbacks on your own LightningModule: a plain tanh MLP on synthetic regression data.

The module below knows nothing of lightning_flat. HessianTrace (Hutch++), Sharpness (warm-started Lanczos, top-3
eigenvalues), LabelNoise, SAM and FiniteLossGuard are dropped into its Trainer; metrics go to wandb, offline.

    python examples/drop_in.py [--steps 300] [--out outputs/drop_in]
"""

from __future__ import annotations

import argparse
import os

import lightning as L
import torch
from lightning_flat.callbacks import SAM, FiniteLossGuard, HessianTrace, LabelNoise, Sharpness, StepProgressBar
from lightning_flat.loggers import MemoryLogger, WandbLogger


class MLPRegression(L.LightningModule):
    """Any user module: batches are [x, y] lists, the loss comes out of training_step."""

    def __init__(self, width: int = 32, lr: float = 0.05, n: int = 512, batch_size: int = 64, seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        g = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(torch.nn.Linear(8, width), torch.nn.Tanh(), torch.nn.Dropout(0.1),
                                       torch.nn.Linear(width, width), torch.nn.Tanh(), torch.nn.Linear(width, 1))
        self.x = torch.randn(n, 8, generator=g)
        self.y = torch.sin(self.x[:, :1] * 2) + 0.5 * self.x[:, 1:2] * self.x[:, 2:3]

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train/mse", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)

    def train_dataloader(self):
        ds = torch.utils.data.TensorDataset(self.x, self.y)
        return torch.utils.data.DataLoader(ds, batch_size=self.hparams.batch_size, shuffle=True)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--out", default=os.path.join("outputs", "drop_in"))
    args = p.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "offline")
    from lightning_flat.threads import use_threads

    use_threads()  # one intra-op thread unless LIGHTNING_FLAT_THREADS / OMP_NUM_THREADS say otherwise
    os.makedirs(args.out, exist_ok=True)
    L.seed_everything(0)
    model = MLPRegression()
    memory = MemoryLogger()
    trainer = L.Trainer(
        max_steps=args.steps,
        logger=[WandbLogger(project="lightning-flat", name="drop-in-mlp", save_dir=args.out, offline=True), memory],
        callbacks=[
            LabelNoise(std=0.1, target_key=1),  # [x, y] list batches: the targets are entry 1
            SAM(rho=0.05),
            HessianTrace(every_n_steps=50),
            Sharpness(every_n_steps=50, top_k=3),
            FiniteLossGuard(),
            StepProgressBar(every_n_steps=100),  # a bar in a terminal, a line every 100 steps in a log
        ],
        log_every_n_steps=8, enable_checkpointing=False, accelerator="cpu", devices=1,  # 8 batches an epoch
    )
    trainer.fit(model)
    trainer.loggers[0].experiment.finish()  # close the wandb run (a later WandbLogger would otherwise reuse it)
    for key in ("hessian/trace", "hessian/trace_stderr", "hessian/sharpness", "hessian/eigenvalue_1",
                "hessian/sharpness_hvps"):
        steps, values = memory.series(key)
        print(f"{key:24s} " + "  ".join(f"{s}:{v:.4g}" for s, v in zip(steps, values)))
    return memory.history


if __name__ == "__main__":
    main()
