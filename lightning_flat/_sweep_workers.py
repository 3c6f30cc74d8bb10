"""The workers of [`lightning_flat.sweep.run_sweep`][lightning_flat.sweep.run_sweep]: this process, local ``spawn``
processes, or Ray actors.

Each pool has ``size`` slots and answers ``start(slot)``, ``submit(slot, config)``, ``kill(slot)`` and
``wait(timeout)``, which returns the events ``(slot, "ready" | "done" | "lost" | "broken", payload)`` that
``lightning_flat.sweep._schedule`` turns into kept rows, retries and failures. A slot whose worker was killed or died
gets a fresh worker from ``start``; events of the old one are dropped. Ray is imported only by `RayWorkers`.
"""

from __future__ import annotations

import inspect
import os
import pickle
import signal
import site
import sys
import sysconfig
import tempfile
from collections.abc import Callable
from typing import Any

from lightning_flat._sweep_trial import _ANSI, _describe, _run_trial


class _Pool:
    size = 1

    def __enter__(self) -> _Pool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close(graceful=exc[0] is None)

    def close(self, graceful: bool = True) -> None:
        pass


class InlineWorker(_Pool):
    """The trials in this process, one after the other (no timeout: nothing could stop a trial here)."""

    def __init__(self, trial_fn: Callable[[dict], dict]) -> None:
        self.trial_fn = trial_fn
        self.events: list[tuple[int, str, Any]] = []

    def start(self, slot: int) -> None:
        self.events.append((slot, "ready", None))

    def submit(self, slot: int, config: dict) -> None:
        self.events.append((slot, "done", _run_trial(self.trial_fn, config)))

    def kill(self, slot: int) -> None:  # pragma: no cover - never asked: no timeout inline
        raise RuntimeError("an inline trial cannot be stopped")

    def wait(self, timeout: float | None) -> list[tuple[int, str, Any]]:
        events, self.events = self.events, []
        return events


def _process_main(conn: Any, payload: bytes) -> None:
    """A local worker: load the trial function, say ready, then run each config received until ``None``."""
    try:
        trial_fn = pickle.loads(payload)
    except Exception as err:  # e.g. its module does not import in a fresh process
        conn.send(("broken", f"the trial function does not load in a worker process: {_describe(err)}"))
        return
    conn.send(("ready", os.getpid()))
    while True:
        try:
            config = conn.recv()
        except (EOFError, OSError):
            return
        if config is None:
            return
        conn.send(("done", _run_trial(trial_fn, config)))


def _exit_cause(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            pass
    return f"exit code {code}"


class ProcessWorkers(_Pool):
    """``size`` local ``spawn`` processes, each with ``cpus_per_trial`` BLAS threads (``OMP_NUM_THREADS``, read by
    the child at import unless already set), each running trial after trial."""

    def __init__(self, trial_fn: Callable[[dict], dict], size: int, cpus_per_trial: int) -> None:
        import multiprocessing as mp

        try:
            self.payload = pickle.dumps(trial_fn)
        except Exception as err:
            raise TypeError(f"trial_fn must be importable by worker processes (a function at a module's top level), "
                            f"got {trial_fn!r}: {err}") from err
        self.ctx, self.size, self.threads = mp.get_context("spawn"), size, cpus_per_trial
        self.procs: dict[int, Any] = {}
        self.conns: dict[int, Any] = {}
        self.ready: set[int] = set()

    def start(self, slot: int) -> None:
        self.kill(slot)
        parent, child = self.ctx.Pipe()
        saved = os.environ.get("OMP_NUM_THREADS")
        os.environ.setdefault("OMP_NUM_THREADS", str(self.threads))
        try:
            proc = self.ctx.Process(target=_process_main, args=(child, self.payload), daemon=True)
            proc.start()
        finally:
            if saved is None:
                os.environ.pop("OMP_NUM_THREADS", None)
        child.close()
        self.procs[slot], self.conns[slot] = proc, parent
        self.ready.discard(slot)

    def submit(self, slot: int, config: dict) -> None:
        self.conns[slot].send(config)

    def kill(self, slot: int) -> None:
        proc, conn = self.procs.pop(slot, None), self.conns.pop(slot, None)
        if conn is not None:
            conn.close()
        if proc is not None:
            if proc.is_alive():
                proc.kill()
            proc.join(5)

    def wait(self, timeout: float | None) -> list[tuple[int, str, Any]]:
        from multiprocessing.connection import wait

        handles = {conn: slot for slot, conn in self.conns.items()}
        handles.update({proc.sentinel: slot for slot, proc in self.procs.items()})
        events = []
        for slot in dict.fromkeys(handles[h] for h in wait(list(handles), timeout)):
            conn, proc = self.conns[slot], self.procs[slot]
            try:
                message = conn.recv() if conn.poll() else None
            except (EOFError, OSError):
                message = None
            if message is not None:
                if message[0] == "ready":
                    self.ready.add(slot)
                elif message[0] == "broken":
                    self.kill(slot)
                events.append((slot, *message))
                continue
            proc.join(5)
            if proc.is_alive():  # the sentinel fired but the process lives on: nothing to report yet
                continue
            cause = f"the worker process ended ({_exit_cause(proc.exitcode)})"
            events.append((slot, "lost" if slot in self.ready else "broken", cause))
            self.kill(slot)
        return events

    def close(self, graceful: bool = True) -> None:
        for slot, conn in list(self.conns.items()):
            if graceful:
                try:
                    conn.send(None)
                except OSError:
                    pass
                self.procs[slot].join(10)
            self.kill(slot)


# ------------------------------------------------------------------------------------------------------------- Ray
class TrialRunner:
    """A Ray actor's body: holds the trial function (deserialized once) and runs trial after trial, collecting the
    files each writes under [`lightning_flat.sweep.trial_folder`][lightning_flat.sweep.trial_folder]."""

    def __init__(self, trial_fn: Callable[[dict], dict], threads: int | None = None) -> None:
        self.trial_fn = trial_fn
        if threads is not None:  # the trial's CPUs as its BLAS threads, whatever the node's environment says
            os.environ["OMP_NUM_THREADS"] = str(threads)
            from lightning_flat.threads import use_threads

            use_threads(threads)

    def ready(self) -> int:
        return os.getpid()

    def run(self, config: dict) -> dict:
        return _run_trial(self.trial_fn, config, collect=True)


def _installed(path: str) -> bool:
    """Whether ``path`` lies in an installed environment's site-packages (assumed present on every node)."""
    roots = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()}
    path = os.path.realpath(path)
    return any(path.startswith(os.path.realpath(r) + os.sep) for r in roots)


