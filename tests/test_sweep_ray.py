"""The sweep runner on Ray, on a Ray instance of its own (``address=None``) and on a real cluster started with
``ray start --head`` and joined by ``address=``: the local engine's results bit for bit, each trial kept as it ends
(a killed sweep restarts with exactly the missing trials), failed trials named at the end with every other trial
kept, the trial code shipped and the files it writes brought back to the driver."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

# Ray keeps a process's first authentication mode: every driver here uses token authentication, the mode ray.init
# sets for the instances it starts and the default of ``ray start`` (the token: Ray's own ~/.ray/auth_token)
os.environ.setdefault("RAY_AUTH_MODE", "token")
ray = pytest.importorskip("ray")

from lightning_flat.sweep import SweepError, load_results, run_sweep, trial_key  # noqa: E402
from sweep_trials import gated, misbehave, probe, train_block, unloadable  # noqa: E402
from test_sweep import GRID, Stop, check_failures, misbehaving_grid  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]  # a guard against hangs, not a speed check
TESTS = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module", autouse=True)
def ray_environment():
    """The Ray instances of these tests keep their files (sockets, logs) in a short folder of their own."""
    tmp, saved = tempfile.mkdtemp(prefix="ray", dir="/tmp"), os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = tmp
    yield tmp
    if saved is None:
        os.environ.pop("RAY_TMPDIR", None)
    else:
        os.environ["RAY_TMPDIR"] = saved
    shutil.rmtree(tmp, ignore_errors=True)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port(address):
    return address.rsplit(":", 1)[1]


def _session_pids(sid):
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == sid:
                    pids.append(int(entry))
            except OSError:
                pass
    return pids


def _stop(proc):
    """Stop a ``ray start --block`` by PID: SIGTERM (it stops the processes it started), then SIGKILL to any process
    of its session still there."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        pass
    for pid in _session_pids(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:  # it ended meanwhile
            pass
    proc.wait(10)


def _start_head(tmp, attempt):
    """``ray start --head --block`` on free ports in a session of its own; returns ``(process, address)`` once it
    runs, or ``(None, its log)`` if it exited first (e.g. a port taken meanwhile by another process)."""
    port = _free_port()
    log_path = os.path.join(tmp, f"start{attempt}.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [os.path.join(os.path.dirname(sys.executable), "ray"), "start", "--head", "--block", f"--port={port}",
             f"--temp-dir={tmp}", "--num-cpus=2", "--include-dashboard=false", f"--dashboard-port={_free_port()}",
             f"--dashboard-agent-listen-port={_free_port()}", "--disable-usage-stats"],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True)
    deadline = time.monotonic() + 300  # a guard: seconds on an idle machine
    while "Ray runtime started" not in open(log_path).read():
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop(proc)
            return None, open(log_path).read()[-3000:]
        time.sleep(0.5)
    return proc, f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def cluster():
    """A real Ray cluster on this machine: ``ray start --head`` with its own temp folder, stopped by its PIDs."""
    tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths have a length limit
    proc = None
    try:
        for attempt in range(3):
            proc, address = _start_head(tmp, attempt)
            if proc is not None:
                break
        assert proc is not None, f"ray start failed three times; the last log:\n{address}"
        yield address
    finally:
        if proc is not None:
            _stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)


def test_ray_keeps_each_trial_as_it_ends_and_gives_the_local_results(tmp_path):
    folder = str(tmp_path / "ray")
    path = os.path.join(folder, "train_block.jsonl")
    seen = []

    def stop_after_two(row):
        # the row is in the file (fsync'd) before progress hears of it
        seen.append(row["key"])
        assert sorted(load_results(path)) == sorted(seen)
        if len(seen) == 2:
            raise Stop  # the driver dies here with 2 trials kept; the others were running or waiting

    with pytest.raises(Stop):
        run_sweep(train_block, GRID, folder, engine="ray", workers=2, progress=stop_after_two)
    assert not ray.is_initialized()  # its own instance, shut down even on an error
    assert len(load_results(path)) == 2
    resumed = []
    rows = run_sweep(train_block, GRID, folder, engine="ray", workers=2, progress=lambda r: resumed.append(r["key"]))
    assert sorted(resumed) == sorted(set(trial_key(c) for c in GRID) - set(seen))  # exactly the missing ones
    assert [r["engine"] for r in rows] == ["ray"] * 4 and [r["config"] for r in rows] == GRID
    # the same trial is the same computation in whichever process: bit for bit the in-process results
    inline = run_sweep(train_block, GRID, str(tmp_path / "inline"), workers=1)
    assert [r["result"] for r in rows] == [r["result"] for r in inline]


def test_ray_failed_trials_named_at_the_end_others_kept(tmp_path):
    grid = misbehaving_grid(tmp_path)
    with pytest.raises(SweepError) as info:
        run_sweep(misbehave, grid, str(tmp_path / "sweep"), engine="ray", workers=2, retries=1, trial_timeout=2)
    check_failures(info.value, grid, str(tmp_path / "sweep" / "misbehave.jsonl"), retries=1)


