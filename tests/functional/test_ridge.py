"""The weight-decayed objective through E: representation cost, balanced factors, critical points, minima by rank."""

import math

import pytest
import torch

from conftest import F64, randn
from lightning_flat import functional as F
from lightning_flat.measurements import Entries


def _problem(eps):
    return (Entries(torch.tensor([0, 1, 1]), torch.tensor([0, 0, 1]), (2, 2), dtype=F64),
            torch.tensor([1.0, eps, 1.0], dtype=F64))


@pytest.mark.parametrize("depth", [2, 3, 5])
def test_representation_cost_is_the_minimum_over_factorisations(gen, depth):
    dims = [4] + [5] * (depth - 1) + [3]
    for _ in range(10):
        Ws = [randn(dims[j + 1], dims[j], g=gen) for j in range(depth)]
        E = F.end_to_end(Ws)
        cost = F.representation_cost(E, depth)
        assert float(sum(W.square().sum() for W in Ws)) >= float(cost)  # AM-GM over the layers, never below
        bal = F.balanced_factors(E, dims)
        # the balanced factors reproduce E and attain the cost; float64 rounding of O(L) products of O(1) numbers
        assert float((F.end_to_end(bal) - E).abs().max()) <= 1e-12 * float(E.abs().max())
        assert abs(float(sum(W.square().sum() for W in bal)) / float(cost) - 1) <= 1e-12
        # and are balanced: W_{j+1}^T W_{j+1} = W_j W_j^T
        assert float(F.balancedness(bal)) <= 1e-12 * float(cost)


def test_balanced_factors_need_wide_hidden_layers():
    with pytest.raises(ValueError, match="every hidden width must be >= 2"):
        F.balanced_factors(torch.eye(2, dtype=F64), [2, 1, 2])
    with pytest.raises(ValueError, match="dims must be"):
        F.balanced_factors(torch.eye(2, dtype=F64), [3, 3, 2])


def test_ridge_objective_matches_its_definition():
    meas, b = _problem(0.25)
    E = torch.tensor([[1.2, 0.3], [0.2, 0.9]], dtype=F64)
    s = torch.linalg.svdvals(E)
    want = ((E[0, 0] - 1) ** 2 + (E[1, 0] - 0.25) ** 2 + (E[1, 1] - 1) ** 2) / 3 + 0.05 * 3 * s.pow(2 / 3).sum()
    assert abs(float(F.ridge_objective(E, meas, b, 0.1, 3) - want)) <= 1e-15


# Minima of the 2 x 2 problem, computed independently (a numpy prototype's multi-start BFGS): rank 2 as
# (E01, s2/s1), rank 1 as (E01, s1); None where no rank-2 minimum exists.
REFERENCE = [
    (3, 0.25, 0.1, (0.7804, 0.2074), (1.3302, 1.8034)),
    (3, 0.25, 0.001, (0.5189, 0.4474), (3.7807, 4.0433)),
    (4, 0.1, 0.1, (0.6258, 0.3535), (1.5450, 1.9488)),
    (4, 0.25, 0.1, None, (1.4015, 1.8699)),
]


@pytest.mark.parametrize("depth, eps, ridge, rank2, rank1", REFERENCE)
def test_minima_by_rank(depth, eps, ridge, rank2, rank1):
    meas, b = _problem(eps)
    starts = [torch.tensor([[1.0, x], [eps, 1.0]], dtype=F64) for x in (0.1, 0.3, 0.5, 0.8, 1.0)]
    r2 = F.ridge_local_minimum(meas, b, ridge, depth, 2, starts=starts)
    r1 = F.ridge_local_minimum(meas, b, ridge, depth, 1, starts=[torch.tensor([[1.0, 1 / eps], [eps, 1.0]], dtype=F64)])
    # the reference values are printed to 4 decimals: 1e-4 (rounding) with a factor 2 margin
    if rank2 is None:
        assert r2 is None
    else:
        s = torch.linalg.svdvals(r2[0])
        assert abs(float(r2[0][0, 1]) - rank2[0]) <= 2e-4 and abs(float(s[1] / s[0]) - rank2[1]) <= 2e-4
        # a critical point in E: M = U^T grad L V + ridge diag(s^((2-L)/L)) = 0. Where BFGS stops depends on the
        # rounding of every step (it may end on a loss of precision above gtol); what ridge_local_minimum
        # guarantees is the gradient g (largest entry) of the factored objective at the balanced factors:
        # g <= max(100 gtol, 1e-8) max(1, s_1). There dJ/dW_1 = S^((L-1)/L) M V^T, so |M_ij| <= sqrt(2) g /
        # s_2^((L-1)/L), up to the rounding of M's O(1) terms (1e-14)
        U, S, Vh = torch.linalg.svd(r2[0])
        G = (2 / 3) * meas.adjoint(meas(r2[0]) - b)
        M = U.T @ G @ Vh.T + ridge * torch.diag(S.pow((2 - depth) / depth))
        g, _ = F.factored_second_order_check(r2[0], meas, b, ridge, depth, 2)
        assert g <= 1e-8 * max(1.0, float(S[0]))
        assert float(M.abs().max()) <= math.sqrt(2) * g / float(S[1]) ** ((depth - 1) / depth) + 1e-14
    E1 = r1[0]
    s1 = torch.linalg.svdvals(E1)
    assert abs(float(E1[0, 1]) - rank1[0]) <= 2e-4 and abs(float(s1[0]) - rank1[1]) <= 2e-4
    assert float(s1[1]) <= 1e-10 * float(s1[0])  # exactly rank one (A B^T with one column)


