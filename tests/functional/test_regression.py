"""Univariate-regression closed forms against the dense Hessian of the library's loss (float64, eigvalsh).

Tolerances: the dense Hessian of <= 250 parameters and the closed forms are both O(10^2)-term sums in float64, so
they agree to ~1e-13 relative; the checks use 1e-9."""

import pytest
import torch

from conftest import F64, randn, rel
from lightning_flat import functional as F
from lightning_flat.datamodules import UnivariateRegressionDataModule
from lightning_flat.models import DeepLinearNet, ResidualLinearNet

TOL = 1e-9


@pytest.fixture(scope="module")
def dm():
    return UnivariateRegressionDataModule(n=50, d=5, seed=0)


def dense_sharpness(weights, dm, e2e=None):
    return float(torch.linalg.eigvalsh(F.loss_hessian(weights, dm.measurements, dm.targets, end_to_end=e2e))[-1])


def random_minimizer(dm, depth, gen, w=None):
    """Random W_2..W_L; W_1 = b w*^T/|b|^2 + (I - b b^T/|b|^2) M with b = W_2^T ... W_L^T w: then w_prod = w*."""
    d = dm.w_star.shape[0]
    upper = [randn(d, d, g=gen) for _ in range(depth - 2)] + [randn(1, d, g=gen) if w is None else randn(d, d, g=gen)]
    top = torch.ones(1, 1, dtype=F64) if w is None else w.reshape(1, -1)
    b = F.end_to_end(upper + [top]) if upper else top
    b = b.reshape(-1)
    P = torch.eye(d, dtype=F64) - torch.outer(b, b) / b.square().sum()
    W1 = torch.outer(b, dm.w_star) / b.square().sum() + P @ randn(d, d, g=gen)
    return [W1] + upper


def test_data_and_bounds(dm):
    ls = F.least_squares(dm.X, dm.y)
    assert abs(float(dm.w_star.norm()) - 1) < 1e-12 and float((dm.X.T @ (dm.X @ dm.w_star - dm.y)).norm()) < 1e-10
    assert dm.r_min > 0 and dm.lambda_min <= dm.a <= dm.lambda_max
    assert rel(ls["w_star"], dm.w_star) < 1e-12 and rel(ls["a"], torch.tensor(dm.a, dtype=F64)) < 1e-12
    for L in (2, 10):
        s_l, s_a = F.sharpness_lower_bound(dm.X, dm.y, L), F.sharpness_lower_bound(dm.X, dm.y, L, kind="a")
        assert rel(s_l, torch.tensor(2 * L * dm.lambda_min, dtype=F64)) < 1e-12  # |w*| = 1
        assert rel(s_a, torch.tensor(2 * L * dm.a, dtype=F64)) < 1e-12
        assert rel(F.sharpness_upper_bound(dm.X, dm.y, L), torch.tensor(8 * L * dm.lambda_max, dtype=F64)) < 1e-12
    with pytest.raises(ValueError, match="kind must be one of"):
        F.sharpness_lower_bound(dm.X, dm.y, 3, kind="b")


@pytest.mark.parametrize("depth", [2, 3, 5, 10])
def test_minimizer_sharpness_closed_forms(dm, depth, gen):
    ideal = F.ideal_minimizer(dm.w_star, depth)
    s_ideal = dense_sharpness(ideal, dm)
    assert abs(F.minimizer_sharpness(ideal, dm.X) / s_ideal - 1) < TOL  # T1b
    assert abs(float(F.ideal_minimizer_sharpness(dm.X, dm.y, depth)) / s_ideal - 1) < TOL  # T1c
    s_a = float(F.sharpness_lower_bound(dm.X, dm.y, depth, kind="a"))
    assert s_a * (1 - 1e-8) <= s_ideal <= s_a + 2 * (dm.lambda_max - dm.a) + 1e-8
    for _ in range(3):
        W = random_minimizer(dm, depth, gen)
        assert rel(F.end_to_end(W).reshape(-1), dm.w_star) < 1e-10
        s = dense_sharpness(W, dm)
        assert abs(float(F.minimizer_sharpness(W, dm.X)) / s - 1) < TOL
        assert s >= s_a * (1 - 1e-8)  # T1a (hence T1)


