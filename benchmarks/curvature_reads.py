"""Curvature reads on ordinary LightningModules: what one read costs against the libraries and references.

Per module (an MLP 3 x 256 on a batch of 256, a small CNN with batch norm on 32 x 32 images, a 2-layer transformer
encoder), side by side in one process, one intra-op thread, float32, eval mode:

- seconds per Hessian-vector product over seconds per gradient: the library's read (the gradient's graph kept once
  per read, products in one batched backward) and a batched ``torch.func`` reference (``vmap`` of ``jvp(grad)``
  over ``functional_call``), both for a block of ``k`` products, the read's one-time gradient included;
- seconds per trace read (Hutch++, 99 products): the library's (``HessianTrace``'s source, block products) against
  hessian-eigenthings' ``hutch_plus_plus`` over its ``HessianOperator``;
- products until the top eigenvalue is within 1e-4 relative: the library's Lanczos with its error bound against
  hessian-eigenthings' ``lanczos`` with a growing Krylov dimension (both from random starts);
- the overhead of ``HessianTrace`` + ``Sharpness`` every 100 steps on the CNN's training run, as a fraction of its
  training time.

Run: python benchmarks/curvature_reads.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from _timing import interleaved  # noqa: E402


def modules():
    """``{name: (module, batch, loss(module, batch))}``: float32, eval mode, fixed seeds."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    # the squared error written out: nn.functional.mse_loss has no forward-over-reverse derivative in torch 2.13
    # (its backward meets an immutable zero tangent of the target), which the torch.func reference needs
    mse = lambda m, b: (m(b[0]) - b[1]).square().mean()  # noqa: E731
    ce = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1])  # noqa: E731
    mlp = nn.Sequential(nn.Linear(32, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 256),
                        nn.Tanh(), nn.Linear(256, 10))
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(8, 10))

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.head = nn.Linear(32, 1)

        def forward(self, x):
            return self.head(self.encoder(x).mean(1))

    return {
        "MLP 3x256, batch 256": (mlp.eval(), (torch.randn(256, 32, generator=g), torch.randn(256, 10, generator=g)),
                                 mse),
        "CNN + batch norm, 32x32": (cnn.eval(), (torch.randn(64, 3, 32, 32, generator=g),
                                                 torch.randint(0, 10, (64,), generator=g)), ce),
        "transformer encoder, 2 layers": (Encoder().eval(), (torch.randn(32, 16, 32, generator=g),
                                                             torch.randn(32, 1, generator=g)), mse),
    }


class Wrapped(nn.Module):
    """A module and its loss as a LightningModule-like object the library's generic source reads."""

    def __init__(self, net, loss):
        super().__init__()
        self.net, self._loss = net, loss
        self.automatic_optimization = True

    @property
    def device(self):
        return next(self.parameters()).device

    def loss_fn(self, module, batch):
        return self._loss(self.net, batch)


def read_operator(net, batch, loss):
    """The library's read of ``net``'s Hessian: its source, within a read (the caller exits the context)."""
    from lightning_flat.curvature import CurvatureOptions, ModuleSource

    wrapped = Wrapped(net, loss)
    source = ModuleSource(wrapped, CurvatureOptions(), loss_fn=wrapped.loss_fn, batch=batch)

    class Trainer:  # what a read asks of the trainer outside a fit
        world_size, callbacks = 1, []

    return source, source.read(Trainer())


def func_reference(net, batch, loss):
    """``V -> H V`` by ``vmap`` of ``jvp(grad)`` over ``functional_call`` (the batched torch.func reference)."""
    params = {k: v.detach() for k, v in net.named_parameters()}
    names, shapes = list(params), [p.shape for p in params.values()]
    flat = torch.cat([p.reshape(-1) for p in params.values()])

    def f(v):
        out, k = {}, 0
        for n, s in zip(names, shapes):
            out[n] = v[k:k + s.numel()].reshape(s)
            k += s.numel()
        return loss(lambda x: torch.func.functional_call(net, out, (x,)), batch)

    grad = torch.func.grad(f)
    hvp = lambda v: torch.func.jvp(grad, (flat,), (v,))[1]  # noqa: E731
    return torch.func.vmap(hvp, in_dims=1, out_dims=1), flat.numel()


