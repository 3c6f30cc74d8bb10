"""Two real CPU processes under strategy="ddp" log the curvature of the union of their batches: the same values
as one process on that union."""

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(__file__)
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))


def run(devices, tmp_path):
    out = tmp_path / f"ddp{devices}.json"
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run([sys.executable, os.path.join(HERE, "ddp_run.py"), "--devices", str(devices), "--out",
                           str(out)], capture_output=True, text=True, timeout=300, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_two_process_ddp_logs_the_single_process_values(tmp_path):
    single, ddp = run(1, tmp_path), run(2, tmp_path)
    assert ddp["world_size"] == 2 and single["world_size"] == 1
    for key in ("hessian/trace", "hessian/sharpness"):
        s, d = single["history"][key], ddp["history"][key]
        assert [x[0] for x in s] == [x[0] for x in d] == [0, 3, 6, 9]  # logged once per step (rank 0 only)
        for (_, a), (_, b) in zip(s, d):
            assert abs(a - b) <= 1e-6 * abs(a), (key, a, b)
    # the training itself matched too (DDP averages the ranks' gradients)
    flat = lambda r: [x for p in r["params"] for x in p]  # noqa: E731
    assert max(abs(a - b) for a, b in zip(flat(single), flat(ddp))) < 1e-10