def check_probe(rows, out, workers, cpus, shipped):
    """The trials ran on ``workers`` reused processes with ``cpus`` CPUs each, from shipped copies of their code (on
    a cluster) or from this process's files (on a Ray instance of its own), and every file they wrote under
    trial_folder came back, byte for byte (symbolic links excepted)."""
    import lightning_flat

    results = [r["result"] for r in rows]
    assert len({r["pid"] for r in results}) <= workers
    for r in results:
        assert r["resources"] == {"CPU": float(cpus)} and r["omp"] == str(cpus)
        assert r["out_name"] == os.path.basename(out)  # the scratch folder has the base name of the driver's
        if shipped:  # from the runtime_env's copies, not the driver's files
            assert "runtime_resources" in r["module"] and "runtime_resources" in r["lightning_flat"]
        else:
            assert (r["module"], r["lightning_flat"]) == (sys.modules["sweep_trials"].__file__, lightning_flat.__file__)
    names = sorted(os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs)
    assert names == sorted([f"{i}.txt" for i in range(len(rows))] + [f"nested/{i}.bin" for i in range(len(rows))])
    for i in range(len(rows)):
        assert open(os.path.join(out, f"{i}.txt")).read() == f"trial {i}\n"
        assert open(os.path.join(out, "nested", f"{i}.bin"), "rb").read() == bytes(range(256)) * (i + 1)


def test_address_none_starts_its_own_instance(cluster, tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", cluster)  # even with a running cluster named in the environment
    out = str(tmp_path / "files")
    rows = run_sweep(probe, [{"i": i, "out": out} for i in range(4)], str(tmp_path / "sweep"), engine="ray", workers=2)
    assert all(_port(r["result"]["gcs"]) != _port(cluster) for r in rows)
    check_probe(rows, out, workers=2, cpus=1, shipped=False)


def test_cluster_sweep(cluster, tmp_path):
    """Through ``address=``: the in-process results bit for bit; the concurrency cap (one worker: one process for
    every trial) and cpus_per_trial honoured; the code shipped and the files brought back."""
    rows = run_sweep(train_block, GRID, str(tmp_path / "c"), engine="ray", address=cluster, workers=2)
    inline = run_sweep(train_block, GRID, str(tmp_path / "inline"), workers=1)
    assert [r["result"] for r in rows] == [r["result"] for r in inline]
    out = str(tmp_path / "files")
    rows = run_sweep(probe, [{"i": i, "out": out} for i in range(3)], str(tmp_path / "p"), engine="ray",
                     address=cluster, workers=1, cpus_per_trial=2)
    assert all(_port(r["result"]["gcs"]) == _port(cluster) for r in rows)
    check_probe(rows, out, workers=1, cpus=2, shipped=True)


def test_cluster_refusals_at_start(cluster, tmp_path):
    """Resources no node has, and workers that cannot load the trial function: refused before any trial runs."""
    with pytest.raises(ValueError, match=r"gpus_per_trial=1 \(its nodes: 2 CPU, 0 GPU\)"):
        run_sweep(misbehave, [{"do": "ok", "i": 0}], str(tmp_path), engine="ray", address=cluster, gpus_per_trial=1)
    assert not ray.is_initialized() and not os.path.exists(tmp_path / "misbehave.jsonl")
    with pytest.raises(RuntimeError, match="the sweep's workers could not start, 2 trials left unrun: .*"
                                           "ModuleNotFoundError: No module named 'sweep_trials_nowhere'") as info:
        run_sweep(unloadable(), [{"i": 0}, {"i": 1}], str(tmp_path), engine="ray", address=cluster)
    assert "\x1b" not in str(info.value) and not os.path.exists(tmp_path / "trial.jsonl")


DRIVER = """
import json, sys
sys.path.insert(0, {tests!r})
from lightning_flat.sweep import run_sweep
from sweep_trials import gated
run_sweep(gated, json.loads(sys.argv[1]), {folder!r}, engine="ray", address={address!r}, workers=2)
"""


def test_killed_driver_restarts_with_exactly_the_missing_trials(cluster, tmp_path):
    """A driver killed (SIGKILL) after two of six trials finished: the restart runs exactly the other four."""
    gate = tmp_path / "gate"
    gate.write_text("")
    configs = [{"i": i, "gate": str(gate)} for i in range(6)]
    folder = str(tmp_path / "sweep")
    path = os.path.join(folder, "gated.jsonl")
    code = DRIVER.format(tests=TESTS, folder=folder, address=cluster)
    proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(configs)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        # trials 0 and 1 return at once, the others wait at the gate (a hang is caught by the module's timeout)
        while len(load_results(path)) < 2:
            assert proc.poll() is None
            time.sleep(0.2)
    finally:
        proc.kill()
        proc.wait(30)
    kept = load_results(path)
    assert sorted(kept) == sorted(trial_key(c) for c in configs[:2])
    gate.unlink()
    ran = []
    rows = run_sweep(gated, configs, folder, engine="ray", address=cluster, workers=2,
                     progress=lambda r: ran.append(r["config"]["i"]))
    assert sorted(ran) == [2, 3, 4, 5]
    assert [r["result"] for r in rows] == [{"i": i} for i in range(6)]
    assert [r["seconds"] for r in rows[:2]] == [kept[trial_key(c)]["seconds"] for c in configs[:2]]  # kept as was
