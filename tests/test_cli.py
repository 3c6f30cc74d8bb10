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
