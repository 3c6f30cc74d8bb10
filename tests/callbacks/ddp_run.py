"""A real multi-process run for the DDP test: `python ddp_run.py --devices 2 --out results.json`.

Trains the TanhMLP user module with HessianTrace and Sharpness under strategy="ddp" (CPU, gloo) or in a single
process (--devices 1, with twice the per-rank batch, i.e. the union of the ranks' batches) and writes rank 0's
logged curvature values to --out.
"""

import argparse
import json
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(__file__))

import lightning as L  # noqa: E402
import torch  # noqa: E402

from generic_modules import TanhMLP  # noqa: E402
from lightning_flat.callbacks import HessianTrace, Sharpness  # noqa: E402
from lightning_flat.loggers import MemoryLogger  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    model = TanhMLP(batch_size=16 // args.devices)
    mem = MemoryLogger()
    trainer = L.Trainer(max_steps=9, accelerator="cpu", devices=args.devices,
                        strategy="ddp" if args.devices > 1 else "auto", logger=mem,
                        callbacks=[HessianTrace(3, num_matvecs=60), Sharpness(3, tol=1e-12)],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        log_every_n_steps=1, use_distributed_sampler=False)
    trainer.fit(model)
    if trainer.is_global_zero:
        with open(args.out, "w") as f:
            json.dump({"history": mem.history, "world_size": trainer.world_size,
                       "params": [p.detach().reshape(-1).tolist() for p in model.parameters()]}, f)


if __name__ == "__main__":
    main()