def hvp_costs(net, batch, loss, k, rounds):
    def gradient():
        t = time.perf_counter()
        torch.autograd.grad(loss(net, batch), list(net.parameters()))
        return time.perf_counter() - t

    def ours():
        t = time.perf_counter()
        source, ctx = read_operator(net, batch, loss)
        with ctx as s:
            op = s.operators()[0]
            op.matmat(torch.randn(op.size, k))
        return (time.perf_counter() - t) / k

    ref, size = func_reference(net, batch, loss)
    V = torch.randn(size, k)

    def reference():
        t = time.perf_counter()
        ref(V)
        return (time.perf_counter() - t) / k

    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        r = interleaved({"gradient": gradient, "ours": ours, "reference": reference}, rounds)
    g = r["gradient"]["median"]
    return dict(params=size, gradient_s=g, ours_per_grad=r["ours"]["median"] / g,
                reference_per_grad=r["reference"]["median"] / g,
                ours_over_reference=r["ours"]["median"] / r["reference"]["median"])


def trace_costs(net, batch, loss, rounds, num_matvecs=99):
    from hessian_eigenthings import HessianOperator, hutch_plus_plus

    he_op = HessianOperator(net, [batch], loss, full_dataset=True)
    results = {}

    def ours():
        t = time.perf_counter()
        source, ctx = read_operator(net, batch, loss)
        with ctx as s:
            results["ours"] = s.trace(num_matvecs, seed=0)[0]
        return time.perf_counter() - t

    def eigenthings():
        t = time.perf_counter()
        results["eigenthings"] = hutch_plus_plus(he_op, num_matvecs=num_matvecs, seed=0).estimate
        return time.perf_counter() - t

    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        r = interleaved({"ours": ours, "eigenthings": eigenthings}, rounds)
    return dict(ours_s=r["ours"]["median"], eigenthings_s=r["eigenthings"]["median"],
                ratio=r["ours"]["median"] / r["eigenthings"]["median"],
                same_probes_rel_diff=abs(results["ours"] - results["eigenthings"]) / abs(results["eigenthings"]))


