"""One grid runner: the trials of a sweep in local worker processes (the default) or on Ray (``engine="ray"``),
resumable.

A sweep is a function ``trial_fn(config) -> dict`` (JSON-able in and out, importable by the workers, e.g. defined at
a module's top level) and a list of configs. Each trial's result is appended to ``<folder>/<name>.jsonl`` (and
fsync'd) the moment it ends, keyed by its config, so a sweep killed half-way and started again runs only the trials
that have no result yet, whichever engine ran the others. A trial is typically a block of replicas of one
lightning_flat model (seeds or hyperparameters trained at the cost of one run), so a grid is "configs x replicas".

- ``engine="local"``: ``workers`` ``spawn`` processes (``cpus_per_trial`` BLAS threads each) that run one trial
  after another; ``workers=1`` without ``trial_timeout`` runs the trials in this process.
- ``engine="ray"``: ``workers`` Ray actors with ``cpus_per_trial`` CPUs and ``gpus_per_trial`` GPUs each, on the
  cluster at ``address`` (``"auto"`` inside a cluster job, or ``"host:port"`` of a ``ray start --head``) or, with
  ``address=None``, on a Ray instance of its own started for the sweep. Each actor imports torch once and runs trial
  after trial; the driver takes the results as they come (``ray.wait``). The trial code travels with a
  ``runtime_env``, the files a trial writes come back to the driver
  ([`trial_folder`][lightning_flat.sweep.trial_folder]): nodes need no copy of the project. Install it with
  ``pip install "lightning-flat[ray]"``.

Worker processes are reused, so a trial must not depend on what an earlier trial left in its process (as on a
cluster). The same config gives the same result with either engine (the trial function seeds everything from its
config). A trial that raises, whose worker dies, or that runs past ``trial_timeout`` is tried again up to
``retries`` times; the trials that still fail are named, with their causes, in one
[`SweepError`][lightning_flat.sweep.SweepError] raised once every other trial has run and been kept.

Examples:
    >>> import tempfile
    >>> from lightning_flat.sweep import run_sweep
    >>> folder = tempfile.mkdtemp()
    >>> rows = run_sweep(_demo_trial, [{"x": -1}, {"x": 2}], folder, workers=1)
    >>> [r["result"]["y"] for r in rows]
    [1, 4]
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from lightning_flat._sweep_trial import trial_folder

__all__ = ["run_sweep", "trial_key", "load_results", "trial_folder", "SweepError", "add_sweep_arguments", "ENGINES"]

ENGINES = ("local", "ray")


def _demo_trial(config: dict) -> dict:
    return {"y": config["x"] ** 2}


def trial_key(config: dict[str, Any]) -> str:
    """A stable key of a trial's config (its sorted JSON, hashed)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def load_results(path: str) -> dict[str, dict]:
    """The finished trials of a results file: ``key -> row`` (a truncated last line, from a killed run, is
    ignored)."""
    out: dict[str, dict] = {}
    if not os.path.exists(path):
        return out
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            out[row["key"]] = row
    return out


class SweepError(RuntimeError):
    """Trials that failed after their retries, raised once every other trial of the sweep has run and been kept.

    ``failures``: one dict per failed trial, ``{"key", "config", "error", "traceback", "attempts"}`` (``error`` is
    the cause in one line, e.g. ``ValueError: ... (at trials.py:12 in train)``); ``rows``: the finished trials' rows,
    in the order of the configs given. Started again (``resume=True``), the sweep runs only the failed trials."""

    def __init__(self, failures: list[dict], rows: list[dict], path: str) -> None:
        self.failures, self.rows, self.path = failures, rows, path
        lines = [f"{len(failures)} of {len(failures) + len(rows)} trials failed (the other {len(rows)} are kept in "
                 f"{path}; run the sweep again to retry only these):"]
        for f in failures:
            again = f" [{f['attempts']} attempts]" if f["attempts"] > 1 else ""
            lines.append(f"  {json.dumps(f['config'], sort_keys=True)}: {f['error']}{again}")
        super().__init__("\n".join(lines))


def _write_files(files: list) -> None:
    """Write a trial's returned files under their folders on this machine (each whole or not at all)."""
    from lightning_flat.io import atomic_path

    for folder, name, data in files:
        with atomic_path(os.path.join(folder, name)) as tmp:
            with open(tmp, "wb") as f:
                f.write(data)


