"""Small shared pieces for the Lightning-level tests."""

import warnings

import lightning as L

from lightning_flat.loggers import MemoryLogger


def trainer(max_steps, callbacks=(), precision="64-true", log_every_n_steps=1, **kw):
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    mem = MemoryLogger()
    tr = L.Trainer(max_steps=max_steps, callbacks=list(callbacks), precision=precision, logger=mem,
                   enable_checkpointing=kw.pop("enable_checkpointing", False), enable_progress_bar=False,
                   enable_model_summary=False, log_every_n_steps=log_every_n_steps, accelerator="cpu", devices=1,
                   **kw)
    return tr, mem