def test_minima_survive_starts_and_end_points_where_the_objective_is_not_smooth(monkeypatch):
    """BFGS may stop where J(E) has no derivatives (a zero singular value: s^(2/L); two equal ones: the SVD's second
    derivatives): such candidates are judged by the factored objective, a polynomial, or skipped, never a crash."""
    import scipy.optimize

    meas, b = _problem(0.1)
    depth, ridge = 4, 0.1
    real = scipy.optimize.minimize
    rigged = []

    class Stop:  # what BFGS returns, rigged to end at a chosen point
        def __init__(self, E):
            self.x, self.fun = E.reshape(-1).numpy(), float(F.ridge_objective(E, meas, b, ridge, depth))

    def minimize(fun, x0, **kwargs):
        if rigged:
            return Stop(rigged.pop(0))
        return real(fun, x0, **kwargs)

    monkeypatch.setattr(scipy.optimize, "minimize", minimize)
    # two equal singular values (E = I/2): the autograd Hessian of J(E) through the SVD is NaN there
    rigged[:] = [0.5 * torch.eye(2, dtype=F64)]
    good = [torch.tensor([[1.0, x], [0.1, 1.0]], dtype=F64) for x in (0.3, 0.5, 0.8)]
    r2 = F.ridge_local_minimum(meas, b, ridge, depth, 2, starts=[torch.eye(2, dtype=F64)] + good, restarts=0)
    s = torch.linalg.svdvals(r2[0])
    # the reference minimum of this problem (rank 2: E01 = 0.6258, s2/s1 = 0.3535, printed to 4 decimals)
    assert abs(float(r2[0][0, 1]) - 0.6258) <= 2e-4 and abs(float(s[1] / s[0]) - 0.3535) <= 2e-4
    # a start at E = 0 (rank 1: A = B = 0, where s^(2/L) has no derivative) is skipped, the others go on
    zero = torch.zeros(2, 2, dtype=F64)
    r1 = F.ridge_local_minimum(meas, b, ridge, depth, 1, starts=[zero, torch.tensor([[1.0, 10.0], [0.1, 1.0]],
                                                                                     dtype=F64)], restarts=0)
    s1 = torch.linalg.svdvals(r1[0])
    assert abs(float(r1[0][0, 1]) - 1.5450) <= 2e-4 and abs(float(s1[0]) - 1.9488) <= 2e-4
    # only non-smooth starts: nothing found, no error
    assert F.ridge_local_minimum(meas, b, ridge, depth, 1, starts=[zero], restarts=0) is None


