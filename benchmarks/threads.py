"""Intra-op threads for a user script: the README's "Using the callbacks" run (DeepLinearNet [20, 20, 20], matrix
sensing n = 200, label noise, HessianTrace, Sharpness, MatrixNorms, guard; no logger) with one thread
(``lightning_flat.use_threads()``) and with torch's default (one per core), each in a fresh process, interleaved.

    python benchmarks/threads.py [--steps 2000] [--rounds 2]

Prints the wall time of each run and the machine's load average beside it (the gap depends on what else runs).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

RUN = """
import sys, time
import lightning as L
import torch
from lightning_flat import use_threads
from lightning_flat.callbacks import FiniteLossGuard, HessianTrace, HyperparameterSchedule, LabelNoise, MatrixNorms, \\
    Sharpness
from lightning_flat.datamodules import MatrixSensingDataModule
from lightning_flat.models import DeepLinearNet

steps, threads = int(sys.argv[1]), sys.argv[2]
if threads == "1":
    use_threads()
dm = MatrixSensingDataModule(n=200, d_out=20, d_in=20, rank=2, batch_size=50, seed=0)
model = DeepLinearNet([20, 20, 20], init_scale=0.9 / 20**0.5, lr=0.05)
trainer = L.Trainer(max_steps=steps, precision="64-true", log_every_n_steps=100, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    callbacks=[LabelNoise(std=1.0), HyperparameterSchedule(label_noise=[(0, 1.0), (steps - 500, 0.0)]),
                               HessianTrace(every_n_steps=100), Sharpness(every_n_steps=500),
                               MatrixNorms(every_n_steps=100), FiniteLossGuard()])
t = time.perf_counter()
trainer.fit(model, dm)
print(f"RESULT {torch.get_num_threads()} {time.perf_counter() - t:.2f}")
"""


def run(steps: int, threads: str) -> tuple[int, float]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "LIGHTNING_FLAT_THREADS")}
    out = subprocess.run([sys.executable, "-c", RUN, str(steps), threads], env=env, capture_output=True, text=True,
                         check=True)
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT")][-1].split()
    return int(line[1]), float(line[2])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)
    times: dict[str, list[float]] = {"1": [], "default": []}
    used = {}
    for _ in range(args.rounds):
        for key in times:
            load = os.getloadavg()[0]
            n, seconds = run(args.steps, key)
            used[key] = n
            times[key].append(seconds)
            print(f"threads={n} ({key}): {seconds:.1f} s for {args.steps} steps (load average {load:.1f}, "
                  f"{os.cpu_count()} CPUs)", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"median: 1 thread {med['1']:.1f} s, {used['default']} threads {med['default']:.1f} s "
          f"({med['default'] / med['1']:.2f}x the one-thread time)")
    return {"steps": args.steps, "threads": used, "median_seconds": med, "time": time.time()}


if __name__ == "__main__":
    main()
