"""The sweep runner: local pool and Ray give the same per-trial results; a sweep stopped half-way finishes only the
missing trials when started again."""

import json
import os

import pytest

from lightning_flat.sweep import load_results, run_sweep, trial_key
from sweep_trials import train_block

GRID = [{"lr": lr, "block": b} for lr in (0.02, 0.05) for b in range(2)]


class Stop(RuntimeError):
    pass


def test_local_pool_equals_in_process(tmp_path):
    pooled = run_sweep(train_block, GRID, str(tmp_path / "a"), workers=2)
    inline = run_sweep(train_block, GRID, str(tmp_path / "b"), workers=1)
    assert [r["config"] for r in pooled] == GRID
    # the same trial is the same computation, in whichever process: bitwise equal
    assert [r["result"] for r in pooled] == [r["result"] for r in inline]
    assert all(len(r["result"]["losses"]) == 3 for r in pooled)


def test_resume_runs_only_the_missing_trials(tmp_path):
    folder = str(tmp_path)
    seen = []

    def stop_after_two(row):
        seen.append(row["key"])
        if len(seen) == 2:
            raise Stop  # the sweep dies here, as if killed, with 2 of 4 trials written

    with pytest.raises(Stop):
        run_sweep(train_block, GRID, folder, workers=1, progress=stop_after_two)
    path = os.path.join(folder, "train_block.jsonl")
    with open(path, "a") as f:
        f.write('{"key": "truncated by the kill", "conf')  # a half-written last line
    assert len(load_results(path)) == 2
    resumed = []
    rows = run_sweep(train_block, GRID, folder, workers=1, progress=lambda r: resumed.append(r["key"]))
    assert sorted(resumed) == sorted(trial_key(c) for c in GRID[2:])  # only the missing two ran
    fresh = run_sweep(train_block, GRID, str(tmp_path / "fresh"), workers=1)
    assert [r["result"] for r in rows] == [r["result"] for r in fresh]


def test_resume_false_starts_afresh(tmp_path):
    run_sweep(train_block, GRID[:2], str(tmp_path), workers=1)
    ran = []
    run_sweep(train_block, GRID[:2], str(tmp_path), workers=1, resume=False, progress=lambda r: ran.append(r["key"]))
    assert len(ran) == 2 and len(load_results(str(tmp_path / "train_block.jsonl"))) == 2


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="engine must be one of 'local', 'ray'"):
        run_sweep(train_block, GRID, str(tmp_path), engine="slurm")
    with pytest.raises(ValueError, match="configs must be distinct"):
        run_sweep(train_block, [GRID[0], dict(GRID[0])], str(tmp_path))


def test_ray_gives_the_local_results(tmp_path):
    pytest.importorskip("ray.tune")
    local = run_sweep(train_block, GRID, str(tmp_path / "local"), workers=2)
    ray_rows = run_sweep(train_block, GRID, str(tmp_path / "ray"), engine="ray", workers=2)
    assert [r["engine"] for r in ray_rows] == ["ray"] * 4
    assert [r["result"] for r in ray_rows] == [r["result"] for r in local]
    # and a Ray sweep resumes from the same file: nothing left to run
    again = run_sweep(train_block, GRID, str(tmp_path / "ray"), engine="ray", workers=2)
    assert json.dumps([r["result"] for r in again]) == json.dumps([r["result"] for r in ray_rows])
