"""Spectra during training: SpectralDensity (exact and stochastic Lanczos quadrature), per-layer traces and
sharpness, against dense float64 Hessians."""

import math

import pytest
import torch

from conftest import rel
from helpers import flat_function, trainer
from lightning_flat import functional as F
from lightning_flat.callbacks import (CurvatureOptions, EigenvaluesAbove, HessianTrace, PreconditionedSharpness, Sharpness,
                                      SpectralDensity)
from lightning_flat.datamodules import MatrixSensingDataModule
from lightning_flat.models import DeepLinearNet, QuadraticNet


def setup(callbacks, steps=20, replicas=1, dims=(3, 5, 4, 4)):
    dm = MatrixSensingDataModule(n=40, d_out=dims[-1], d_in=dims[0], rank=1, batch_size=8, seed=0)
    net = DeepLinearNet(list(dims), lr=0.02, seed=0, replicas=replicas)
    tr, mem = trainer(steps, callbacks)
    tr.fit(net, dm)
    return dm, net, mem


def dense(net, dm, r=None):
    ws = [w.detach() if r is None else w.detach()[r] for w in net.weights()]
    return F.loss_hessian(ws, dm.measurements, dm.targets), ws


def test_exact_density_is_the_spectrum():
    sd = SpectralDensity(every_n_steps=10)
    dm, net, _ = setup([sd])
    H, _ = dense(net, dm)
    step, nodes, weights = sd.densities[-1]
    assert step == 20 and rel(nodes, torch.linalg.eigvalsh(H)) < 1e-10
    assert torch.allclose(weights, torch.full_like(weights, 1 / H.shape[0]))
    assert rel(sd.last["spectrum/mean"], torch.trace(H) / H.shape[0]) < 1e-10


def test_slq_moments_and_edges_against_the_dense_hessian():
    probes, steps = 40, 30
    sd = SpectralDensity(every_n_steps=20, method="slq", num_probes=probes, lanczos_steps=steps)
    dm, net, _ = setup([sd])
    H, _ = dense(net, dm)
    p = H.shape[0]
    _, nodes, weights = sd.densities[-1]
    lam = torch.linalg.eigvalsh(H)
    # k = 0: each probe's quadrature weights sum to 1 (squared components of a unit vector)
    assert abs(float(weights.sum()) - 1) < 1e-10
    # k = 1, 2: Gauss quadrature with 30 nodes is exact for degree < 60, so the only error is the probes':
    # z^T H^k z / p with Rademacher z has standard deviation sqrt(2 sum_{i != j} (H^k)_ij^2) / p per probe
    for k in (1, 2):
        Hk = torch.linalg.matrix_power(H, k)
        std = math.sqrt(2 * float((Hk.square().sum() - Hk.diagonal().square().sum()))) / p / math.sqrt(probes)
        got = float((weights * nodes.pow(k)).sum())
        assert abs(got - float(torch.trace(Hk)) / p) <= 5 * std + 1e-10, (k, got, float(torch.trace(Hk)) / p, std)
    # the support: Lanczos finds the extreme eigenvalues first (30 steps of a 48-dimensional operator)
    assert rel(nodes.max(), lam[-1]) < 1e-6 and abs(float(nodes.min() - lam[0])) < 1e-6 * float(lam.abs().max())


def test_per_layer_traces_sum_to_the_trace_and_equal_the_dense_blocks():
    ht = HessianTrace(every_n_steps=10, per_layer=True)
    dm, net, _ = setup([ht])
    H, ws = dense(net, dm)
    sizes = [w.numel() for w in ws]
    blocks = [float(d.sum()) for d in H.diagonal().split(sizes)]
    layers = [ht.last[f"hessian/trace/layer{j + 1}"] for j in range(3)]
    # both exact: float64 rounding of sums of a few thousand O(1) terms
    assert abs(sum(layers) - ht.last["hessian/trace"]) <= 1e-10 * ht.last["hessian/trace"]
    assert all(rel(a, b) < 1e-10 for a, b in zip(layers, blocks))


