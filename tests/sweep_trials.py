"""Trial functions for the sweep tests (importable by spawned and Ray workers)."""

import os
import time


def train_block(config):
    """A block of replicas of a DeepLinearNet on a small sensing problem: the final loss of each replica."""
    import warnings

    import lightning as L
    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    from lightning_flat.datamodules import MatrixSensingDataModule
    from lightning_flat.models import DeepLinearNet

    dm = MatrixSensingDataModule(n=30, d_out=4, d_in=4, rank=1, batch_size=5, seed=0)
    net = DeepLinearNet([4, 4, 4], lr=config["lr"], replicas=3, seed=[100 * config["block"] + r for r in range(3)])
    tr = L.Trainer(max_steps=30, precision="64-true", logger=False, enable_progress_bar=False,
                   enable_checkpointing=False, enable_model_summary=False, accelerator="cpu", devices=1)
    tr.fit(net, dm)
    from lightning_flat import functional as F

    losses = F.measurement_loss(net.end_to_end().detach(), dm.measurements, dm.targets)
    return {"losses": [float(v) for v in losses]}


def misbehave(config):
    """A trial that does what ``config["do"]`` says: ``ok`` (returns), ``raise``, ``die`` (its process exits),
    ``hang`` (sleeps past any timeout), ``flaky`` (raises on its first attempt, counted in the file
    ``config["counter"]``), ``bad_result`` (returns something that is not JSON)."""
    do, i = config["do"], config["i"]
    if do == "raise":
        raise ValueError(f"bad value {i}")
    if do == "die":
        os._exit(3)
    if do == "hang":
        time.sleep(600)
    if do == "flaky":
        with open(config["counter"], "a") as f:
            f.write("x")
        with open(config["counter"]) as f:
            attempt = len(f.read())
        if attempt == 1:
            raise RuntimeError("the first attempt fails")
        return {"i": i, "attempt": attempt}
    if do == "bad_result":
        return {"i": object()}
    return {"i": i, "square": i * i}


def probe(config):
    """Where and how a trial ran (its process, the files its code was loaded from, its threads, Ray resources and
    cluster), and files written through ``trial_folder(config["out"])``: ``<i>.txt`` and ``nested/<i>.bin``, and a
    symbolic link (not sent back)."""
    import sys

    from lightning_flat.sweep import trial_folder

    out = trial_folder(config["out"])
    with open(os.path.join(out, f"{config['i']}.txt"), "w") as f:
        f.write(f"trial {config['i']}\n")
    os.makedirs(os.path.join(out, "nested"), exist_ok=True)
    with open(os.path.join(out, "nested", f"{config['i']}.bin"), "wb") as f:
        f.write(bytes(range(256)) * (config["i"] + 1))
    os.symlink(f"{config['i']}.txt", os.path.join(out, f"link{config['i']}"))
    resources, gcs = {}, None
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        context = sys.modules["ray"].get_runtime_context()
        resources, gcs = context.get_assigned_resources(), context.gcs_address
    return {"pid": os.getpid(), "module": __file__, "lightning_flat": sys.modules["lightning_flat"].__file__,
            "omp": os.environ.get("OMP_NUM_THREADS"), "resources": resources, "gcs": gcs,
            "out_name": os.path.basename(out)}


def gated(config):
    """Returns at once for ``i < 2``; the others wait while the file ``config["gate"]`` exists (a sweep to kill
    after exactly two trials)."""
    while config["i"] >= 2 and os.path.exists(config["gate"]):
        time.sleep(0.05)
    return {"i": config["i"]}


def unloadable():
    """A trial function whose module exists in this process only: a worker process cannot load it."""
    import sys
    import types

    module = types.ModuleType("sweep_trials_nowhere")

    def trial(config):
        return {}

    trial.__module__, trial.__qualname__ = module.__name__, "trial"
    module.trial = trial
    sys.modules[module.__name__] = module
    return trial
