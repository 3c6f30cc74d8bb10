"""The exact curvature core against dense torch.func.hessian references (float64)."""

import pytest
import torch

from conftest import F64, randn, rel
from helpers import make_measurements
from lightning_flat import functional as F
from lightning_flat.measurements import Dense

DIMS = {
    1: [3, 4],
    2: [3, 5, 4],
    3: [3, 4, 5, 3],  # the spec's T1 instance
    4: [2, 5, 3, 6, 4],
}




def weights(dims, g, scale=1.0):
    return [scale * randn(dims[j + 1], dims[j], g=g) for j in range(len(dims) - 1)]


@pytest.mark.parametrize("kind", ["dense", "rankone", "entries"])
@pytest.mark.parametrize("depth", [1, 2, 3, 4], ids=lambda L: f"L{L}")
def test_trace_equals_dense_hessian_trace(kind, depth, gen):
    dims = DIMS[depth]
    m = make_measurements(kind, 5, dims[-1], dims[0], gen)
    W = weights(dims, gen)
    b = randn(5, g=gen)  # random targets: W is not an interpolating point
    assert F.measurement_loss(F.end_to_end(W), m, b) > 1e-2
    H = F.loss_hessian(W, m, b)
    assert rel(F.hessian_trace(W, m), torch.trace(H)) < 1e-10
    assert rel(F.hessian_trace(W, m, b), torch.trace(H)) < 1e-10


@pytest.mark.parametrize("method", ["moment", "direct"])
def test_dense_trace_methods(method, gen, monkeypatch):
    m = Dense(randn(40, 4, 3, g=gen))
    W = weights([3, 5, 4], gen)
    ref = torch.trace(F.loss_hessian(W, m, randn(40, g=gen)))
    orig = m.curvature
    monkeypatch.setattr(m, "curvature", lambda G, K, **kw: orig(G, K, method=method, **kw))
    assert rel(F.hessian_trace(W, m), ref) < 1e-10


def test_trace_broadcasts_over_replicas(gen):
    m = make_measurements("dense", 6, 4, 3, gen)
    Ws = [randn(3, 5, 3, g=gen), randn(3, 4, 5, g=gen)]
    batched = F.hessian_trace(Ws, m)
    single = torch.stack([F.hessian_trace([W[r] for W in Ws], m) for r in range(3)])
    assert batched.shape == (3,) and rel(batched, single) < 1e-12


def test_trace_is_differentiable(gen):
    m = make_measurements("dense", 6, 3, 3, gen)
    W = [w.requires_grad_() for w in weights([3, 4, 3], gen)]
    torch.autograd.gradcheck(lambda a, b: F.hessian_trace([a, b], m), tuple(W))


def test_trace_surrogate_and_loss(gen):
    W = weights([3, 4, 2], gen)
    P, S = F.partial_products(W)
    ref = sum(torch.linalg.matrix_norm(P[j]) ** 2 * torch.linalg.matrix_norm(S[j]) ** 2 for j in range(2))
    assert rel(F.trace_surrogate(W), ref) < 1e-13
    assert rel(P[1], W[0]) == 0 and rel(S[0], W[1]) == 0
    m = make_measurements("dense", 5, 2, 3, gen)
    b = randn(5, g=gen)
    E = W[1] @ W[0]
    assert rel(F.measurement_loss(E, m, b), ((torch.einsum("nij,ij->n", m.A, E) - b) ** 2).mean()) < 1e-13


@pytest.mark.parametrize("kind", ["dense", "entries"])
@pytest.mark.parametrize("method", ["exact", "lanczos"])
def test_sharpness_equals_eigvalsh(kind, method, gen):
    m = make_measurements(kind, 8, 4, 3, gen)
    W = weights([3, 5, 4], gen)
    b = randn(8, g=gen)
    top = torch.linalg.eigvalsh(F.loss_hessian(W, m, b))[-1]
    assert rel(F.sharpness(W, m, b, method=method), top) < 1e-6


def test_lanczos_finds_largest_algebraic_not_largest_magnitude(gen):
    Q = torch.linalg.qr(randn(6, 6, g=gen)).Q
    H = Q @ torch.diag(torch.tensor([-10.0, -5.0, 0.5, 1.0, 2.0, 3.0], dtype=F64)) @ Q.T
    theta, v, _ = F.top_hessian_eigenpair(lambda x: H @ x, 6, dtype=F64, device=torch.device("cpu"))
    assert abs(float(theta) - 3.0) < 1e-10
    assert rel((H @ v).abs(), (3.0 * v).abs()) < 1e-8


def test_lanczos_warm_start_uses_fewer_hvps(gen):
    m = make_measurements("dense", 30, 6, 6, gen)
    W = weights([6, 8, 8, 6], gen)
    b = randn(30, g=gen)
    hvp, w0 = F.loss_hvp(W, m, b)
    theta, v, cold = F.top_hessian_eigenpair(hvp, w0.numel(), dtype=F64, device=w0.device, tol=1e-10)
    theta2, _, warm = F.top_hessian_eigenpair(hvp, w0.numel(), dtype=F64, device=w0.device, v0=v, tol=1e-10)
    assert rel(theta2, theta) < 1e-9 and warm < cold


def test_sharpness_replicas(gen):
    m = make_measurements("dense", 5, 2, 2, gen)
    Ws = [randn(2, 3, 2, g=gen), randn(2, 2, 3, g=gen)]
    b = randn(5, g=gen)
    out = F.sharpness(Ws, m, b)
    ref = torch.stack([torch.linalg.eigvalsh(F.loss_hessian([W[r] for W in Ws], m, b))[-1] for r in range(2)])
    assert out.shape == (2,) and rel(out, ref) < 1e-10


def test_bad_weights():
    m = Dense(torch.zeros(2, 3, 3, dtype=F64))
    with pytest.raises(ValueError, match=r"weights\[1\] has shape"):
        F.end_to_end([torch.zeros(4, 3), torch.zeros(3, 5)])
    with pytest.raises(ValueError, match="at least one layer"):
        F.hessian_trace([], m)
    with pytest.raises(TypeError, match="weights must be a list"):
        F.end_to_end(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="measurements have shape"):
        F.hessian_trace([torch.zeros(2, 3, dtype=F64)], m)
    with pytest.raises(ValueError, match="method must be one of"):
        F.sharpness([torch.zeros(3, 3, dtype=F64)], m, torch.zeros(2, dtype=F64), method="power")


def test_top_eigenpairs_lobpcg_against_eigvalsh():
    g = torch.Generator().manual_seed(4)
    A = torch.randn(40, 40, generator=g, dtype=torch.float64)
    H = A @ A.T / 40 - torch.eye(40, dtype=torch.float64) + torch.diag(torch.linspace(0, 8, 40, dtype=torch.float64))
    lam, vec = torch.linalg.eigh(H)
    theta, X, hvps = F.top_eigenpairs(lambda v: H @ v, 40, 5, dtype=torch.float64, device="cpu", tol=1e-10)
    # residual 1e-10: eigenvalues to ~1e-10 and better (error ~ residual^2 / gap)
    assert float((theta - lam.flip(0)[:5]).abs().max()) < 1e-9
    assert float((H @ X - X * theta).norm(dim=0).max()) < 1e-9 * float(theta.abs().max())
    # warm start from the answer: converged at the first check
    _, _, warm = F.top_eigenpairs(lambda v: H @ v, 40, 5, dtype=torch.float64, device="cpu", tol=1e-8, X0=X)
    assert warm == 5 and hvps > warm