def test_per_layer_sharpness_is_the_top_eigenvalue_of_each_block():
    sh = Sharpness(every_n_steps=10, per_layer=True, tol=1e-12)
    dm, net, _ = setup([sh])
    H, ws = dense(net, dm)
    sizes = [w.numel() for w in ws]
    starts = [sum(sizes[:j]) for j in range(3)]
    for j in range(3):
        block = H[starts[j]:starts[j] + sizes[j], starts[j]:starts[j] + sizes[j]]
        assert rel(sh.last[f"hessian/sharpness/layer{j + 1}"], torch.linalg.eigvalsh(block)[-1]) < 1e-9


def test_per_layer_with_replicas_and_quadratic_net():
    ht, sh = HessianTrace(every_n_steps=10, per_layer=True), Sharpness(every_n_steps=10, per_layer=True, tol=1e-12)
    dm, net, _ = setup([ht, sh], replicas=2)
    for r in range(2):
        H, ws = dense(net, dm, r)
        sizes = [w.numel() for w in ws]
        first = H[:sizes[0], :sizes[0]]
        assert rel(ht.replica_history["hessian/trace/layer1"][-1][1][r], torch.trace(first)) < 1e-10
        assert rel(sh.replica_history["hessian/sharpness/layer1"][-1][1][r], torch.linalg.eigvalsh(first)[-1]) < 1e-9
    # QuadraticNet has no per-factor closed form: the dense Hessian's blocks
    from lightning_flat.datamodules import QuadraticSensingDataModule

    dm = QuadraticSensingDataModule(n=30, d=4, rank_pos=1, rank_neg=1, batch_size=None, seed=0)
    net = QuadraticNet(4, 2, 1, lr=0.01)
    ht = HessianTrace(every_n_steps=5, per_layer=True)
    tr, _ = trainer(5, [ht])
    tr.fit(net, dm)
    parts = [ht.last["hessian/trace/layer1"], ht.last["hessian/trace/layer2"]]
    assert abs(sum(parts) - ht.last["hessian/trace"]) <= 1e-9 * abs(ht.last["hessian/trace"])


def test_density_heatmap_draws(tmp_path):
    from lightning_flat.plotting import density_heatmap, figure, save

    sd = SpectralDensity(every_n_steps=5)
    setup([sd])
    fig, axes = figure(1, 1)
    im = density_heatmap(axes[0][0], sd.densities, lines={"2/lr": ([0, 20], [100.0, 100.0])})
    assert im.get_array().shape == (200, len(sd.densities))  # one column per measured step
    assert save(fig, tmp_path / "d.png") and (tmp_path / "d.png").stat().st_size > 1000


def test_bad_arguments():
    with pytest.raises(ValueError, match="method must be one of"):
        SpectralDensity(method="pyhessian")
    with pytest.raises(TypeError, match="per_layer must be True or False"):
        HessianTrace(per_layer="yes")


@pytest.mark.parametrize("threshold", [3.0, "0.05*2/lr"])
def test_tracked_eigenvalues_are_every_eigenvalue_above_the_threshold(threshold):
    sh = EigenvaluesAbove(threshold, every_n_steps=10, tol=1e-10)
    dm, net, _ = setup([sh])
    H, _ = dense(net, dm)
    lam = torch.linalg.eigvalsh(H).flip(0)
    level = 3.0 if threshold == 3.0 else 0.05 * 2 / 0.02
    want = lam[lam > level]
    step, got = sh.tracked[-1]
    assert step == 20 and len(got) == len(want) >= 2
    # LOBPCG converged to residual 1e-10 relative: eigenvalues to ~1e-10 relative (squared for well separated ones)
    assert all(rel(a, b) < 1e-6 for a, b in zip(got, want))
    assert sh.last["hessian/above/count"] == len(want)


def test_tracking_is_cheaper_warm():
    sh = EigenvaluesAbove(3.0, every_n_steps=1, tol=1e-8)
    setup([sh], steps=6)
    hvps = [v for _, v in sh.history["hessian/above/hvps"]]
    assert hvps[-1] < hvps[0]  # warm-started from the previous read's vectors


