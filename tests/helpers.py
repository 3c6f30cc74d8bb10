"""Small shared pieces for the Lightning-level tests."""

import importlib.util
import os
import warnings

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from conftest import F64, randn
from lightning_flat.loggers import MemoryLogger
from lightning_flat.measurements import Dense, Entries, RankOne

ROOT = os.path.join(os.path.dirname(__file__), "..")


def trainer(max_steps, callbacks=(), precision="64-true", log_every_n_steps=1, **kw):
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    mem = MemoryLogger()
    tr = L.Trainer(max_steps=max_steps, callbacks=list(callbacks), precision=precision, logger=mem,
                   enable_checkpointing=kw.pop("enable_checkpointing", False), enable_progress_bar=False,
                   enable_model_summary=False, log_every_n_steps=log_every_n_steps, accelerator="cpu", devices=1,
                   **kw)
    return tr, mem


def make_measurements(kind, n, d_out, d_in, g):
    """Random ``Dense``, ``RankOne`` or ``Entries`` measurements (float64)."""
    if kind == "dense":
        return Dense(randn(n, d_out, d_in, g=g))
    if kind == "rankone":
        return RankOne(randn(n, d_out, g=g), randn(n, d_in, g=g))
    return Entries(torch.randint(d_out, (n,), generator=g), torch.randint(d_in, (n,), generator=g), (d_out, d_in),
                   dtype=F64)


class Killed(RuntimeError):
    pass


class KillAt(Callback):
    """Kill the run (an exception) at the start of global step ``step``."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise Killed(f"killed at step {self.step}")


def run_example(relpath, argv):
    """Import an example script by path and run its ``main(argv)``; returns its summary."""
    path = os.path.join(ROOT, "examples", relpath)
    name = "example_" + relpath.replace("/", "_").removesuffix(".py")
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main(argv)


def failed_checks(summary, prefix):
    """The checks of an example's summary whose name starts with ``prefix`` and that failed (and that some exist)."""
    rows = [c for c in summary["checks"] if c["name"].startswith(prefix)]
    assert rows, prefix
    return [f"{c['name']}: {c['value']:.4g}" for c in rows if not c["passed"]]


def assert_replot(example, results, out, figures):
    """``--replot`` redraws exactly ``figures`` from a results file, without checks."""
    summary = run_example(example, ["--replot", str(results), "--out", str(out)])
    assert summary["checks"] == [] and [os.path.basename(p) for p in summary["figures"]] == figures


def flat_function(params, fn):
    """``(f, flat)``: ``f(v) = fn(dict of tensors cut from v)`` over the concatenation ``flat`` of ``params`` (a
    name -> tensor dict), for dense torch.func Hessians and Jacobians."""
    names, shapes = list(params), [p.shape for p in params.values()]
    flat = torch.cat([p.detach().reshape(-1) for p in params.values()])

    def f(v):
        out, k = {}, 0
        for n, shp in zip(names, shapes):
            out[n] = v[k:k + shp.numel()].reshape(shp)
            k += shp.numel()
        return fn(out)

    return f, flat