def test_residual_minimizer_sharpness_over_the_trained_layers(dm, gen):
    net = ResidualLinearNet(5, 4, 0.3).double()
    net.w = net.w / net.w.norm()  # unit in float64 (the buffer was drawn in the default float32)
    w = net.w
    W = random_minimizer(dm, 4, gen, w=w)
    assert rel(net.end_to_end_from(W).reshape(-1), dm.w_star) < 1e-10
    s = dense_sharpness(W, dm, e2e=net.end_to_end_from)
    assert abs(float(F.minimizer_sharpness(W, dm.X, w=w)) / s - 1) < TOL
    ideal = F.ideal_minimizer(dm.w_star, 4, w=w)
    assert rel(net.end_to_end_from(ideal).reshape(-1), dm.w_star) < 1e-12
    assert abs(dense_sharpness(ideal, dm, e2e=net.end_to_end_from)
               / float(F.ideal_minimizer_sharpness(dm.X, dm.y, 4)) - 1) < TOL


def test_scaled_minimizers_get_sharper(dm):
    W = F.ideal_minimizer(dm.w_star, 3)
    s = [dense_sharpness([C * W[0], W[1] / C, W[2]], dm) for C in (1, 3, 10, 30)]
    assert all(a < b for a, b in zip(s, s[1:])) and s[2] >= 5 * s[0]


def test_conserved_gaps_under_small_step_gd(dm):
    """D_k drifts by O(lr^2) per step: halving lr divides the total drift over the same time by about 2."""
    def drift(lr, steps):
        net = DeepLinearNet([5, 5, 5, 1], init_scale=0.05, seed=1).double()
        W0 = [w.detach().clone() for w in net.weights()]
        W = [w.detach().clone().requires_grad_() for w in W0]
        for _ in range(steps):
            loss = F.measurement_loss(F.end_to_end(W), dm.measurements, dm.targets)
            g = torch.autograd.grad(loss, W)
            with torch.no_grad():
                for w, gw in zip(W, g):
                    w -= lr * gw
        D0, DT = F.conserved_gaps(W0), F.conserved_gaps([w.detach() for w in W])
        return sum(float(torch.linalg.matrix_norm(b - a, ord="nuc")) for a, b in zip(D0, DT)), W0, W

    d1, W0, W = drift(0.02, 200)
    d2, _, _ = drift(0.01, 400)
    assert 0.35 <= d2 / d1 <= 0.65
    assert float(F.epsilon_gd(W0, [w.detach() for w in W])) >= 3 * max(float(w.square().sum()) for w in W0)


def test_residual_model_gradients_trace_and_theta(dm, gen):
    net = ResidualLinearNet(5, 3, 0.5, replicas=2, seed=[4, 7]).double()
    single = ResidualLinearNet(5, 3, 0.5, seed=7).double()
    assert all(torch.equal(a[1], b) for a, b in zip(net.weights(), single.weights()))
    assert torch.equal(net.w[1], single.w) and abs(float(single.w.norm()) - 1) < 1e-7  # unit in float32
    W = [w.detach() for w in single.weights()]
    H = F.loss_hessian(W, dm.measurements, dm.targets, end_to_end=single.end_to_end_from)
    assert rel(single.hessian_trace(dm.measurements), torch.trace(H)) < 1e-12  # trained W_k only
    E, cache = single.end_to_end_and_cache(W)
    _, G = F.gradients.residual_and_end_to_end_gradient(E, dm.measurements, dm.targets)
    leaves = [w.clone().requires_grad_() for w in W]
    ref = torch.autograd.grad(F.measurement_loss(single.end_to_end_from(leaves), dm.measurements, dm.targets), leaves)
    assert all(rel(a, b) < 1e-12 for a, b in zip(single.end_to_end_vjp(W, cache, G), ref))
    assert all(float(t.abs().max()) == 0 for t in single.theta())
    with pytest.raises(ValueError, match="w must be a finite non-zero vector of shape"):
        ResidualLinearNet(5, 3, w=torch.zeros(5))