def test_bad_threshold():
    with pytest.raises(ValueError, match="threshold must be a number, '2/lr' or 'c\\*2/lr'"):
        EigenvaluesAbove("twice the lr")


class AdamRegression(__import__("lightning").LightningModule):
    """A user's float64 tanh regression trained with Adam (or plain SGD), [x, y] batches of 8."""

    def __init__(self, adam=True):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
        g = torch.Generator().manual_seed(1)
        self.x, self.y = torch.randn(16, 3, generator=g, dtype=torch.float64), torch.randn(16, 2, generator=g,
                                                                                         dtype=torch.float64)
        self.adam = adam

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.mse_loss(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01) if self.adam else torch.optim.SGD(self.parameters(), 0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(self.x, self.y), batch_size=8)


def _flat_fn(net, loss_of_params):
    return flat_function(dict(net.named_parameters()), loss_of_params)


def test_gauss_newton_sharpness_against_dense_jacobians():
    model = AdamRegression(adam=False)
    fwd = lambda m, b: m(b[0])  # noqa: E731  (through the module's forward, where the operator swaps parameters)
    loss_of_output = lambda out, b: torch.nn.functional.mse_loss(out, b[1])  # noqa: E731
    sh = Sharpness(every_n_steps=1, options=CurvatureOptions(gauss_newton=(fwd, loss_of_output)), tol=1e-12)
    tr, _ = trainer(1, [sh])
    W0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    tr.fit(model)
    x = model.x[:8]
    net = AdamRegression(adam=False).net
    f, flat = _flat_fn(net, lambda P: torch.func.functional_call(net, P, (x,)).reshape(-1))
    flat = torch.cat([W0[n].reshape(-1) for n in W0])
    J = torch.func.jacrev(f)(flat)  # (8*2, p)
    G = J.T @ J * (2.0 / J.shape[0])  # mse_loss (mean): H_loss = (2/N) I
    step, value = sh.history["ggn/sharpness"][0]
    assert step == 0 and rel(value, torch.linalg.eigvalsh(G)[-1]) < 1e-9
    assert "hessian/sharpness" not in sh.history


def test_preconditioned_sharpness_against_the_dense_hessian():
    model = AdamRegression()
    sh = PreconditionedSharpness(every_n_steps=2, tol=1e-12)
    tr, _ = trainer(2, [sh])
    tr.fit(model)
    opt = tr.optimizers[0]
    x, y = model.x[:8], model.y[:8]
    net = model.net
    f, flat = _flat_fn(net, lambda P: torch.nn.functional.mse_loss(torch.func.functional_call(net, P, (x,)), y))
    H = torch.func.hessian(f)(flat)
    beta2, eps = opt.param_groups[0]["betas"][1], opt.param_groups[0]["eps"]
    v = torch.cat([(opt.state[p]["exp_avg_sq"] / (1 - beta2 ** float(opt.state[p]["step"]))).reshape(-1)
                   for p in net.parameters()])
    s = (v.sqrt() + eps).rsqrt()
    want = torch.linalg.eigvalsh(s[:, None] * H * s[None, :])[-1]
    assert rel(sh.last["hessian/preconditioned_sharpness"], want) < 1e-8
    assert math.isnan(sh.history["hessian/preconditioned_sharpness"][0][1])  # step 0: no second moments yet


def test_density_reaches_wandb_as_a_histogram(tmp_path, monkeypatch):
    import glob

    import lightning as L
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    dm = MatrixSensingDataModule(n=40, d_out=4, d_in=3, rank=1, batch_size=8, seed=0)
    logger = WandbLogger(project="lightning-flat", save_dir=str(tmp_path), offline=True)
    tr = L.Trainer(max_steps=10, logger=logger, callbacks=[SpectralDensity(every_n_steps=5)], precision="64-true",
                   enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False)
    tr.fit(DeepLinearNet([3, 5, 4, 4], lr=0.02), dm)
    logger.experiment.finish()
    wandb.teardown()  # wandb 0.31's finish() returns before the record is on disk; teardown waits for it
    (record,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    data = open(record, "rb").read()
    assert b"spectrum/density" in data and b"histogram" in data and b"spectrum/mean" in data
