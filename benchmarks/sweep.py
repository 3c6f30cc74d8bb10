"""Sweeps on Ray vs the local worker processes: wall time of whole sweeps, side by side in one run.

1. Eight short trials (a DeepLinearNet trained for 1000 GD steps, about 1 s each on an idle core), 2 workers:
   ``run_sweep(engine="local")`` vs ``run_sweep(engine="ray")`` (a Ray instance of its own, started and shut down
   inside the timed sweep, as a user's call does), contenders alternated round by round, medians reported. With
   ``--tune``, also the former Ray path (Ray Tune, one fresh process per trial) as a reference.
2. The Ding et al. quick grid (40 recovery trials, two convex programs each): ``examples/ding2022/run.py --quick``
   with ``--engine local`` vs ``--engine ray``, 2 workers.

Besides wall time, the CPU seconds of each contender (this process and every process started under it, read from
``/proc``): on a shared machine, other users' load stretches wall time (and favours whichever contender runs more
processes), while the CPU a sweep costs stays its own. Every contender computes the same trials: the benchmark checks
that the results are equal bit for bit (the same computation in another process) and reports it (``same_results``).

    python benchmarks/sweep.py            # 8 x 1000 steps, 3 rounds; the Ding quick grid once per engine
    python benchmarks/sweep.py --tune     # and Ray Tune's former per-trial processes, once
    python benchmarks/sweep.py --quick    # 8 x 250 steps, one round, no Ding grid (< 1 minute on an idle machine)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
WORKERS = 2


class TreeCPU:
    """CPU seconds (user + system) spent by this process and every process started under it (children, theirs...)
    inside a ``with`` block, read from ``/proc`` every 0.1 s: a process that lives less than that may be missed.
    On a shared machine it is the cost that wall time hides (another user's load slows every contender)."""

    def __enter__(self) -> TreeCPU:
        import threading

        self.tick, self.seen, self.done = os.sysconf("SC_CLK_TCK"), {}, threading.Event()
        self.own, self.first = time.process_time(), self._stats()  # processes there before the block are not counted
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _stats(self) -> dict[int, tuple[int, int, float]]:
        out = {}
        for entry in os.listdir("/proc"):
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                out[int(entry)] = (int(fields[1]), int(fields[19]), (int(fields[11]) + int(fields[12])) / self.tick)
            except (OSError, ValueError, IndexError):
                continue  # not a process, or gone
        return out

    def _sample(self) -> None:
        stats, tree = self._stats(), {os.getpid()}
        for _ in range(8):  # descendants up to 8 levels down (raylet -> worker is 2)
            tree |= {pid for pid, (ppid, _, _) in stats.items() if ppid in tree}
        for pid in tree - {os.getpid()}:
            ppid, start, cpu = stats[pid]
            if self.first.get(pid, (0, None))[1] != start:
                self.seen[(pid, start)] = cpu

    def _poll(self) -> None:
        while not self.done.wait(0.1):
            self._sample()

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()
        self.seconds = time.process_time() - self.own + sum(self.seen.values())


def _sweep(engine: str, configs: list[dict], root: str) -> tuple[float, float, list]:
    from _sweep_trial import train

    from lightning_flat.sweep import run_sweep

    folder = tempfile.mkdtemp(dir=root)
    t = time.perf_counter()
    with TreeCPU() as cpu:
        rows = run_sweep(train, configs, folder, engine=engine, workers=WORKERS, resume=False)
    return time.perf_counter() - t, cpu.seconds, [r["result"] for r in rows]


def _tune(configs: list[dict], root: str) -> tuple[float, list]:
    """The former Ray path, for reference: every trial a Ray Tune trial (a fresh worker process each)."""
    import ray
    from _sweep_trial import train
    from ray import tune

    t = time.perf_counter()
    ray.init(address="local", num_cpus=WORKERS, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([HERE, *sys.path[1:]])}})
    try:
        def trainable(params: dict) -> None:
            tune.report({"result": json.dumps(train(params["config"]))})

        grid = tune.Tuner(tune.with_resources(trainable, {"cpu": 1}),
                          param_space={"config": tune.grid_search(configs)},
                          run_config=tune.RunConfig(storage_path=os.path.join(root, "tune"), verbose=0)).fit()
        by_seed = {r.config["config"]["seed"]: json.loads(r.metrics["result"]) for r in grid}
    finally:
        ray.shutdown()
    return time.perf_counter() - t, [by_seed[c["seed"]] for c in configs]