def trial_runtime_env(trial_fn: Callable[[dict], dict], extra: dict | None = None, empty_dir: str = "") -> dict:
    """The Ray ``runtime_env`` that lets any node run ``trial_fn``, whatever its paths: ``lightning_flat`` itself as a
    ``py_module`` (the nodes need its dependencies only, and run this exact version), and the trial function's code:
    its top-level package or single-file module as a ``py_module`` when it is imported by name from outside
    site-packages, or, for a function that travels by value (defined in a script's ``__main__`` or in a module
    loaded from a path), the script's folder as ``working_dir`` (its sibling modules import there). Without such a
    folder the ``working_dir`` is ``empty_dir``: with none, Ray would put the driver's current folder on the workers'
    path, which exists on the driver's machine only. ``extra`` (the user's) is merged in: its ``py_modules`` are
    added, its other keys win."""
    import lightning_flat

    modules = [os.path.dirname(os.path.abspath(lightning_flat.__file__))]
    env: dict[str, Any] = {"working_dir": empty_dir or None}
    mod = sys.modules.get(getattr(trial_fn, "__module__", None) or "")
    by_name = (mod is not None and mod.__name__ != "__main__"
               and getattr(mod, getattr(trial_fn, "__qualname__", ""), None) is trial_fn)
    if by_name:
        top = sys.modules.get(mod.__name__.split(".")[0])
        path = (list(top.__path__)[0] if hasattr(top, "__path__") else getattr(top, "__file__", None)) if top else None
        if path and top.__name__ != "lightning_flat" and not _installed(path):
            modules.append(os.path.abspath(path))
    else:
        try:
            source = inspect.getsourcefile(trial_fn)
        except TypeError:
            source = None
        if source:
            env["working_dir"] = os.path.dirname(os.path.abspath(source))
    extra = dict(extra or {})
    env["py_modules"] = list(dict.fromkeys(modules + list(extra.pop("py_modules", []))))
    env.update(extra)
    return {k: v for k, v in env.items() if v is not None}  # working_dir=None: none


def _ray_cause(err: BaseException) -> str:
    """A Ray error in one line without colour codes: its own lines (ids, pid, exit code...) without the traceback
    frames it may carry, and that traceback's exception line (e.g. the import error of an actor that could not
    start)."""
    raw = [line for line in _ANSI.sub("", str(err)).splitlines() if line.strip()]
    lines = [" ".join(line.split()) for line in raw if not line[0].isspace() and not line.startswith("Traceback")]
    text = "; ".join(lines)
    return text if len(text) <= 500 else text[:500] + " ..."


