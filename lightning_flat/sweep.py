"""One grid runner: the trials of a sweep in a local process pool (the default) or on a Ray cluster (``engine="ray"``),
resumable.

A sweep is a function ``trial_fn(config) -> dict`` (JSON-able in and out, importable by the workers, e.g. defined at
a module's top level) and a list of configs. Each trial's result is appended to ``<folder>/<name>.jsonl`` the moment
it ends, keyed by its config, so a sweep killed half-way and started again runs only the trials that have no result
yet, whichever engine ran the others. A trial is typically a block of replicas of one lightning_flat model (seeds or
hyperparameters trained at the cost of one run), so a grid is "configs x replicas".

- ``engine="local"``: a ``spawn`` process pool of ``workers`` processes, one trial per task (the processes are
  reused: a trial must not depend on what an earlier trial left in its process, as on a cluster).
- ``engine="ray"``: Ray Tune runs every missing trial as a trial of a grid search with ``cpus_per_trial`` CPUs, on
  the cluster at ``address`` (``"auto"`` inside a cluster job) or on a local Ray instance with ``workers`` CPUs.
  Install it with ``pip install "lightning-flat[ray]"``.

The same config gives the same result with either engine (the trial function seeds everything from its config).

Example:
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
from collections.abc import Callable, Iterable
from typing import Any

from lightning_flat._checks import check_bool, check_choice, check_positive_int

__all__ = ["run_sweep", "trial_key", "load_results", "add_sweep_arguments", "ENGINES"]

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


def _append(path: str, row: dict) -> None:
    # one write of one line per finished trial: a kill leaves at most a truncated last line, which load_results skips
    with open(path, "a") as f:
        f.write(json.dumps(row, allow_nan=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _keyed(args: tuple[str, dict, Callable]) -> tuple[str, dict, tuple[dict, float]]:
    key, config, trial_fn = args
    return key, config, _timed((trial_fn, config))


def _timed(args: tuple[Callable, dict]) -> tuple[dict, float]:
    trial_fn, config = args
    t0 = time.perf_counter()
    result = trial_fn(config)
    return result, time.perf_counter() - t0


def run_sweep(trial_fn: Callable[[dict], dict], configs: Iterable[dict[str, Any]], folder: str, *,
              name: str | None = None, engine: str = "local", workers: int = 2, address: str | None = None,
              cpus_per_trial: int = 1, ray_chunk: int = 1, resume: bool = True,
              progress: Callable[[dict], None] | None = None) -> list[dict]:
    """Run ``trial_fn(config)`` for every config that has no result in ``<folder>/<name>.jsonl`` yet (``name``
    defaults to the function's name), with ``engine``; returns one row per config, in the order given:
    ``{"key", "config", "result", "seconds", "engine"}``. ``progress(row)`` is called as each trial ends (in this
    process). ``resume=False`` starts the results file afresh (a new sweep); by default the trials it holds are
    kept and only the others run. ``ray_chunk`` trials run one after the other in each Ray Tune trial: a Ray trial starts a fresh
    worker process (seconds of imports), so short trials are better grouped."""
    if not callable(trial_fn):
        raise TypeError(f"trial_fn must be a function config -> dict, got {trial_fn!r}")
    name = name or getattr(trial_fn, "__name__", "sweep")
    check_choice("engine", engine, ENGINES)
    workers = check_positive_int("workers", workers)
    cpus_per_trial = check_positive_int("cpus_per_trial", cpus_per_trial)
    ray_chunk = check_positive_int("ray_chunk", ray_chunk)
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

    def finish(key: str, config: dict, result: dict, seconds: float) -> None:
        row = {"key": key, "config": config, "result": result, "seconds": seconds, "engine": engine}
        _append(path, row)
        done[key] = row
        if progress is not None:
            progress(row)

    if todo and engine == "local":
        if workers == 1 or len(todo) == 1:
            for key, config in todo:
                finish(key, config, *_timed((trial_fn, config)))
        else:
            import multiprocessing as mp

            # each worker gets cpus_per_trial threads, as Ray gives its trials (the children read it at import)
            saved = os.environ.get("OMP_NUM_THREADS")
            os.environ.setdefault("OMP_NUM_THREADS", str(cpus_per_trial))
            try:
                pool = mp.get_context("spawn").Pool(min(workers, len(todo)))
            finally:
                if saved is None:
                    os.environ.pop("OMP_NUM_THREADS", None)
            with pool:
                for key, config, (result, seconds) in pool.imap_unordered(_keyed, [(k, c, trial_fn) for k, c in todo]):
                    finish(key, config, result, seconds)
    elif todo:
        _run_ray(todo, trial_fn, folder, name, workers, address, cpus_per_trial, ray_chunk, finish)
    return [done[k] for k in keys]


def _run_ray(todo, trial_fn, folder, name, workers, address, cpus_per_trial, chunk, finish) -> None:
    try:
        import ray
        from ray import tune
    except ImportError as err:  # pragma: no cover - the extra is installed in CI
        raise ImportError('engine="ray" needs Ray Tune: pip install "lightning-flat[ray]"') from err
    started = not ray.is_initialized()
    if started:
        # the trial function's module must import on the workers: put its folder (and this process's path) on
        # their PYTHONPATH (a function of a script's __main__ travels by value)
        import inspect
        import sys

        paths = [p for p in sys.path if p and os.path.isdir(p)]
        source = inspect.getsourcefile(trial_fn) if getattr(trial_fn, "__module__", "") != "__main__" else None
        if source:
            paths.insert(0, os.path.dirname(os.path.abspath(source)))
        runtime_env = {"env_vars": {"PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}}
        if address:
            ray.init(address=address, log_to_driver=False, runtime_env=runtime_env)
        else:
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, runtime_env=runtime_env)
    try:
        def trainable(params: dict) -> None:
            done = [_timed((trial_fn, config)) for config in params["configs"]]
            tune.report({"results_json": json.dumps([r for r, _ in done], allow_nan=True),
                         "seconds_json": json.dumps([t for _, t in done])})

        configs = [c for _, c in todo]
        blocks = [configs[i:i + chunk] for i in range(0, len(configs), chunk)]
        tuner = tune.Tuner(
            tune.with_resources(trainable, {"cpu": cpus_per_trial}),
            param_space={"configs": tune.grid_search(blocks)},
            run_config=tune.RunConfig(name=name, storage_path=os.path.abspath(os.path.join(folder, "ray")),
                                      verbose=0),
        )
        grid = tuner.fit()
        for res in grid:
            if res.error is not None:
                raise RuntimeError(f"a Ray trial failed: {res.error}")
            for config, result, seconds in zip(res.config["configs"], json.loads(res.metrics["results_json"]),
                                               json.loads(res.metrics["seconds_json"])):
                finish(trial_key(config), config, result, seconds)
    finally:
        if started:
            ray.shutdown()


def add_sweep_arguments(parser, what: str = "trials") -> None:
    """The command-line options of an example that runs a sweep: ``--engine``, ``--address`` and ``--resume``."""
    parser.add_argument("--engine", choices=ENGINES, default="local",
                        help=f"run the {what} in a local process pool (default) or with Ray Tune")
    parser.add_argument("--address", default=None,
                        help="Ray cluster address (with --engine ray; default: a local Ray)")
    parser.add_argument("--resume", action="store_true",
                        help=f"keep the {what} a stopped run finished (in OUT/sweep) and run only the others")
