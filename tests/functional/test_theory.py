"""Closed forms of the Gatmiry et al. spec (T1-T4, T7, T8), library normalization (float64)."""

import math

import pytest
import torch

from conftest import F64, randn, rel
from lightning_flat import functional as F
from lightning_flat.datamodules import MatrixSensingDataModule
from lightning_flat.measurements import Dense, Entries


def rank_k(d_out, d_in, k, g):
    return randn(d_out, k, g=g) @ randn(k, d_in, g=g)


def isometry_design(d_out, d_in):
    """T2: A_(k,l) = sqrt(d_0 d_L) e_k e_l^T for every cell."""
    A = torch.zeros(d_out * d_in, d_out, d_in, dtype=F64)
    for k in range(d_out):
        for l in range(d_in):
            A[k * d_in + l, k, l] = math.sqrt(d_out * d_in)
    return Dense(A)


def test_T1_trace_formula_at_a_random_point(gen):
    dims, n = [3, 4, 5, 3], 5
    m = Dense(randn(n, 3, 3, g=gen))
    W = [randn(dims[j + 1], dims[j], g=gen) for j in range(3)]
    b = randn(n, g=gen)
    assert rel(F.hessian_trace(W, m), torch.trace(F.loss_hessian(W, m, b))) < 1e-10


@pytest.mark.parametrize("dims", [[3, 4, 5, 2], [4, 4], [2, 6, 3, 5, 3]], ids=str)
def test_T2_exact_isometry_trace_is_twice_surrogate(dims, gen):
    d_in, d_out = dims[0], dims[-1]
    W = [randn(dims[j + 1], dims[j], g=gen) for j in range(len(dims) - 1)]
    R = F.trace_surrogate(W)
    assert rel(F.hessian_trace(W, isometry_design(d_out, d_in)), 2 * R) < 1e-12
    rows = torch.arange(d_out).repeat_interleave(d_in)
    cols = torch.arange(d_in).repeat(d_out)
    entries = Entries(rows, cols, (d_out, d_in), dtype=F64)
    assert rel(F.hessian_trace(W, entries) * d_out * d_in, 2 * R) < 1e-12


def test_T2_gaussian_trace_is_twice_surrogate_in_expectation(gen):
    dims = [3, 4, 5, 3]
    W = [randn(dims[j + 1], dims[j], g=gen) for j in range(3)]
    draws = torch.stack([F.hessian_trace(W, Dense(randn(6, 3, 3, g=gen))) for _ in range(200)])
    se = draws.std() / math.sqrt(200)
    assert abs(float(draws.mean() - 2 * F.trace_surrogate(W))) < 4 * float(se)


def fiber_move(W, g, strength):
    L = len(W)
    C = [None] + [torch.eye(W[j].shape[0], dtype=F64) + strength * randn(W[j].shape[0], W[j].shape[0], g=g)
                  for j in range(L - 1)] + [None]
    out = []
    for j in range(L):
        Wj = W[j]
        if C[j + 1] is not None:
            Wj = C[j + 1] @ Wj
        if C[j] is not None:
            Wj = Wj @ torch.linalg.inv(C[j])
        out.append(Wj)
    return out


@pytest.mark.parametrize("dims", [[4, 5, 6, 5, 6], [3, 7, 7, 7, 7, 8], [6, 6, 6, 6]], ids=str)
def test_T3_lemma4_minimizer_with_corrected_constants(dims, gen):
    L = len(dims) - 1
    M = rank_k(dims[-1], dims[0], 2, gen)
    W = F.flattest_factorization(M, dims)
    assert rel(F.end_to_end(W), M) < 1e-12
    R = F.trace_surrogate(W)
    assert rel(R, F.min_trace_surrogate(M, L)) < 1e-10
    assert rel(F.predicted_min_trace(M, L), 2 * F.min_trace_surrogate(M, L)) < 1e-15
    P, S = F.partial_products(W)
    terms = torch.stack([P[j].square().sum() * S[j].square().sum() for j in range(L)])
    assert rel(terms, terms.mean().expand(L)) < 1e-10
    for _ in range(500):
        assert F.trace_surrogate(fiber_move(W, gen, 0.2)) >= R * (1 - 1e-12)
    # random orthonormal Q_i give another minimizer
    W2 = F.flattest_factorization(M, dims, generator=torch.Generator().manual_seed(3))
    assert rel(F.trace_surrogate(W2), R) < 1e-10 and rel(F.end_to_end(W2), M) < 1e-12


def test_T3_printed_constants_do_not_attain_the_bound(gen):
    """The paper's alpha' = (d_L/d_0)^{1/2}, alpha = (|M|_*/(d_0 d_L))^{1/L} give a larger R (spec pitfall 2)."""
    dims = [4, 5, 6, 5, 6]
    L = 4
    M = rank_k(6, 4, 2, gen)
    U, s, Vh = torch.linalg.svd(M, full_matrices=False)
    U, s, Vh = U[:, :2], s[:2], Vh[:2]
    a_p, a = (6 / 4) ** 0.5, (float(s.sum()) / 24) ** (1 / L)
    Q = [torch.eye(d, 2, dtype=F64) for d in dims[1:-1]]
    W = [a_p ** -1 * a ** (-(L - 2) / 2) * (Q[0] * s.sqrt()) @ Vh]
    W += [a * Q[i] @ Q[i - 1].T for i in range(1, L - 1)]
    W += [a_p * a ** (-(L - 2) / 2) * (U * s.sqrt()) @ Q[-1].T]
    assert rel(F.end_to_end(W), M) < 1e-12
    assert F.trace_surrogate(W) > 1.05 * F.min_trace_surrogate(M, L)


