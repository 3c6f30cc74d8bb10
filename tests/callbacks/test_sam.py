"""One SAM step against hand-computed updates (float64, 1e-10): n-SAM, m-SAM, 1-SAM, ASAM, unnormalized, on a
DeepLinearNet and on a plain user LightningModule."""

import lightning as L
import pytest
import torch

from conftest import F64, rel
from helpers import trainer
from lightning_flat import functional as F
from lightning_flat.callbacks import SAM, FiniteLossGuard, HyperparameterSchedule, LabelNoise
from lightning_flat.datamodules import MatrixSensingDataModule, MeasurementSampler
from lightning_flat.models import DeepLinearNet

LR, RHO = 0.1, 0.05


def sam_eps(g, W, rho, adaptive=False, normalize=True, eta=0.01):
    T = [w.abs() + eta for w in W] if adaptive else [torch.ones_like(w) for w in W]
    if not normalize:
        return [rho * t * t * gi for t, gi in zip(T, g)]
    norm = torch.sqrt(sum(((t * gi) ** 2).sum() for t, gi in zip(T, g)))
    return [rho * t * t * gi / norm for t, gi in zip(T, g)]


def dln_reference(W0, batch_A, batch_b, chunks, **kw):
    """W0 - lr * sum_c |c|/B grad L_c(W0 + eps_c) by explicit loops."""
    B = len(batch_b)

    def loss(W, idx):
        E = W[1] @ W[0]
        return ((torch.einsum("nij,ij->n", batch_A[idx], E) - batch_b[idx]) ** 2).mean()

    total = [torch.zeros_like(w) for w in W0]
    for idx in chunks:
        W = [w.clone().requires_grad_() for w in W0]
        g = torch.autograd.grad(loss(W, idx), W)
        eps = sam_eps(g, W0, RHO, **kw)
        Wp = [(w + e).requires_grad_() for w, e in zip(W0, eps)]
        gp = torch.autograd.grad(loss(Wp, idx), Wp)
        total = [t + len(idx) / B * gi for t, gi in zip(total, gp)]
    return [w - LR * t for w, t in zip(W0, total)]


def run_dln(sam, batch_size):
    dm = MatrixSensingDataModule(n=20, d_out=3, d_in=3, rank=1, batch_size=batch_size, seed=0)
    net = DeepLinearNet([3, 4, 3], lr=LR, seed=1)
    W0 = [w.detach().double().clone() for w in net.weights()]
    tr, _ = trainer(1, [sam])
    tr.fit(net, dm)
    batch = MeasurementSampler(dm.measurements, dm.targets, batch_size, dm.seed, 10, streams=[1]).batch(0)
    return [w.detach() for w in net.weights()], W0, batch.measurements.A, batch.targets


@pytest.mark.parametrize(
    "m, B, kw",
    [(None, 6, {}), (None, 6, {"normalize": False}), (None, 6, {"adaptive": True}),
     (1, 6, {}), (1, 6, {"normalize": False}), (1, 6, {"adaptive": True}), (2, 6, {}), (2, 5, {}), (4, 5, {})],
    ids=["nSAM", "nSAM-unnormalized", "nASAM", "1SAM", "1SAM-unnormalized", "1ASAM", "2SAM", "2SAM-remainder",
         "4SAM-remainder"],
)
def test_one_sam_step_on_deep_linear_net(m, B, kw):
    W1, W0, A, b = run_dln(SAM(rho=RHO, m=m, **kw), B)
    if m is None:
        chunks = [list(range(B))]
    else:
        chunks = [list(range(i, min(i + m, B))) for i in range(0, B, m)]
    ref = dln_reference(W0, A, b, chunks, **kw)
    assert all(rel(w, r) < 1e-10 for w, r in zip(W1, ref))


def test_rho_zero_is_plain_sgd_and_sam_is_not():
    W_sam, W0, A, b = run_dln(SAM(rho=RHO), 6)
    W_sgd, *_ = run_dln(SAM(rho=0.0), 6)
    W = [w.clone().requires_grad_() for w in W0]
    g = torch.autograd.grad(((torch.einsum("nij,ij->n", A, W[1] @ W[0]) - b) ** 2).mean(), W)
    plain = [w - LR * gi for w, gi in zip(W0, g)]
    assert all(rel(w, p) < 1e-12 for w, p in zip(W_sgd, plain))
    assert rel(W_sam[0], plain[0]) > 1e-6


