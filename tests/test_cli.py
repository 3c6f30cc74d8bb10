import glob
import os

import yaml

from lightning_flat.cli import main

CONFIG = os.path.join(os.path.dirname(__file__), "..", "examples", "gatmiry2023", "quick.yaml")


def test_fit_from_yaml_with_wandb_offline(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    main(["fit", "--config", CONFIG, "--trainer.max_steps=60", f"--trainer.logger.init_args.save_dir={tmp_path}",
          "--trainer.log_every_n_steps=20"])
    runs = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    assert len(runs) == 1 and glob.glob(os.path.join(runs[0], "*.wandb"))
    cfg = yaml.safe_load(open(glob.glob(str(tmp_path / "**" / "config.yaml"), recursive=True)[0]))
    assert cfg["model"]["init_args"]["dims"] == [20, 20, 20]
    assert cfg["trainer"]["callbacks"][1]["init_args"]["label_noise"] == [[0, 1.0], [6000, 0.0]]


def test_full_size_configs_parse():
    import glob as _glob

    from lightning.pytorch import LightningDataModule, LightningModule
    from lightning.pytorch.cli import LightningCLI

    from lightning_flat.callbacks import HyperparameterSchedule
    from lightning_flat.models import DeepLinearNet

    paths = sorted(_glob.glob(os.path.join(os.path.dirname(CONFIG), "full_L*.yaml")))
    assert len(paths) == 4
    for path in paths:
        cli = LightningCLI(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                           run=False, args=["--config", path, "--trainer.logger=false"])
        assert isinstance(cli.model, DeepLinearNet) and cli.model.replicas == 2 and cli.model.replica_seeds == [0, 0]
        (sched,) = [c for c in cli.trainer.callbacks if isinstance(c, HyperparameterSchedule)]
        assert sched.values(299999) == {"label_noise": [1.0, 0.0], "lr": [0.01, 0.0]}
        assert sched.values(300000) == {"label_noise": [0.0, 0.0], "lr": [0.01, 0.0]}
        assert sched.values(99999)["lr"] == [0.01, 0.01]
