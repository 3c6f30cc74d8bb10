"""Trial functions for the sweep tests (importable by spawned and Ray workers)."""


def train_block(config):
    """A block of replicas of a DeepLinearNet on a small sensing problem: the final loss of each replica."""
    import warnings

    import lightning as L
    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    from lightning_flat.datamodules import MatrixSensingDataModule
    from lightning_flat.models import DeepLinearNet

    dm = MatrixSensingDataModule(n=30, d_out=4, d_in=4, rank=1, batch_size=5, seed=0)
    net = DeepLinearNet([4, 4, 4], lr=config["lr"], replicas=3, seed=[100 * config["block"] + r for r in range(3)])
    tr = L.Trainer(max_steps=30, precision="64-true", logger=False, enable_progress_bar=False,
                   enable_checkpointing=False, enable_model_summary=False, accelerator="cpu", devices=1)
    tr.fit(net, dm)
    from lightning_flat import functional as F

    losses = F.measurement_loss(net.end_to_end().detach(), dm.measurements, dm.targets)
    return {"losses": [float(v) for v in losses]}