class UserMLP(L.LightningModule):
    """A user's own module: knows nothing of lightning_flat; batches are [x, y] lists."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(8, 3, generator=g)
        self.y = torch.randn(8, 1, generator=g)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("my_loss", loss)
        return {"loss": loss}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR)

    def train_dataloader(self):
        ds = torch.utils.data.TensorDataset(self.x, self.y)
        return torch.utils.data.DataLoader(ds, batch_size=6, shuffle=False)


@pytest.mark.parametrize("m", [None, 1, 3], ids=["nSAM", "1SAM", "3SAM"])
def test_one_sam_step_on_a_user_module(m):
    model = UserMLP()
    names = [n for n, _ in model.named_parameters()]
    W0 = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    x, y = model.x[:6].double(), model.y[:6].double()
    tr, _ = trainer(1, [SAM(rho=RHO, m=m)])
    tr.fit(model)

    ref_net = UserMLP().net.double()

    def loss(params, idx):
        return torch.nn.functional.mse_loss(torch.func.functional_call(ref_net, params, (x[idx],)), y[idx])

    chunks = [list(range(6))] if m is None else [list(range(i, i + m)) for i in range(0, 6, m)]
    total = {n: torch.zeros_like(W0[n]) for n in names}
    for idx in chunks:
        P = {n.removeprefix("net."): W0[n].clone().requires_grad_() for n in names}
        g = torch.autograd.grad(loss(P, idx), list(P.values()))
        eps = sam_eps(g, list(P.values()), RHO)
        Pp = {k: (v.detach() + e).requires_grad_() for (k, v), e in zip(P.items(), eps)}
        gp = torch.autograd.grad(loss(Pp, idx), list(Pp.values()))
        for n, gi in zip(names, gp):
            total[n] += len(idx) / 6 * gi
    for n, p in model.named_parameters():
        assert rel(p, W0[n] - LR * total[n]) < 1e-10, n


def test_label_noise_enters_ascent_and_descent_alike():
    """With LabelNoise, the SAM step equals the hand-computed one on the noisy targets of that step."""
    noise = LabelNoise(0.5, seed=3)
    dm = MatrixSensingDataModule(n=20, d_out=3, d_in=3, rank=1, batch_size=6, seed=0)
    net = DeepLinearNet([3, 4, 3], lr=LR, seed=1)
    W0 = [w.detach().double().clone() for w in net.weights()]
    tr, _ = trainer(1, [SAM(rho=RHO), noise])  # SAM listed first: the order must not matter
    tr.fit(net, dm)
    batch = MeasurementSampler(dm.measurements, dm.targets, 6, dm.seed, 10, streams=[1]).batch(0)
    b = batch.targets + 0.5 * noise.noise((6,), 0, 0, F64, torch.device("cpu"), streams=[1])
    ref = dln_reference(W0, batch.measurements.A, b, [list(range(6))])
    assert all(rel(w, r) < 1e-10 for w, r in zip(net.weights(), ref))


def test_sam_rho_schedule_and_guard_interplay():
    def run(steps, rho, schedule=True):
        dm = MatrixSensingDataModule(n=20, d_out=3, d_in=3, rank=1, batch_size=6, seed=0)
        net, sam = DeepLinearNet([3, 4, 3], lr=LR), SAM(rho=rho)
        cbs = [sam, FiniteLossGuard()] + ([HyperparameterSchedule(sam_rho=[(0, 0.0), (2, 0.05)])] if schedule else [])
        tr, mem = trainer(steps, cbs)
        tr.fit(net, dm)
        return net.weights(), sam, mem

    W2, _, _ = run(2, 1.0)
    plain2, _, _ = run(2, 0.0, schedule=False)
    assert all(torch.equal(a, b) for a, b in zip(W2, plain2))  # rho = 0 for steps 0 and 1: plain SGD
    W4, sam, mem = run(4, 1.0)
    other4, _, _ = run(4, 0.3)  # the configured rho does not matter under the schedule
    plain4, _, _ = run(4, 0.0, schedule=False)
    assert all(torch.equal(a, b) for a, b in zip(W4, other4))
    assert not torch.equal(W4[0], plain4[0])  # rho = 0.05 from step 2 on
    assert sam.rho == 1.0 and mem.series("hparams/sam_rho") == ([0, 2], [0.0, 0.05])


def test_sam_perturbation_properties():
    g = [torch.tensor([[3.0, 0.0]], dtype=F64), torch.tensor([4.0], dtype=F64)]
    eps = F.sam_perturbation(g, 0.5)
    assert rel(torch.sqrt(sum((e ** 2).sum() for e in eps)), 0.5) < 1e-15
    assert all(e.eq(0).all() for e in F.sam_perturbation([torch.zeros(3)], 0.5))
    # per-replica norms
    gr = [torch.tensor([[3.0, 4.0], [0.0, 1.0]], dtype=F64)]
    er = F.sam_perturbation(gr, 1.0, replica_dims=1)[0]
    assert rel(er.norm(dim=1), torch.ones(2, dtype=F64)) < 1e-15
    with pytest.raises(ValueError, match="adaptive SAM needs params"):
        F.sam_perturbation(g, 0.5, adaptive=True)


@pytest.mark.parametrize("kwargs, match", [(dict(rho=-0.1), "rho must be >= 0"), (dict(m=0), "m must be a positive"),
                                           (dict(eta=-1.0), "eta must be >= 0")], ids=["rho", "m", "eta"])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SAM(**kwargs)
