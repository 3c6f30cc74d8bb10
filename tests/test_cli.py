import glob
import os

import yaml

from lightning_flat.cli import main, run

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
        assert isinstance(cli.model, DeepLinearNet)
        assert cli.model.replicas.count == 2 and cli.model.replicas.seeds == [0, 0]
        (sched,) = [c for c in cli.trainer.callbacks if isinstance(c, HyperparameterSchedule)]
        depth = len(cli.model.weights())
        noisy = 80_000 * depth  # the example's noise phase: 8e4 steps per layer
        assert cli.trainer.max_steps == noisy + 20_000 and path.endswith(f"full_L{depth}.yaml")
        assert sched.values(noisy - 1) == {"label_noise": [1.0, 0.0], "lr": [0.01, 0.0]}
        assert sched.values(noisy) == {"label_noise": [0.0, 0.0], "lr": [0.01, 0.0]}
        assert sched.values(99999)["lr"] == [0.01, 0.01]


WJ = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "examples", "wang_jacot2023", "*.yaml")))


def test_wang_jacot_configs_run_as_they_are(tmp_path, monkeypatch):
    """Every committed YAML of the rank-jump example trains through the CLI (a few steps; loggers off, except the
    first, which writes its offline wandb run under tmp_path)."""
    from lightning_flat.callbacks import HyperparameterSchedule, SingularValues
    from lightning_flat.datamodules import ObservedEntriesDataModule
    from lightning_flat.models import DeepLinearNet

    monkeypatch.chdir(tmp_path)
    assert len(WJ) == 7
    for i, path in enumerate(WJ):
        logger = [f"--trainer.logger.init_args.save_dir={tmp_path}"] if i == 0 else ["--trainer.logger=false"]
        cli = run(["fit", "--config", path, "--trainer.max_steps=20", *logger])
        assert isinstance(cli.model, DeepLinearNet) and cli.model.replicas.count == 16
        assert isinstance(cli.datamodule, ObservedEntriesDataModule) and cli.datamodule.batch_size == 1
        assert cli.trainer.global_step == 20
        (sv,) = [c for c in cli.trainer.callbacks if isinstance(c, SingularValues)]
        assert [h[0] for h in sv.replica_history["sv/ratio2"]] == [0, 10, 20]
        (sched,) = [c for c in cli.trainer.callbacks if isinstance(c, HyperparameterSchedule)]
        assert sched.values(0)["lr"] in (0.03, 0.02)  # the warm-up (or E3's t0 = 0 cell)
    assert len(glob.glob(str(tmp_path / "wandb" / "offline-run-*"))) == 1


def test_wang_jacot_schedules_say_what_their_comments_say():
    from lightning.pytorch import LightningDataModule, LightningModule
    from lightning.pytorch.cli import LightningCLI

    from lightning_flat.callbacks import HyperparameterSchedule

    def load(name):
        (path,) = [p for p in WJ if p.endswith(name)]
        cli = LightningCLI(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                           run=False, args=["--config", path, "--trainer.logger=false"])
        (sched,) = [c for c in cli.trainer.callbacks if isinstance(c, HyperparameterSchedule)]
        return cli, sched

    cli, s = load("e1_offshoot_schedule.yaml")  # main path until 2000, then the low phase
    assert s.values(499) == {"lr": 0.03, "weight_decay": 0.1} and s.values(1999) == {"lr": 0.2, "weight_decay": 0.1}
    assert s.values(2000) == {"lr": 0.02, "weight_decay": 0.001}
    cli, s = load("e4_schedule.yaml")
    assert [s.values(t)["lr"] for t in (0, 500, 1499, 1500, 2499, 2500, 8499)] == [0.03, 0.4, 0.4, 0.1, 0.1, 0.4, 0.1]
    assert s.values(1500)["weight_decay"] == 0.001 and s.values(2500)["weight_decay"] == 0.1
    cli, s = load("e5_shuffle.yaml")
    assert cli.datamodule.sampling == "shuffle" and cli.model.dims == [2, 100, 100, 100, 2]


def test_full_size_gatmiry_configs_train_as_they_are(tmp_path, monkeypatch):
    """Each full-size YAML trains through the CLI as committed (a few steps; loggers off)."""
    import glob as _glob

    monkeypatch.chdir(tmp_path)
    for path in sorted(_glob.glob(os.path.join(os.path.dirname(CONFIG), "*.yaml"))):
        cli = run(["fit", "--config", path, "--trainer.max_steps=5", "--trainer.logger=false"])
        assert cli.trainer.global_step == 5