def top_eigenvalue_products(net, batch, loss, target=1e-4, steps=3, lr=0.01):
    """Products until the top eigenvalue is within ``target``: the library's Lanczos (its error bound says when),
    cold from a random vector and then warm from the previous read's vector after ``steps`` SGD steps (as during
    training), against hessian-eigenthings' ``lanczos`` at the smallest Krylov dimension that reaches the target
    (chosen knowing the answer: it has no stopping rule)."""
    from hessian_eigenthings import HessianOperator, lanczos

    from lightning_flat import functional as F

    def read(v0=None, seed=2):
        source, ctx = read_operator(net, batch, loss)
        with ctx as s:
            op = s.operators()[0]
            exact, _, _ = F.top_hessian_eigenpair(op.matvec, op.size, dtype=op.dtype, device=op.device, tol=1e-7,
                                                  max_iter=300, seed=1)
            theta, v, hvps = F.top_hessian_eigenpair(op.matvec, op.size, dtype=op.dtype, device=op.device,
                                                     tol=target, seed=seed, v0=v0)
        he_op = HessianOperator(net, [batch], loss, full_dataset=True)
        krylov = 2
        while True:
            est = float(lanczos(he_op, k=1, max_iter=krylov, which="LA", seed=seed).eigenvalues[0])
            if abs(est - float(exact)) <= target * abs(float(exact)) or krylov >= 400:
                break
            krylov += max(1, krylov // 4)
        return dict(hvps=hvps, rel_err=abs(float(theta) - float(exact)) / abs(float(exact)), eigenthings=krylov), v

    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        cold, v = read()
        opt = torch.optim.SGD(net.parameters(), lr=lr)
        for _ in range(steps):
            opt.zero_grad()
            loss(net, batch).backward()
            opt.step()
        warm, _ = read(v0=v, seed=3)
    return dict(cold=cold, warm=warm)


def training_overhead(steps, configurations, rounds=2):
    """Seconds of a CNN training run (SGD, batches of 64) without and with the given curvature callbacks,
    interleaved; ``configurations``: ``{label: () -> callbacks}``."""
    import lightning as L

    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(640, 3, 32, 32, generator=g), torch.randint(0, 10, (640,), generator=g)

    class CNN(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = modules()["CNN + batch norm, 32x32"][0].train()

        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

        def train_dataloader(self):
            return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64, shuffle=True)

    def run(callbacks):
        def go():
            t = time.perf_counter()
            L.Trainer(max_steps=steps, logger=False, callbacks=callbacks(), enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False).fit(CNN())
            return time.perf_counter() - t
        return go

    r = interleaved({"plain": run(lambda: []), **{k: run(v) for k, v in configurations.items()}}, rounds=rounds)
    plain = r["plain"]["median"]
    return {"steps": steps, "plain_s": plain,
            **{k: dict(seconds=r[k]["median"], overhead=(r[k]["median"] - plain) / plain) for k in configurations}}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    rounds = 3 if args.quick else 7
    rows = {}
    for name, (net, batch, loss) in modules().items():
        if args.quick and not name.startswith("MLP"):
            continue
        rows[name] = dict(hvp=hvp_costs(net, batch, loss, k=8 if args.quick else 20, rounds=rounds),
                          trace=trace_costs(net, batch, loss, rounds=rounds),
                          top=top_eigenvalue_products(net, batch, loss))
    from lightning_flat.callbacks import HessianTrace, Sharpness

    configurations = {
        "HessianTrace + Sharpness every 100 steps": lambda: [HessianTrace(100), Sharpness(100)],
        "Sharpness every 100 steps": lambda: [Sharpness(100)],
        "HessianTrace(num_matvecs=9) + Sharpness every 100 steps": lambda: [HessianTrace(100, num_matvecs=9),
                                                                            Sharpness(100)],
        "HessianTrace + Sharpness every 1000 steps": lambda: [HessianTrace(1000), Sharpness(1000)],
    }
    if args.quick:  # the code path, not the figure
        configurations = {k: configurations[k] for k in list(configurations)[:1]}
    overhead = training_overhead(50 if args.quick else 2000, configurations, rounds=1 if args.quick else 2)
    print(f"torch {torch.__version__}, 1 thread, float32, eval mode; medians of {rounds} interleaved rounds")
    print("| module | params | HVP / gradient: ours | batched torch.func | ours / reference (goal <= 1.25) "
          "| trace read: ours / hessian-eigenthings (goal <= 0.8) | HVPs to 1e-4, cold: ours (certified) vs "
          "hessian-eigenthings (oracle) | warm, after 3 steps |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        h, t, c, w = r["hvp"], r["trace"], r["top"]["cold"], r["top"]["warm"]
        print(f"| {name} | {h['params']} | {h['ours_per_grad']:.2f} | {h['reference_per_grad']:.2f} | "
              f"{h['ours_over_reference']:.2f} | {t['ratio']:.2f} ({t['ours_s'] * 1e3:.0f} vs "
              f"{t['eigenthings_s'] * 1e3:.0f} ms) | {c['hvps']} vs {c['eigenthings']} | "
              f"{w['hvps']} vs {w['eigenthings']} |")
    print(f"\nCNN training, {overhead['steps']} steps, {overhead['plain_s']:.1f} s plain; overhead of the reads:")
    for k, v in overhead.items():
        if isinstance(v, dict):
            print(f"  {k}: {100 * v['overhead']:.1f}% ({v['seconds']:.1f} s)")
    result = dict(rows=rows, overhead=overhead)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