def test_replica_sharpness_equals_one_dense_hessian_per_replica(dm, gen):
    W = [randn(4, 5, 5, g=gen) * 0.4, randn(4, 5, 5, g=gen) * 0.4, randn(4, 1, 5, g=gen) * 0.4]
    W[0][2] = float("inf")  # a frozen (diverged) replica with overflowing weights
    active = torch.tensor([True, True, False, True])
    S = F.replica_sharpness(W, dm.measurements, dm.targets, active=active)
    assert torch.isnan(S[2]) and torch.isfinite(S[[0, 1, 3]]).all()
    for r in (0, 1, 3):
        ref = torch.linalg.eigvalsh(F.loss_hessian([w[r] for w in W], dm.measurements, dm.targets))[-1]
        assert rel(S[r], ref) < TOL


@pytest.mark.parametrize("depth, w_norm", [(2, 1.0), (3, 2.0), (10, 2.0)])  # |w*| = 1 at depth 10: the test above
def test_every_minimizer_is_sharper_than_both_forms_of_the_bound(dm, depth, w_norm, gen):
    """Random minimizers, one moved by an invertible A between W_1 and W_2, and the ideal one, for |w*| = 1 and 2:
    S >= S_min^a = 2 L a |w*|^(2-2/L), S >= 2 lambda |w*|^(2-1/L) sum_k 1/|W_k|_F (the bound through the layers'
    norms), the closed form equals the dense Hessian's top eigenvalue, and W_1 -> C W_1, W_2 -> W_2 / C makes the
    ideal minimizer strictly sharper (at least 5x at C = 10)."""
    y = w_norm * dm.y  # the least-squares solution scales with y: |w*| = w_norm
    ls = F.least_squares(dm.X, y)
    w_star, lam = ls["w_star"], float(ls["lambda_min"])
    assert abs(float(w_star.norm()) - w_norm) < 1e-12

    def dense(W):
        return float(torch.linalg.eigvalsh(F.loss_hessian(W, dm.measurements, y))[-1])

    s_a = float(F.sharpness_lower_bound(dm.X, y, depth, kind="a"))
    ideal = F.ideal_minimizer(w_star, depth)
    minimizers = [ideal]
    for _ in range(3):
        upper = [randn(5, 5, g=gen) for _ in range(depth - 2)] + [randn(1, 5, g=gen)]
        b = F.end_to_end(upper).reshape(-1)
        P = torch.eye(5, dtype=F64) - torch.outer(b, b) / b.square().sum()
        minimizers.append([torch.outer(b, w_star) / b.square().sum() + P @ randn(5, 5, g=gen)] + upper)
    if depth >= 3:
        A = torch.eye(5, dtype=F64) + 0.3 * randn(5, 5, g=gen)
        moved = list(minimizers[1])
        moved[0], moved[1] = A @ moved[0], moved[1] @ torch.linalg.inv(A)
        minimizers.append(moved)
    for W in minimizers:
        assert rel(F.end_to_end(W).reshape(-1), w_star) < 1e-10  # a global minimizer
        s = dense(W)
        assert abs(float(F.minimizer_sharpness(W, dm.X)) / s - 1) < TOL
        frobenius = 2 * lam * w_norm ** (2 - 1 / depth) * sum(1 / float(w.norm()) for w in W)
        assert s >= s_a * (1 - 1e-8) and s >= frobenius * (1 - 1e-8)  # 1e-8: the dense eigvalsh's rounding
    scaled = [dense([C * ideal[0], ideal[1] / C] + ideal[2:]) for C in (1, 3, 10, 30)]
    assert all(a < b for a, b in zip(scaled, scaled[1:])) and scaled[2] >= 5 * scaled[0]
    assert abs(float(F.ideal_minimizer_sharpness(dm.X, y, depth)) / scaled[0] - 1) < TOL
