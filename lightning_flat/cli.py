"""The ``lightning-flat`` command: Lightning's CLI over the lightning_flat models and datamodules.

``lightning-flat fit --config examples/gatmiry2023/quick.yaml`` trains the model and datamodule named in the YAML
(``class_path`` + ``init_args``, any LightningModule/LightningDataModule importable by path) with the trainer,
callbacks and loggers given there. wandb runs offline unless ``WANDB_MODE`` says otherwise. It runs one intra-op
thread (faster for these tiny models, see :mod:`lightning_flat.threads`) unless ``LIGHTNING_FLAT_THREADS`` or
``OMP_NUM_THREADS`` says otherwise.
"""

from __future__ import annotations

import os
import warnings

__all__ = ["main", "run"]


def main(args: list[str] | None = None) -> None:
    """The console command: ``lightning-flat fit --config ...`` (``args`` default to the command line)."""
    run(args)


def run(args: list[str] | None = None):
    """Run the command on ``args`` (default: the command line) and return the ``LightningCLI`` (its ``model``,
    ``datamodule`` and ``trainer``)."""
    os.environ.setdefault("WANDB_MODE", "offline")
    # a deprecation inside Lightning's own batch handling, printed on every fit: nothing a user can act on
    warnings.filterwarnings("ignore", message=".*LeafSpec.*is deprecated.*")
    from lightning_flat.threads import use_threads

    use_threads()
    from lightning.pytorch import LightningDataModule, LightningModule
    from lightning.pytorch.cli import LightningCLI

    import lightning_flat.callbacks  # noqa: F401  (short names resolvable in YAML)
    import lightning_flat.datamodules  # noqa: F401
    import lightning_flat.models  # noqa: F401

    cli = LightningCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,  # None: LightningCLI reads the command line itself
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )
    import wandb

    if wandb.run is not None:  # a WandbLogger's run: close it (flushes it to disk; a next call starts its own)
        wandb.finish()
    return cli


if __name__ == "__main__":  # pragma: no cover
    main()
