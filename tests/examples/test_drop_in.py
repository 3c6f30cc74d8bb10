import math
import os

from helpers import run_example


def test_drop_in_example_logs_curvature(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    history = run_example("drop_in.py", ["--steps", "60", "--out", str(tmp_path)])
    for key in ("hessian/trace", "hessian/trace_stderr", "hessian/sharpness", "hessian/eigenvalue_2", "train/mse"):
        assert key in history and all(math.isfinite(v) for _, v in history[key]), key
    assert [s for s, _ in history["hessian/trace"]] == [0, 50, 60]
    top = {s: v for s, v in history["hessian/sharpness"]}
    assert all(top[s] >= v - 1e-6 * abs(v) for s, v in history["hessian/eigenvalue_1"])
    assert os.path.isdir(tmp_path / "wandb")
