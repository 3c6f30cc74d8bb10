"""The sweep runner on the local engine: worker processes and the driver's own process give the same per-trial
results; a sweep stopped half-way finishes only the missing trials when started again; failed trials are named at the
end with every other trial kept. The Ray engine: test_sweep_ray.py."""

import json
import os
import re

import pytest

from lightning_flat.sweep import SweepError, load_results, run_sweep, trial_key
from sweep_trials import misbehave, train_block, unloadable

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
    for kw, message in [(dict(retries=-1), "retries must be a non-negative int, got -1"),
                        (dict(trial_timeout=0), "trial_timeout must be > 0.0, got 0.0"),
                        (dict(cpus_per_trial=0), "cpus_per_trial must be a positive int, got 0"),
                        (dict(gpus_per_trial=-1), "gpus_per_trial must be >= 0.0, got -1.0"),
                        (dict(gpus_per_trial=1), "gpus_per_trial is for engine='ray', got gpus_per_trial=1.0"),
                        (dict(address="auto"), "address is for engine='ray', got address='auto'"),
                        (dict(runtime_env={"pip": []}), "runtime_env is for engine='ray'")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            run_sweep(train_block, GRID, str(tmp_path), **kw)
    assert not os.path.exists(tmp_path / "train_block.jsonl")  # refused before anything ran



def misbehaving_grid(tmp_path):
    """Four trials that succeed, one that raises, one whose process dies, one that hangs, one that fails its first
    attempt only."""
    dos = ["ok", "raise", "ok", "die", "ok", "hang", "ok", "flaky"]
    return [{"do": do, "i": i, "counter": str(tmp_path / f"attempts{i}")} for i, do in enumerate(dos)]


def check_failures(err, grid, path, retries):
    """The error names each failed config (its JSON) and its cause, without colour codes; every other trial is kept
    in the results file."""
    message = str(err)
    assert "\x1b" not in message
    failed = {f["config"]["do"]: f for f in err.failures}
    assert sorted(failed) == ["die", "hang", "raise"]
    for f in err.failures:
        assert json.dumps(f["config"], sort_keys=True) in message and f["error"] in message
        assert f["attempts"] == retries + 1
    assert failed["raise"]["error"].startswith("ValueError: bad value 1 (at sweep_trials.py:")
    assert "its worker died" in failed["die"]["error"]
    assert failed["hang"]["error"] == "timed out after 2 s (its worker was stopped)"
    kept = load_results(path)
    ok = [c for c in grid if c["do"] in ("ok", "flaky")]
    assert sorted(kept) == sorted(trial_key(c) for c in ok) == sorted(r["key"] for r in err.rows)
    for c in ok:  # exact values: the trial computes i * i, or counts its attempts
        expected = {"i": c["i"], "attempt": 2} if c["do"] == "flaky" else {"i": c["i"], "square": c["i"] ** 2}
        assert kept[trial_key(c)]["result"] == expected


@pytest.mark.timeout(120)
def test_failed_trials_named_at_the_end_others_kept_local(tmp_path):
    grid = misbehaving_grid(tmp_path)
    with pytest.raises(SweepError) as info:
        run_sweep(misbehave, grid, str(tmp_path / "sweep"), workers=2, retries=1, trial_timeout=2)
    check_failures(info.value, grid, str(tmp_path / "sweep" / "misbehave.jsonl"), retries=1)


def test_failed_trials_inline(tmp_path):
    grid = [c for c in misbehaving_grid(tmp_path) if c["do"] in ("ok", "raise", "flaky")]
    grid.append({"do": "bad_result", "i": 9})
    with pytest.raises(SweepError) as info:
        run_sweep(misbehave, grid, str(tmp_path), workers=1)
    causes = {f["config"]["do"]: f["error"] for f in info.value.failures}
    assert causes["raise"].startswith("ValueError: bad value 1")
    assert causes["flaky"].startswith("RuntimeError: the first attempt fails")  # no retries
    assert causes["bad_result"].startswith("TypeError: trial_fn must return a JSON-able dict")
    assert len(load_results(str(tmp_path / "misbehave.jsonl"))) == 4  # the four "ok"
    # started again, only the failed trials run (and the flaky one now passes)
    ran = []
    with pytest.raises(SweepError):
        run_sweep(misbehave, grid, str(tmp_path), workers=1, progress=lambda r: ran.append(r["config"]["do"]))
    assert ran == ["flaky"]


def test_ray_chunk_is_deprecated_and_ignored(tmp_path):
    configs = [{"do": "ok", "i": i} for i in range(3)]
    with pytest.warns(DeprecationWarning, match="ray_chunk"):
        rows = run_sweep(misbehave, configs, str(tmp_path), workers=1, ray_chunk=2)
    assert [r["result"] for r in rows] == [{"i": i, "square": i * i} for i in range(3)]


@pytest.mark.timeout(120)
def test_workers_that_cannot_start_fail_at_start(tmp_path):
    with pytest.raises(RuntimeError, match="the sweep's workers could not start, 2 trials left unrun: the trial "
                                           "function does not load in a worker process: ModuleNotFoundError"):
        run_sweep(unloadable(), [{"i": 0}, {"i": 1}], str(tmp_path), workers=2)
    assert not os.path.exists(tmp_path / "trial.jsonl")
