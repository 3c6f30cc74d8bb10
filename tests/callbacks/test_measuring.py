import pytest
import torch

from conftest import rel
from helpers import trainer
from lightning_flat import functional as F
from lightning_flat.callbacks import (
    CurvatureOptions,
    Balancedness,
    EffectiveRank,
    FiniteLossGuard,
    HessianTrace,
    LabelNoise,
    MatrixNorms,
    Sharpness,
)
from lightning_flat.datamodules import MatrixSensingDataModule
from lightning_flat.models import DeepLinearNet


def setup(steps=30, callbacks=(), seed=0):
    dm = MatrixSensingDataModule(n=40, d_out=4, d_in=3, rank=1, batch_size=8, seed=0)
    net = DeepLinearNet([3, 5, 4, 4], lr=0.02, seed=seed)
    tr, mem = trainer(steps, callbacks)
    tr.fit(net, dm)
    return dm, net, mem


def test_logged_values_are_the_closed_forms_at_their_steps():
    cbs = [HessianTrace(7), Sharpness(7), Balancedness(7, per_layer=True), EffectiveRank(7, layers=True),
           MatrixNorms(7)]
    dm, net, mem = setup(30, cbs)
    W = [w.detach() for w in net.weights()]
    E = F.end_to_end(W)
    steps, _ = mem.series("hessian/trace")
    assert steps == [0, 7, 14, 21, 28, 30]  # start, every 7 steps, end
    assert rel(mem.last("hessian/trace"), F.hessian_trace(W, dm.measurements)) < 1e-12
    H = F.loss_hessian(W, dm.measurements, dm.targets)
    assert rel(mem.last("hessian/sharpness"), torch.linalg.eigvalsh(H)[-1]) < 1e-10
    assert rel(mem.last("balance/total"), F.balancedness(W)) < 1e-12
    assert rel(mem.last("balance/layer2"), F.balancedness(W, per_layer=True)[1]) < 1e-12
    assert rel(mem.last("rank/effective_end_to_end"), F.effective_rank(E)) < 1e-12
    assert rel(mem.last("rank/stable_layer1"), F.effective_rank(W[0], "stable")) < 1e-12
    assert rel(mem.last("norm/nuclear"), F.nuclear_norm(E)) < 1e-12
    assert rel(mem.last("norm/frobenius"), torch.linalg.matrix_norm(E)) < 1e-12
    assert cbs[0].history["hessian/trace"][-1][0] == 30


def test_sharpness_lanczos_warm_start():
    cb = Sharpness(5, method="lanczos", tol=1e-10)
    dm, net, mem = setup(20, [cb])
    W = [w.detach() for w in net.weights()]
    H = F.loss_hessian(W, dm.measurements, dm.targets)
    assert rel(mem.last("hessian/sharpness"), torch.linalg.eigvalsh(H)[-1]) < 1e-6
    hvps = [v for _, v in cb.history["hessian/sharpness_hvps"]]
    assert hvps[-1] < hvps[0]  # warm-started reads need fewer products than the cold first one


def test_measuring_callbacks_do_not_change_training():
    base = [LabelNoise(1.0), FiniteLossGuard()]
    _, plain, _ = setup(25, base)
    measured = base + [HessianTrace(3), Sharpness(4, method="lanczos"), Balancedness(2), EffectiveRank(5),
                       MatrixNorms(1)]
    _, net, _ = setup(25, [LabelNoise(1.0), FiniteLossGuard()] + measured[2:])
    assert all(torch.equal(a, b) for a, b in zip(plain.weights(), net.weights()))


def test_generic_module_hutchpp_with_full_budget_is_exact():
    import lightning as L

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(0)
            self.net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()
            self.x = torch.randn(16, 3, generator=g, dtype=torch.float64)
            self.y = torch.randn(16, 1, generator=g, dtype=torch.float64)

        def training_step(self, batch, i):
            x, y = batch
            loss = (self.net(x) - y).pow(2).mean()
            self.log("loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

        def train_dataloader(self):
            return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(self.x, self.y), batch_size=16)

    m = Tiny()
    cb = HessianTrace(1, num_matvecs=3 * 21)
    tr, mem = trainer(2, [cb], precision="64-true")
    tr.fit(m)
    params = list(m.parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in params])

    def loss_of(v):
        out, k = [], 0
        for p in params:
            out.append(v[k:k + p.numel()].reshape(p.shape))
            k += p.numel()
        h = torch.tanh(m.x @ out[0].T + out[1])
        return ((h @ out[2].T + out[3]) - m.y).pow(2).mean()

    ref = torch.trace(torch.func.hessian(loss_of)(flat))
    assert rel(mem.last("hessian/trace"), ref) < 1e-6


@pytest.mark.parametrize("cls", [HessianTrace, Sharpness, Balancedness, EffectiveRank, MatrixNorms, FiniteLossGuard])
def test_every_n_steps_must_be_positive(cls):
    with pytest.raises(ValueError, match="every_n_steps must be a positive int, got 0"):
        cls(every_n_steps=0)
    with pytest.raises(TypeError, match="every_n_steps must be a positive int"):
        cls(every_n_steps=1.5)