def short_trials(steps: int, rounds: int, tune: bool) -> dict:
    configs = [{"seed": s, "steps": steps} for s in range(8)]
    root = tempfile.mkdtemp(prefix="sweep-bench-")
    try:
        times: dict[str, list[float]] = {"local": [], "ray": []}
        cpu: dict[str, list[float]] = {"local": [], "ray": []}
        results = {}
        for _ in range(rounds):
            for engine in ("local", "ray"):
                seconds, cpu_seconds, results[engine] = _sweep(engine, configs, root)
                times[engine].append(seconds)
                cpu[engine].append(cpu_seconds)
        if tune:
            try:
                seconds, results["tune"] = _tune(configs, root)
                times["tune"] = [seconds]
            except Exception as err:  # e.g. a Ray instance that does not start in time on an overloaded machine
                print(f"the Ray Tune contender failed: {err}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    cpu_med = {k: statistics.median(v) for k, v in cpu.items()}
    row = dict(trials=len(configs), steps=steps, workers=WORKERS, rounds=rounds, seconds=times, median=med,
               ray_over_local=med["ray"] / med["local"], cpu_seconds=cpu, cpu_median=cpu_med,
               cpu_ray_over_local=cpu_med["ray"] / cpu_med["local"], load=os.getloadavg()[0],
               same_results=all(r == results["local"] for r in results.values()))
    if "tune" in med:
        row["tune_over_local"] = med["tune"] / med["local"]
    return row


def ding_quick() -> dict:
    import importlib.util

    spec = importlib.util.spec_from_file_location("ding2022_run", os.path.join(HERE, "..", "examples", "ding2022",
                                                                                "run.py"))
    ding = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ding)
    out = {}
    root = tempfile.mkdtemp(prefix="sweep-bench-ding-")
    try:
        for engine in ("local", "ray"):
            t = time.perf_counter()
            with TreeCPU() as cpu:
                summary = ding.main(["--quick", "--no-progress", "--engine", engine, "--workers", str(WORKERS),
                                     "--out", os.path.join(root, engine)])
            with open(os.path.join(root, engine, "trials.json")) as f:
                trials = json.load(f)["trials"]
            out[engine] = dict(seconds=time.perf_counter() - t, solve_seconds=summary["solve_seconds"],
                               cpu_seconds=cpu.seconds,
                               trials=[{k: v for k, v in tr.items() if "seconds" not in k} for tr in trials])
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return dict(trials=len(out["local"]["trials"]), local_s=out["local"]["solve_seconds"],
                ray_s=out["ray"]["solve_seconds"], ray_over_local=out["ray"]["solve_seconds"] /
                out["local"]["solve_seconds"], cpu_local_s=out["local"]["cpu_seconds"],
                cpu_ray_s=out["ray"]["cpu_seconds"], cpu_ray_over_local=out["ray"]["cpu_seconds"] /
                out["local"]["cpu_seconds"], same_results=out["ray"]["trials"] == out["local"]["trials"],
                load=os.getloadavg()[0])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--tune", action="store_true", help="also time the former Ray Tune path (one process per trial)")
    args = p.parse_args(argv)
    if HERE not in sys.path:
        sys.path.insert(0, HERE)  # the trial's module, for this process and (inherited) the spawned workers
    os.environ.setdefault("WANDB_MODE", "offline")
    result = {"short": short_trials(250 if args.quick else 1000, 1 if args.quick else 3, args.tune)}
    if not args.quick:
        result["ding_quick"] = ding_quick()
    s = result["short"]
    print(f"{s['trials']} trials x {s['steps']} GD steps, {s['workers']} workers, median of {s['rounds']} round(s); "
          f"load average {s['load']:.1f} on {os.cpu_count()} CPUs")
    print("| sweep | local (s) | Ray (s) | Ray / local | CPU s: local | Ray | Ray / local | same results |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {s['trials']} short trials | {s['median']['local']:.1f} | {s['median']['ray']:.1f} | "
          f"{s['ray_over_local']:.2f}x | {s['cpu_median']['local']:.1f} | {s['cpu_median']['ray']:.1f} | "
          f"{s['cpu_ray_over_local']:.2f}x | {s['same_results']} |")
    if "tune" in s["median"]:
        print(f"| (former Ray Tune path) | | {s['median']['tune']:.1f} | {s['tune_over_local']:.2f}x | | | | |")
    if "ding_quick" in result:
        d = result["ding_quick"]
        print(f"| Ding quick grid ({d['trials']} trials, solve time) | {d['local_s']:.1f} | {d['ray_s']:.1f} | "
              f"{d['ray_over_local']:.2f}x | {d['cpu_local_s']:.1f} | {d['cpu_ray_s']:.1f} | "
              f"{d['cpu_ray_over_local']:.2f}x | {d['same_results']} |")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