def test_T4_depth2_minimum_trace_any_measurements(gen):
    d0, d1, dL, n = 4, 6, 5, 7
    m = Dense(randn(n, dL, d0, g=gen))
    M = rank_k(dL, d0, 2, gen)
    W = F.depth2_flattest_factorization(M, m, width=d1)
    assert rel(F.end_to_end(W), M) < 1e-10
    Fmin = F.depth2_min_trace(M, m)
    tr = F.hessian_trace(W, m)
    assert rel(tr, Fmin) < 1e-10
    for _ in range(2000):
        assert F.hessian_trace(fiber_move(W, gen, 0.2), m) >= tr * (1 - 1e-12)


def test_T4_agrees_with_lemma4_under_isometry(gen):
    m = isometry_design(3, 3)
    M = rank_k(3, 3, 2, gen)
    assert rel(F.depth2_min_trace(M, m), F.predicted_min_trace(M, 2)) < 1e-10


def test_T7_min_frobenius_interpolant_error():
    errs = []
    for seed in range(50):
        dm = MatrixSensingDataModule(n=200, d_out=20, d_in=20, rank=2, seed=seed)
        X = F.min_frobenius_interpolant(dm.measurements, dm.targets)
        assert rel(dm.measurements(X), dm.targets) < 1e-8
        errs.append(float(dm.test_error(X) / dm.ground_truth.square().sum()))
    assert abs(sum(errs) / len(errs) - 0.5) < 0.02


@pytest.mark.parametrize("depth", [2, 3, 5, 10])
def test_T8_lemma3_ratio_on_experiment_measurements(depth):
    dm = MatrixSensingDataModule(n=200, d_out=20, d_in=20, rank=2, seed=0)
    W = F.flattest_factorization(dm.ground_truth, [20] * (depth + 1))
    ratio = F.hessian_trace(W, dm.measurements) / (2 * F.trace_surrogate(W))
    assert 0.90 <= float(ratio) <= 1.10


def test_theory_bad_arguments(gen):
    M = rank_k(3, 3, 2, gen)
    with pytest.raises(ValueError, match="hidden width must be >= rank"):
        F.flattest_factorization(M, [3, 1, 3])
    with pytest.raises(ValueError, match="dims give"):
        F.flattest_factorization(M, [4, 4, 3])
    with pytest.raises(ValueError, match="depth must be a positive int"):
        F.predicted_min_trace(M, 0)
    with pytest.raises(ValueError, match="targets must have length"):
        F.min_frobenius_interpolant(Dense(randn(4, 3, 3, g=gen)), randn(5, g=gen))


@pytest.mark.parametrize("depth", [2, 3, 4], ids=lambda L: f"L{L}")
def test_T5_thm7_single_measurement_and_T6_stationarity(depth, gen):
    """Minimizing the trace over the GL fiber (BFGS, 5 restarts) attains 2L ||(A^T M)^{L-1} A^T||_{S_2/L}^{2/L}, and
    the minimizer satisfies the fiber stationarity conditions."""
    A = randn(1, 4, 4, g=gen)
    M = randn(4, 4, g=gen)
    m = Dense(A)
    W = [M] + [torch.eye(4, dtype=F64)] * (depth - 1)
    value, Wopt = F.min_trace_on_fiber(W, m, restarts=5)
    assert rel(value, F.n1_min_trace(A[0], M, depth)) < 1e-6
    assert rel(F.end_to_end(Wopt), M) < 1e-10
    assert F.fiber_stationarity_residual(Wopt, m) < 1e-5
    assert F.fiber_stationarity_residual(W, m) > 0.1  # a generic fiber point is far from stationary


def test_T5_special_cases(gen):
    X = randn(4, 4, g=gen)
    M = X + X.T
    lam = torch.linalg.eigvalsh(M)
    for L in (2, 3, 4):
        assert rel(F.n1_min_trace(torch.eye(4, dtype=F64), M, L), 2 * L * lam.abs().pow(2 * (L - 1) / L).sum()) < 1e-12
    A, M = randn(3, 5, g=gen), randn(3, 5, g=gen)  # n = 1 with L = 2 equals Thm 5 (T4)
    assert rel(F.n1_min_trace(A, M, 2), F.depth2_min_trace(M, Dense(A[None]))) < 1e-10


def test_T6_is_zero_at_the_lemma4_minimizer_under_isometry(gen):
    M = rank_k(5, 4, 2, gen)
    W = F.flattest_factorization(M, [4, 6, 6, 5])
    assert F.fiber_stationarity_residual(W, isometry_design(5, 4)) < 1e-12
    assert rel(F.lemma3_ratio(W, isometry_design(5, 4)), 1.0) < 1e-12
