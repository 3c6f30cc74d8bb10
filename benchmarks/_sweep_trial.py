"""The trial of ``benchmarks/sweep.py``, a module of its own so that worker processes import it by name (a spawned
process through the parent's ``sys.path``, a Ray worker through the ``py_modules`` the sweep ships)."""

from __future__ import annotations


def train(config: dict) -> dict:
    """``config["steps"]`` full-batch GD steps of a DeepLinearNet [8, 8, 8, 8] on a seeded 8 x 8 sensing problem, in
    float64 with one intra-op thread (about 1 s for 1000 steps on an idle core); returns the final loss and the
    end-to-end matrix's Frobenius norm."""
    import logging
    import warnings

    import lightning as L
    import torch

    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    from lightning_flat import functional as F
    from lightning_flat.datamodules import MatrixSensingDataModule
    from lightning_flat.models import DeepLinearNet

    dm = MatrixSensingDataModule(n=40, d_out=8, d_in=8, rank=2, batch_size=None, seed=config["seed"])
    model = DeepLinearNet([8, 8, 8, 8], lr=0.05, seed=config["seed"])
    trainer = L.Trainer(max_steps=config["steps"], precision="64-true", logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False, accelerator="cpu", devices=1)
    trainer.fit(model, dm)
    E = model.end_to_end().detach()
    return {"loss": float(F.measurement_loss(E, dm.measurements, dm.targets)),
            "norm": float(torch.linalg.matrix_norm(E))}
