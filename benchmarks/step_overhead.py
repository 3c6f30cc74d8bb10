"""Cost of one label-noise SGD step: a hand-written eager PyTorch loop vs the library's Trainer paths, side by side.

All contenders train E = W_L ... W_1 (60x60 factors) on n=600 Gaussian measurements, minibatches of 50 drawn with
replacement, label noise N(0, 1), plain SGD:

- ``eager``: the hand-written loop: gather, noise, forward, ``loss.backward()``, ``torch.optim.SGD.step()``;
- ``default``: ``Trainer.fit(DeepLinearNet(...), MatrixSensingDataModule(...))`` with the ``LabelNoise`` callback and
  no new flag: the engine's analytic steps, fused into chunks of up to 100 steps per ``training_step`` call;
- ``stepwise``: the same with ``chunk_size=1``: one SGD step per Lightning call (what the engine falls back to when
  a callback needs every Lightning hook).

Times are CPU seconds per SGD step (``time.process_time``, one intra-op thread, so a busy machine slows wall time
but barely this), measured over the training loop only (a callback reads the clock at ``on_train_start`` and
``on_train_end``, so Trainer set-up is not counted), contenders interleaved round by round, medians reported.

The contenders also train the same steps: fed the library's minibatch indices and noise, the eager loop must end
where the library ends, up to rounding amplified over the run (bound: steps x the one-ulp sensitivity of the eager
run, plus the last step's rounding), and the default and stepwise paths must be bitwise equal.

    python benchmarks/step_overhead.py            # float64 and float32, depths 2, 5, 10, 2000 steps x 5 rounds
    python benchmarks/step_overhead.py --quick    # float64, depth 5, 300 steps x 3 rounds (< 1 minute)
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
import warnings

import torch

N, D, B = 600, 60, 50


def _model(depth, dtype, **kw):
    from lightning_flat.models import DeepLinearNet
    return DeepLinearNet([D] * (depth + 1), init_scale=0.9 / D**0.5, lr=0.01, seed=0, **kw).to(dtype)


def eager_loop(dm, depth, dtype, steps, draws=None, nudge=False):
    """The hand-written loop; ``draws`` (a list of (indices, noise)) replaces its own random draws. Returns
    ``(cpu seconds per step, final weights)``."""
    A = dm.measurements.A.to(dtype).reshape(N, -1)
    b = dm.targets.to(dtype)
    g = torch.Generator().manual_seed(1)
    Ws = [torch.nn.Parameter(w.detach().clone()) for w in _model(depth, dtype).weights()]
    if nudge:
        with torch.no_grad():
            for W in Ws:
                W.copy_(torch.nextafter(W, torch.full_like(W, float("inf"))))
    opt = torch.optim.SGD(Ws, lr=0.01)
    t = time.process_time()
    for k in range(steps):
        if draws is None:
            idx = torch.randint(N, (B,), generator=g)
            xi = torch.randn(B, generator=g, dtype=dtype)
        else:
            idx, xi = draws[k]
        y = torch.index_select(b, 0, idx) + xi
        E = Ws[0]
        for W in Ws[1:]:
            E = W @ E
        loss = (torch.index_select(A, 0, idx) @ E.reshape(-1) - y).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (time.process_time() - t) / steps, [W.detach() for W in Ws]


class _Clock:
    """Reads the CPU clock at the start and end of the training loop (no per-step hook: the engine stays fused)."""

    def __new__(cls):
        from lightning.pytorch.callbacks import Callback

        class Clock(Callback):
            def on_train_start(self, trainer, pl_module):
                self.t0 = time.process_time()

            def on_train_end(self, trainer, pl_module):
                self.seconds = time.process_time() - self.t0

        return Clock()


def library_run(dm, depth, dtype, steps, chunk_size=100):
    """``Trainer.fit`` with LabelNoise; returns ``(cpu seconds per step, final weights, model)``."""
    import lightning as L

    from lightning_flat.callbacks import LabelNoise

    model = _model(depth, dtype, chunk_size=chunk_size)
    clock = _Clock()
    trainer = L.Trainer(max_steps=steps, precision="64-true" if dtype == torch.float64 else "32-true",
                        callbacks=[LabelNoise(1.0), clock], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=100,
                        accelerator="cpu", devices=1)
    trainer.fit(model, dm)
    return clock.seconds / steps, [w.detach() for w in model.weights()], model


def library_draws(dm, model, dtype, steps):
    """The minibatch indices and label noise the library drew at each step (sampler and LabelNoise, by step)."""
    from lightning_flat.callbacks import LabelNoise
    from lightning_flat.datamodules import MeasurementSampler

    meas, targets = dm.measurements_as(dtype)
    sampler = MeasurementSampler(meas, targets, B, dm.seed, 1000, streams=model.replicas.seeds)
    noise = LabelNoise(1.0)
    cpu = torch.device("cpu")
    return [(sampler.indices(k), noise.noise((B,), k, 0, dtype, cpu, model.replicas.seeds)) for k in range(steps)]


def check(dm, depth, dtype, steps=40) -> dict:
    """The same steps on every path: max relative weight difference eager vs default, and its rounding bound."""
    _, W_default, model = library_run(dm, depth, dtype, steps)
    _, W_stepwise, _ = library_run(dm, depth, dtype, steps, chunk_size=1)
    draws = library_draws(dm, model, dtype, steps)
    _, W_eager = eager_loop(dm, depth, dtype, steps, draws)
    _, W_nudged = eager_loop(dm, depth, dtype, steps, draws, nudge=True)
    scale = max(float(W.abs().max()) for W in W_eager)
    eps = torch.finfo(dtype).eps
    diff = max(float((a - b).abs().max()) for a, b in zip(W_default, W_eager)) / scale
    sensitivity = max(float((a - b).abs().max()) for a, b in zip(W_nudged, W_eager)) / scale
    return dict(max_rel_diff=diff, rounding_bound=steps * sensitivity + eps,
                default_equals_stepwise=all(torch.equal(a, b) for a, b in zip(W_default, W_stepwise)))


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    p.add_argument("--steps", type=int, default=None, help="SGD steps per timed run")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    from lightning_flat.datamodules import MatrixSensingDataModule

    dm = MatrixSensingDataModule(n=N, d_out=D, d_in=D, rank=3, batch_size=B, seed=0)
    steps, rounds = (300, 3) if args.quick else (args.steps or 2000, args.rounds or 5)
    dtypes = [torch.float64] if args.quick else [torch.float64, torch.float32]
    depths = [5] if args.quick else [2, 5, 10]
    rows = []
    for dtype in dtypes:
        for depth in depths:
            runs = {"eager": lambda: eager_loop(dm, depth, dtype, steps)[0],
                    "default": lambda: library_run(dm, depth, dtype, steps)[0],
                    "stepwise": lambda: library_run(dm, depth, dtype, steps, chunk_size=1)[0]}
            for fn in runs.values():  # warm-up
                fn()
            times: dict[str, list[float]] = {k: [] for k in runs}
            for _ in range(rounds):
                for k, fn in runs.items():
                    times[k].append(fn())
            us = {k: statistics.median(v) * 1e6 for k, v in times.items()}
            rows.append(dict(dtype=str(dtype).removeprefix("torch."), depth=depth, steps=steps, rounds=rounds,
                             eager_us=us["eager"], default_us=us["default"], stepwise_us=us["stepwise"],
                             default_ratio=us["default"] / us["eager"], stepwise_ratio=us["stepwise"] / us["eager"],
                             **check(dm, depth, dtype)))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); n={N}, {D}x{D}, batch {B}, label noise; "
          f"CPU time per SGD step, median of {rounds} interleaved rounds of {steps} steps")
    print("| dtype | depth | eager loop (us) | default Trainer path (us) | ratio | one step per call (us) | ratio |"
          " same steps: rel diff (bound) | default == stepwise |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['dtype']} | {r['depth']} | {r['eager_us']:.0f} | {r['default_us']:.0f} | "
              f"{r['default_ratio']:.2f}x | {r['stepwise_us']:.0f} | {r['stepwise_ratio']:.2f}x | "
              f"{r['max_rel_diff']:.1e} ({r['rounding_bound']:.1e}) | {r['default_equals_stepwise']} |")
    print(json.dumps(rows))
    return rows


if __name__ == "__main__":
    main()