def test_factored_check_tells_minima_from_other_points():
    meas, b = _problem(0.1)
    starts = [torch.tensor([[1.0, 0.6], [0.1, 1.0]], dtype=F64)]
    E, _ = F.ridge_local_minimum(meas, b, 0.1, 4, 2, starts=starts, restarts=0)
    grad, lowest = F.factored_second_order_check(E, meas, b, 0.1, 4, 2)
    c = float(torch.linalg.svdvals(E).pow(2 / 4).sum())  # |W_j|_F^2 of each balanced factor
    # where BFGS stops depends on the rounding of its steps; ridge_local_minimum returns a point only when the
    # factored gradient is <= max(100 gtol, 1e-8) max(1, s_1) (gtol = 1e-12)
    assert grad <= 1e-8 * max(1.0, float(torch.linalg.svdvals(E)[0]))
    # the Hessian is PSD up to that gradient: the rotations (e^(tA) W_j, W_(j+1) e^(-tA)) of the L - 1 = 3 hidden
    # layers leave J unchanged, so along each x^T H x = -<grad J, A^2 theta> / |A theta|^2, of size at most
    # |grad J|_2 / (2c)^(1/2) (2 x 2 layers: A^2 = -I), with |grad J|_2 <= sqrt(16) grad (16 parameters), and at
    # most 3 times that over the 3 of them together; the other directions are curved (>= 0.02). lowest is relative
    # to the largest eigenvalue (about 3 here, > 1)
    assert lowest >= -3 * math.sqrt(16) * grad / math.sqrt(2 * c)
    # where two singular values meet (E = I/2) the check is still defined, and says: not critical
    grad, lowest = F.factored_second_order_check(0.5 * torch.eye(2, dtype=F64), meas, b, 0.1, 4, 2)
    assert math.isfinite(grad) and math.isfinite(lowest) and grad > 1e-3


def test_critical_residuals_vanish_at_balanced_factors_of_a_minimum():
    meas, b = _problem(0.25)
    starts = [torch.tensor([[1.0, 0.8], [0.25, 1.0]], dtype=F64)]
    E, _ = F.ridge_local_minimum(meas, b, 0.1, 3, 2, starts=starts, restarts=0)
    res = F.ridge_critical_residuals(F.balanced_factors(E, [2, 4, 4, 2]), meas, b, 0.1)
    assert res["rank"] == 2
    # balanced factors reproduce E, are balanced and attain the cost to round-off of a few flops on O(1) numbers
    assert res["balance"] <= 1e-12 and res["layer_singular_values"] <= 1e-12 and abs(res["cost_gap"]) <= 1e-12
    # stationarity is BFGS's accuracy, which depends on the rounding of its steps: bounded by the factored gradient g
    # at the point (<= max(100 gtol, 1e-8) max(1, s_1), checked by ridge_local_minimum) as in test_minima_by_rank,
    # |M_ij| <= sqrt(2) g / s_2^((L-1)/L), plus the rounding of the product of the factors and of M (1e-14)
    g, _ = F.factored_second_order_check(E, meas, b, 0.1, 3, 2)
    s = torch.linalg.svdvals(E)
    assert g <= 1e-8 * max(1.0, float(s[0]))
    assert res["stationarity"] <= math.sqrt(2) * g / float(s[1]) ** (2 / 3) + 1e-14
    # and do not vanish away from it
    off = F.ridge_critical_residuals(F.balanced_factors(E + 0.1, [2, 4, 4, 2]), meas, b, 0.1)
    assert off["stationarity"] > 1e-3


def test_soft_and_approximate_rank():
    # f_alpha(x) = x (2 alpha - x) / alpha^2 below alpha, 1 above: by hand for squared singular values
    alpha = 0.04
    M = torch.diag(torch.tensor([1.0, 0.1, 0.02, 0.0], dtype=F64))  # squares 1, 0.01, 4e-4, 0
    f = lambda x: x * (2 * alpha - x) / alpha ** 2 if x <= alpha else 1.0  # noqa: E731
    want = f(1.0) + f(0.01) + f(4e-4) + f(0.0)
    assert abs(float(F.soft_rank(M, alpha)) - want) <= 1e-15
    W2 = torch.diag(torch.tensor([1.0, 1.0, 1.0], dtype=F64))
    assert float(F.approximate_rank([M[:3, :3], W2], alpha)) == 3.0  # the max over the factors
    batch = torch.stack([M, 2 * M])
    assert F.soft_rank(batch, alpha).shape == (2,)
    assert math.isnan(float(F.soft_rank(torch.full((2, 2), float("nan"), dtype=F64))))
    with pytest.raises(ValueError, match="alpha"):
        F.soft_rank(M, 0.0)


def test_jump_time():
    steps = torch.tensor([0, 10, 20, 30])
    v = torch.tensor([[1e-4, 0.3, 0.3], [0.2, 1e-4, 0.3], [1e-5, float("nan"), 0.3], [1e-6, 1e-6, 0.3]], dtype=F64)
    assert F.jump_time(steps, v, 1e-3).tolist()[:2] == [0.0, 10.0]
    t = F.jump_time(steps, v, 1e-3, after=15)
    assert t[:2].tolist() == [20.0, 30.0] and math.isnan(float(t[2]))
    with pytest.raises(ValueError, match="one row per step"):
        F.jump_time(steps, v[:3], 1e-3)
