"""The lightning-flat command's help names what the library offers; a config without a progress bar gets a
StepProgressBar (plain lines when stdout is not a terminal)."""

import os

import pytest
import yaml

from lightning_flat.cli import overview, run

CONFIG = os.path.join(os.path.dirname(__file__), "..", "examples", "gatmiry2023", "quick.yaml")


def test_help_names_the_models_datamodules_and_callbacks(capsys):
    with pytest.raises(SystemExit) as exit_:
        run(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(overview())
    for name in ("DeepLinearNet", "QuadraticNet", "ResidualLinearNet", "MatrixSensingDataModule",
                 "ObservedEntriesDataModule", "HessianTrace", "Sharpness", "LabelNoise", "StepProgressBar"):
        assert f"\n  {name} " in out, name
    assert "lightning-flat fit --help" in out and "usage: lightning-flat" in out  # then Lightning's own help
    assert "LinearNetBase" not in out and "StepChunk" not in out  # bases and helpers are not for a config
    assert "`" not in overview() and ":math:" not in overview() and max(map(len, overview().splitlines())) <= 118


def test_a_config_without_a_progress_bar_prints_lines(tmp_path, monkeypatch, capsys):
    cfg = yaml.safe_load(open(CONFIG))
    cfg["trainer"]["callbacks"] = [c for c in cfg["trainer"]["callbacks"] if "ProgressBar" not in c["class_path"]]
    cfg["trainer"]["logger"] = False
    path = tmp_path / "no_bar.yaml"
    path.write_text(yaml.safe_dump(cfg))
    monkeypatch.chdir(tmp_path)
    cli = run(["fit", "--config", str(path), "--trainer.max_steps=30"])
    from lightning_flat.callbacks import StepProgressBar

    bar = cli.trainer.progress_bar_callback
    assert type(bar) is StepProgressBar and bar.printing and cli.model.engine.mode == "fused"
    out = capsys.readouterr().out
    assert "train: done, step 30/30" in out and "\r" not in out


def test_help_summaries_read_math_as_text():
    """The one-line summaries turn a docstring's Markdown math into readable text: LaTeX commands become words or
    symbols, each its own token (not glued to the next one), subscripts stay attached."""
    from lightning_flat.callbacks import Balancedness
    from lightning_flat.cli import _summary
    from lightning_flat.datamodules import MatrixSensingDataModule

    assert _summary(MatrixSensingDataModule) == "Gaussian matrix sensing: b_i = < A_i, M^*> + sigma eps_i"
    assert _summary(Balancedness) == "Log sum_j||W_j+1^T W_j+1 - W_jW_j^T||_F every every_n_steps"
