"""StepProgressBar: plain lines every N steps when stdout is not a terminal (no carriage returns), Lightning's bar
otherwise, and the fused engine path kept."""

import re

import lightning as L
import pytest

from lightning_flat.callbacks import StepProgressBar
from lightning_flat.datamodules import MatrixSensingDataModule
from lightning_flat.models import DeepLinearNet


def fit(bar, max_steps=350):
    dm = MatrixSensingDataModule(n=40, d_out=4, d_in=3, rank=1, batch_size=8, seed=0)
    model = DeepLinearNet([3, 5, 4], lr=0.02, seed=0)
    tr = L.Trainer(max_steps=max_steps, callbacks=[bar], logger=False, enable_checkpointing=False,
                   enable_model_summary=False, precision="64-true", log_every_n_steps=50, accelerator="cpu",
                   devices=1)
    tr.fit(model, dm)
    return model, tr


def test_lines_every_n_steps_on_the_fused_path(capsys):
    bar = StepProgressBar(every_n_steps=100, name="run")
    model, tr = fit(bar)
    out = capsys.readouterr().out
    assert model.engine.mode == "fused", model.engine.reason  # the bar does not force one step per call
    assert tr.progress_bar_callback is bar and bar.printing  # captured stdout is not a terminal
    lines = [line for line in out.splitlines() if line.startswith("run:")]
    assert [int(re.search(r"step (\d+)", line).group(1)) for line in lines] == [100, 200, 300, 350]
    assert lines[0].startswith("run: step 100/350 (29%), ") and "steps/s" in lines[0] and "train/loss" in lines[0]
    assert lines[-1].startswith("run: done, step 350/350 in ")
    assert "\r" not in out


def test_terminal_mode_is_lightnings_bar(capsys):
    bar = StepProgressBar(every_n_steps=100, name="run", lines=False)
    model, _ = fit(bar, max_steps=120)
    out = capsys.readouterr().out
    assert model.engine.mode == "fused" and not bar.printing
    assert "run:" not in out and "\r" in out and "120/" in out  # tqdm's redraws


def test_bad_arguments():
    with pytest.raises(ValueError, match="every_n_steps must be a positive int, got 0"):
        StepProgressBar(every_n_steps=0)
    with pytest.raises(TypeError, match="lines must be True or False, got 'yes'"):
        StepProgressBar(lines="yes")
    with pytest.raises(TypeError, match="name must be a str, got 3"):
        StepProgressBar(name=3)