class RayWorkers(_Pool):
    """``size`` Ray actors, each with ``cpus_per_trial`` CPUs and ``gpus_per_trial`` GPUs, on the cluster at
    ``address`` (joined with `trial_runtime_env`) or on a Ray instance started here (``address=None``:
    ``ray.init(address="local")``, never a running one); shut down on close if connected here. A Ray connection the
    caller made is used as it is and left open: its ``runtime_env`` must make the trial function importable."""

    def __init__(self, trial_fn: Callable[[dict], dict], size: int, address: str | None, cpus_per_trial: int,
                 gpus_per_trial: float, runtime_env: dict | None) -> None:
        try:
            import ray
        except ImportError as err:  # pragma: no cover - the extra is installed in CI
            raise ImportError('engine="ray" needs Ray: pip install "lightning-flat[ray]"') from err
        self.ray, self.size = ray, size
        self.started = not ray.is_initialized()
        if self.started and address is None:
            # a Ray instance of its own on this machine (never a running one): its workers find the trial's code on
            # this process's paths, through the environment they inherit (no packaging: the workers Ray starts
            # with the instance are used as they are)
            saved = os.environ.get("PYTHONPATH")
            paths = [p for p in sys.path if p] + ([saved] if saved else [])
            os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
            try:
                ray.init(address="local", num_cpus=size * cpus_per_trial, include_dashboard=False,
                         log_to_driver=False, runtime_env=runtime_env)
            finally:
                if saved is None:
                    os.environ.pop("PYTHONPATH")
                else:
                    os.environ["PYTHONPATH"] = saved
        elif self.started:  # a cluster: the code travels with the job (Ray uploads local paths at ray.init only)
            with tempfile.TemporaryDirectory() as empty:
                ray.init(address=address, log_to_driver=False,
                         runtime_env=trial_runtime_env(trial_fn, runtime_env, empty))
        try:
            self._check_resources(address, cpus_per_trial, gpus_per_trial)
            self.actor = ray.remote(TrialRunner).options(num_cpus=cpus_per_trial, num_gpus=gpus_per_trial,
                                                         max_restarts=0, max_task_retries=0)
        except BaseException:
            self.close()
            raise
        self.trial_fn = trial_fn
        # cpus_per_trial BLAS threads per trial, unless the user's runtime_env sets OMP_NUM_THREADS itself
        user_env = (runtime_env or {}).get("env_vars") or {}
        self.threads = None if "OMP_NUM_THREADS" in user_env else cpus_per_trial
        self.actors: dict[int, Any] = {}
        self.refs: dict[Any, tuple[int, str]] = {}  # pending ref -> (slot, "ready" | "run")

    def _check_resources(self, address: str | None, cpus: int, gpus: float) -> None:
        nodes = [n.get("Resources", {}) for n in self.ray.nodes() if n.get("Alive")]
        if not any(r.get("CPU", 0) >= cpus and r.get("GPU", 0) >= gpus for r in nodes):
            have = "; ".join(f"{r.get('CPU', 0):g} CPU, {r.get('GPU', 0):g} GPU" for r in nodes) or "no live node"
            where = f"the Ray cluster at {address}" if address else "the Ray instance started for the sweep"
            raise ValueError(f"no node of {where} can run a trial with cpus_per_trial={cpus} and "
                             f"gpus_per_trial={gpus:g} (its nodes: {have})")

    def start(self, slot: int) -> None:
        self.kill(slot)
        actor = self.actor.remote(self.trial_fn, self.threads)
        self.actors[slot] = actor
        self.refs[actor.ready.remote()] = (slot, "ready")

    def submit(self, slot: int, config: dict) -> None:
        self.refs[self.actors[slot].run.remote(config)] = (slot, "run")

    def kill(self, slot: int) -> None:
        actor = self.actors.pop(slot, None)
        if actor is not None:
            self.refs = {ref: v for ref, v in self.refs.items() if v[0] != slot}
            self.ray.kill(actor, no_restart=True)

    def wait(self, timeout: float | None) -> list[tuple[int, str, Any]]:
        if not self.refs:
            return []
        done, _ = self.ray.wait(list(self.refs), num_returns=1, timeout=timeout)
        if done:  # and whatever else is ready now
            done, _ = self.ray.wait(list(self.refs), num_returns=len(self.refs), timeout=0)
        events = []
        for ref in done:
            if ref not in self.refs:  # a ref of an actor killed above (its other ref failed first)
                continue
            slot, kind = self.refs.pop(ref)
            try:
                value = self.ray.get(ref)
            except self.ray.exceptions.RayError as err:
                events.append((slot, "broken" if kind == "ready" else "lost", _ray_cause(err)))
                self.kill(slot)
                continue
            events.append((slot, "ready" if kind == "ready" else "done", value))
        return events

    def close(self, graceful: bool = True) -> None:
        for slot in list(getattr(self, "actors", {})):
            self.kill(slot)
        if self.started:
            self.ray.shutdown()
