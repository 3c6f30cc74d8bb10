import pytest
import torch

from conftest import rel
from helpers import trainer
from lightning_flat.callbacks import HessianTrace, Sharpness
from lightning_flat.datamodules import QuadraticSensingDataModule
from lightning_flat.models import QuadraticNet


def dense_hessian(model, dm):
    U1, U2 = (w.detach() for w in model.weights())
    k1, d = U1.shape[1], U1.shape[0]

    def loss(v):
        a, c = v[: d * k1].reshape(d, k1), v[d * k1:].reshape(d, -1)
        return ((dm.measurements(a @ a.T - c @ c.T) - dm.targets) ** 2).mean()

    return torch.func.hessian(loss)(torch.cat([U1.reshape(-1), U2.reshape(-1)]))


def test_callbacks_use_the_quadratic_closed_form():
    dm = QuadraticSensingDataModule(n=30, d=4, rank_pos=2, rank_neg=1, batch_size=10, seed=0)
    model = QuadraticNet(4, 3, 2, lr=0.01, seed=1)
    trace, sharp = HessianTrace(5), Sharpness(5, method="lanczos", tol=1e-10)
    tr, mem = trainer(10, [trace, sharp])
    tr.fit(model, dm)
    H = dense_hessian(model, dm)
    assert rel(mem.last("hessian/trace"), torch.trace(H)) < 1e-10  # residual term included (k1 != k2)
    assert rel(mem.last("hessian/sharpness"), torch.linalg.eigvalsh(H)[-1]) < 1e-6
    # E = U1 U1^T - U2 U2^T is symmetric; gemm need not sum entries (i, j) and (j, i) in one order, and each is a
    # k-term dot product (k <= 3): they differ by at most 2 k eps |U_i||U_j| per product, plus the subtraction
    E = model.end_to_end()
    U1, U2 = (w.detach() for w in model.weights())
    eps = torch.finfo(E.dtype).eps
    bound = 2 * 3 * eps * float(U1.square().sum(1).max() + U2.square().sum(1).max()) + eps * float(E.abs().max())
    assert float((E - E.T).abs().max()) <= bound


def test_trace_penalty_lowers_the_trace():
    dm = QuadraticSensingDataModule(n=40, d=4, rank_pos=1, rank_neg=1, batch_size=None, seed=0)
    traces = []
    for lam in (0.0, 1e-2):
        model = QuadraticNet(4, 2, 2, lr=0.02, seed=1, trace_penalty=lam)
        tr, _ = trainer(300, [])
        tr.fit(model, dm)
        traces.append(float(model.hessian_trace(dm.measurements, dm.targets)))
    assert traces[1] < 0.9 * traces[0]


def test_bad_arguments():
    with pytest.raises(ValueError, match="k1 must be a positive int"):
        QuadraticNet(4, 0)
    with pytest.raises(ValueError, match="k2 must be a non-negative int"):
        QuadraticNet(4, 1, -1)
    with pytest.raises(ValueError, match="needs the targets"):
        QuadraticNet(3, 1).hessian_trace(QuadraticSensingDataModule(n=5, d=3).measurements)