def test_other_bad_arguments():
    with pytest.raises(ValueError, match="kinds must be one of"):
        EffectiveRank(kinds=("entropy", "renyi"))
    with pytest.raises(ValueError, match="method must be one of"):
        Sharpness(method="power")
    with pytest.raises(ValueError, match="measurements and targets must be given together"):
        CurvatureOptions(measurements=MatrixSensingDataModule(n=3, d_out=2, d_in=2, rank=1).measurements)
    with pytest.raises(ValueError, match="num_matvecs must be a positive int"):
        HessianTrace(num_matvecs=0)


def test_singular_values_approximate_rank_and_representation_cost():
    """Against torch.linalg on the final weights, replicas included (the callbacks' per-replica histories)."""
    from lightning_flat.callbacks import ApproximateRank, SingularValues

    dm = MatrixSensingDataModule(n=40, d_out=4, d_in=3, rank=1, batch_size=8, seed=0)
    net = DeepLinearNet([3, 5, 4, 4], lr=0.02, replicas=3, seed=0)
    sv, ar, mn = SingularValues(5, top=2), ApproximateRank(10, alpha=0.05, per_layer=True), MatrixNorms(10)
    tr, mem = trainer(20, [sv, ar, mn])
    tr.fit(net, dm)
    W = [w.detach() for w in net.weights()]
    T = lambda values: torch.tensor(values, dtype=torch.float64)  # noqa: E731  (the histories are float64 lists)
    E = F.end_to_end(W)
    s = torch.linalg.svdvals(E)  # (3 replicas, 3)
    assert [h[0] for h in sv.replica_history["sv/s1"]] == [0, 5, 10, 15, 20]
    assert set(sv.last) == {"sv/s1", "sv/s2", "sv/ratio2"}  # top=2
    assert rel(T(sv.replica_history["sv/s2"][-1][1]), s[:, 1]) < 1e-12
    assert rel(T(sv.replica_history["sv/ratio2"][-1][1]), s[:, 1] / s[:, 0]) < 1e-12
    assert rel(mem.last("sv/ratio2/r1"), s[1, 1] / s[1, 0]) < 1e-12
    # approximate rank: sum of f_alpha(s_i(W_j)^2), by hand
    f = lambda x: torch.where(x <= 0.05, x * (0.1 - x) / 0.05 ** 2, torch.ones_like(x))  # noqa: E731
    per_layer = torch.stack([f(torch.linalg.svdvals(w).square()).sum(-1) for w in W])  # (layers, replicas)
    assert rel(T(ar.replica_history["rank/approx"][-1][1]), per_layer.amax(0)) < 1e-12
    assert rel(T(ar.replica_history["rank/approx_layer2"][-1][1]), per_layer[1]) < 1e-12
    cost = 3 * s.pow(2 / 3).sum(-1)
    assert rel(T(mn.replica_history["norm/representation_cost"][-1][1]), cost) < 1e-12
    weights_sq = sum(w.square().sum((-2, -1)) for w in W)
    assert bool((weights_sq >= cost).all())  # the representation cost is the minimum over factorisations


def test_singular_values_of_zero_matrix_are_logged_without_ratio():
    from lightning_flat.callbacks import SingularValues

    dm = MatrixSensingDataModule(n=40, d_out=4, d_in=3, rank=1, batch_size=8, seed=0)
    net = DeepLinearNet([3, 4], lr=0.0, seed=0)
    with torch.no_grad():
        net.weights()[0].zero_()
    sv = SingularValues(5)
    tr, mem = trainer(5, [sv])
    tr.fit(net, dm)
    assert mem.last("sv/s1") == 0.0 and "sv/ratio2" not in mem.history
    assert all(v != v for _, v in sv.history["sv/ratio2"])  # 0/0: NaN in the history, never logged
    with pytest.raises(ValueError, match="top"):
        SingularValues(5, top=0)


def test_results_table_at_the_end_of_fit(caplog):
    import logging

    from lightning_flat.callbacks.base import results_table

    caplog.set_level(logging.INFO, logger="lightning.pytorch.utilities.rank_zero")  # (examples may quiet it)
    sh, mn = Sharpness(10, edge_of_stability=True), MatrixNorms(10)
    dm, net, mem = setup(30, [sh, mn])
    table = results_table([sh, mn])
    lines = table.splitlines()
    assert lines[0].split()[:6] == ["measured", "steps", "first", "last", "min", "max"]
    row = next(line for line in lines if line.startswith("hessian/sharpness "))
    values = [v for _, v in sh.history["hessian/sharpness"]]
    assert row.split()[1] == "0-30" and float(row.split()[3]) == float(f"{values[-1]:.4g}")
    assert f"2/lr = {2 / 0.02:.4g}" in row  # the theory line beside it
    assert not any(line.startswith("hessian/two_over_lr") for line in lines)
    assert table in caplog.text  # logged once at the end of fit, by the last measuring callback
    assert caplog.text.count("measured ") == 1