# -------------------------------------------------------------------------------------------------- driver side
def _append(path: str, row: dict) -> None:
    # one write of one line per finished trial: a kill leaves at most a truncated last line, which load_results skips
    with open(path, "a") as f:
        f.write(json.dumps(row, allow_nan=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def run_sweep(trial_fn: Callable[[dict], dict], configs: Iterable[dict[str, Any]], folder: str, *,
              name: str | None = None, engine: str = "local", workers: int = 2, address: str | None = None,
              cpus_per_trial: int = 1, gpus_per_trial: float = 0, retries: int = 0,
              trial_timeout: float | None = None, runtime_env: dict | None = None, resume: bool = True,
              progress: Callable[[dict], None] | None = None, ray_chunk: int | None = None) -> list[dict]:
    """Run ``trial_fn(config)`` for every config that has no result in ``<folder>/<name>.jsonl`` yet (``name``
    defaults to the function's name), with ``engine``; returns one row per config, in the order given:
    ``{"key", "config", "result", "seconds", "engine"}``.

    Each finished trial is appended to the file the moment its result reaches this process, then ``progress(row)``
    is called (here). ``resume=False`` starts the results file afresh (a new sweep); by default the trials it holds
    are kept and only the others run. ``workers`` trials run at once at most, on either engine (with ``address``
    too: the concurrency cap on a cluster). A failed trial (it raised, its worker died, or it ran longer than
    ``trial_timeout`` seconds, counted from its start on a ready worker) is run again up to ``retries`` times; the
    ones that still fail raise one [`SweepError`][lightning_flat.sweep.SweepError] at the end, naming each config and
    its cause.

    Ray only: ``address`` (``None``: a Ray instance of its own with ``workers * cpus_per_trial`` CPUs, shut down at
    the end), ``gpus_per_trial`` (fractions allowed) and ``runtime_env``, merged into the one the sweep builds (it
    ships ``lightning_flat`` and the trial function's module or script folder as ``py_modules`` / ``working_dir``;
    add e.g. ``{"pip": [...]}`` or ``{"env_vars": {...}}``). ``ray_chunk`` is deprecated and ignored: Ray workers
    are reused, so one trial per task costs no start-up."""
    # the checks import torch: here, not at the module's top, so that a worker process imports it only if its
    # trials do
    from lightning_flat._checks import check_bool, check_choice, check_nonnegative_int, check_positive_int, check_real

    if not callable(trial_fn):
        raise TypeError(f"trial_fn must be a function config -> dict, got {trial_fn!r}")
    name = name or getattr(trial_fn, "__name__", "sweep")
    check_choice("engine", engine, ENGINES)
    workers = check_positive_int("workers", workers)
    cpus_per_trial = check_positive_int("cpus_per_trial", cpus_per_trial)
    gpus_per_trial = check_real("gpus_per_trial", gpus_per_trial, low=0.0)
    retries = check_nonnegative_int("retries", retries)
    if trial_timeout is not None:
        trial_timeout = check_real("trial_timeout", trial_timeout, low=0.0, low_open=True)
    if engine == "local":
        for arg, value, unset in (("address", address, None), ("gpus_per_trial", gpus_per_trial, 0.0),
                                  ("runtime_env", runtime_env, None)):
            if value != unset:
                raise ValueError(f"{arg} is for engine='ray', got {arg}={value!r} with engine='local'")
    if runtime_env is not None and not isinstance(runtime_env, dict):
        raise TypeError(f"runtime_env must be a dict (Ray's runtime_env), got {type(runtime_env).__name__}")
    if ray_chunk is not None:
        check_positive_int("ray_chunk", ray_chunk)
        warnings.warn("run_sweep(ray_chunk=...) is deprecated and ignored: Ray workers now run trial after trial",
                      DeprecationWarning, stacklevel=2)
    configs = [dict(c) for c in configs]
    keys = [trial_key(c) for c in configs]
    if len(set(keys)) != len(keys):
        raise ValueError("configs must be distinct: two trials have the same config")
    from lightning_flat.io import output_folder

    output_folder(folder)
    path = os.path.join(folder, f"{name}.jsonl")
    if not check_bool("resume", resume) and os.path.exists(path):
        os.remove(path)
    done = load_results(path)
    todo = [(k, c) for k, c in zip(keys, configs) if k not in done]

    def finish(key: str, config: dict, outcome: dict) -> None:
        _write_files(outcome.get("files", ()))  # a trial's files first: a kept row always has its files
        row = {"key": key, "config": config, "result": outcome["result"], "seconds": outcome["seconds"],
               "engine": engine}
        _append(path, row)
        done[key] = row
        if progress is not None:
            progress(row)

    failures: list[dict] = []
    if todo:
        if engine == "ray":
            from lightning_flat._sweep_workers import RayWorkers

            pool = RayWorkers(trial_fn, min(workers, len(todo)), address, cpus_per_trial, gpus_per_trial,
                              runtime_env)
        elif (workers == 1 or len(todo) == 1) and trial_timeout is None:
            from lightning_flat._sweep_workers import InlineWorker

            pool = InlineWorker(trial_fn)
        else:
            from lightning_flat._sweep_workers import ProcessWorkers

            pool = ProcessWorkers(trial_fn, min(workers, len(todo)), cpus_per_trial)
        with pool:
            failures = _schedule(pool, todo, retries, trial_timeout, finish)
    rows = [done[k] for k in keys if k in done]
    if failures:
        raise SweepError(failures, rows, path)
    return rows


def _schedule(pool: Any, todo: list[tuple[str, dict]], retries: int, trial_timeout: float | None,
              finish: Callable[[str, dict, dict], None]) -> list[dict]:
    """Send the trials to the pool's workers as they become free, keep each result as it comes, retry or record the
    failures; returns the failures. ``pool``: ``size``, ``start(slot)``, ``submit(slot, config)``, ``kill(slot)``
    and ``wait(timeout) -> [(slot, event, payload)]`` with the events ``ready``, ``done`` (the trial's outcome),
    ``lost`` (the worker died; its cause) and ``broken`` (the worker could not start; its cause)."""
    queue = deque((key, config, 1) for key, config in todo)
    running: dict[int, tuple[str, dict, int, float]] = {}
    idle: list[int] = []
    starting = set(range(pool.size))
    broken: list[str] = []
    failures: list[dict] = []
    for slot in sorted(starting):
        pool.start(slot)

    def failed(key: str, config: dict, attempt: int, error: str, tb: str = "") -> None:
        if attempt <= retries:
            queue.append((key, config, attempt + 1))
        else:
            failures.append({"key": key, "config": config, "error": error, "traceback": tb, "attempts": attempt})

    def restart(slot: int) -> None:
        if queue:
            pool.start(slot)
            starting.add(slot)

    while queue or running:
        while idle and queue:
            slot = idle.pop()
            key, config, attempt = queue.popleft()
            pool.submit(slot, config)
            running[slot] = (key, config, attempt, time.monotonic())
        if not running and not starting:
            raise RuntimeError(f"the sweep's workers could not start, {len(queue)} trials left unrun: "
                               + "; ".join(dict.fromkeys(broken)))
        timeout = None
        if trial_timeout is not None and running:
            timeout = max(0.0, min(t for *_, t in running.values()) + trial_timeout - time.monotonic())
        for slot, event, payload in pool.wait(timeout):
            if event == "ready":
                starting.discard(slot)
                idle.append(slot)
            elif event == "broken":
                starting.discard(slot)
                broken.append(payload)
            elif event == "done" and slot in running:
                key, config, attempt, _ = running.pop(slot)
                idle.append(slot)
                if payload["ok"]:
                    finish(key, config, payload)
                else:
                    failed(key, config, attempt, payload["error"], payload["traceback"])
            elif event == "lost":
                if slot in idle:
                    idle.remove(slot)
                if slot in running:
                    key, config, attempt, _ = running.pop(slot)
                    failed(key, config, attempt, f"its worker died: {payload}")
                restart(slot)
        if trial_timeout is not None:
            now = time.monotonic()
            for slot, (key, config, attempt, t0) in list(running.items()):
                if now - t0 >= trial_timeout:
                    pool.kill(slot)
                    del running[slot]
                    failed(key, config, attempt, f"timed out after {trial_timeout:g} s (its worker was stopped)")
                    restart(slot)
    return failures


def add_sweep_arguments(parser, what: str = "trials") -> None:
    """The command-line options of an example that runs a sweep: ``--engine``, ``--address`` and ``--resume``."""
    parser.add_argument("--engine", choices=ENGINES, default="local",
                        help=f"run the {what} in local worker processes (default) or on Ray")
    parser.add_argument("--address", default=None,
                        help="Ray cluster address, e.g. auto or HOST:6379 (with --engine ray; default: a Ray "
                             "instance of its own on this machine); --workers caps the trials run at once")
    parser.add_argument("--resume", action="store_true",
                        help=f"keep the {what} a stopped run finished (in OUT/sweep) and run only the others")
