"""Ding et al. closed forms: the trace identities (V1), rescaling matrices, flat factors and measures."""

import pytest
import torch

from conftest import F64, randn, rel
from helpers import make_measurements
from lightning_flat import functional as F
from lightning_flat.functional import flat as FF
from lightning_flat.measurements import Dense, RankOne




@pytest.mark.parametrize("kind", ["dense", "rankone", "entries"])
def test_V1_trace_and_scaled_blocks(kind, gen):
    d_out, d_in, k, n = 3, 4, 5, 7  # d_out != d_in, k > d
    m = make_measurements(kind, n, d_out, d_in, gen)
    L, R, b = randn(d_out, k, g=gen), randn(d_in, k, g=gen), randn(n, g=gen)
    H = F.loss_hessian([R.T, L], m, b)  # W1 = R^T, W2 = L; b makes the point non-interpolating
    D1, D2 = FF.rescaling_matrices(m)
    closed = 2 * (d_in * (D1 @ L).square().sum() + d_out * (D2 @ R).square().sum())
    assert rel(torch.trace(H), closed) < 1e-8 and rel(F.hessian_trace([R.T, L], m), closed) < 1e-8
    diag = torch.diagonal(H)
    r_block, l_block = diag[: d_in * k].sum(), diag[d_in * k:].sum()
    assert rel(l_block, 2 * d_out * (D2 @ R).square().sum()) < 1e-8
    assert rel(l_block / d_out + r_block / d_in, FF.scaled_trace(L, R, D1, D2)) < 1e-8


@pytest.mark.parametrize("kind", ["rankone", "entries"])
def test_rescaling_matrices_from_structure_equal_dense(kind, gen):
    m = make_measurements(kind, 9, 3, 4, gen)
    for a, b in zip(FF.rescaling_matrices(m), FF.rescaling_matrices(Dense(m.dense()))):
        assert rel(a, b) < 1e-12


def test_quadratic_trace_with_residual_term(gen):
    x = randn(9, 4, g=gen)
    m = RankOne(x, x)
    U1, U2 = randn(4, 2, g=gen), randn(4, 1, g=gen)
    for b in (randn(9, g=gen), m(U1 @ U1.T - U2 @ U2.T)):  # random point, then interpolating point

        def loss(v, b=b):
            a, c = v[:8].reshape(4, 2), v[8:].reshape(4, 1)
            return ((m(a @ a.T - c @ c.T) - b) ** 2).mean()

        H = torch.func.hessian(loss)(torch.cat([U1.reshape(-1), U2.reshape(-1)]))
        assert rel(FF.quadratic_hessian_trace(U1, U2, m, b), torch.trace(H)) < 1e-10
    D, _ = FF.rescaling_matrices(m)  # at interpolation: 8d (not the paper's 4d) times ||D U||^2
    assert rel(FF.quadratic_hessian_trace(U1, U2, m, b), 8 * 4 * ((D @ U1).square().sum() + (D @ U2).square().sum())) \
        < 1e-10


def test_flat_factors_are_D_balanced_and_measures(gen):
    D1 = torch.diag(torch.tensor([1.0, 2.0, 0.5], dtype=F64))
    D2 = torch.diag(torch.tensor([0.3, 1.5, 1.0, 2.0], dtype=F64))
    Y = randn(3, 2, g=gen) @ randn(2, 4, g=gen)
    L, R = FF.flat_factors(Y, D1, D2, k=5)
    assert L.shape == (3, 5) and R.shape == (4, 5)
    assert rel(D1 @ L @ R.T @ D2, Y) < 1e-12
    assert rel(L.T @ D1 @ D1 @ L, R.T @ D2 @ D2 @ R) < 1e-12
    assert rel(FF.scaled_trace(L, R, D1, D2), 4 * F.nuclear_norm(Y)) < 1e-12
    assert rel(FF.condition_number(D1, D2), 2.0 / 0.3) < 1e-12
    eye = torch.eye(3, dtype=F64)
    Lb, Rb = FF.flat_factors(Y[:, :3], eye, eye)  # D = I: flat = norm-minimal = balanced
    ms = FF.flatness_measures(Lb, Rb, Y[:, :3], Y[:, :3])
    assert abs(float(ms["normmin"])) < 1e-12 and float(ms["balance"]) < 1e-12
    assert FF.is_singular(torch.diag(torch.tensor([1.0, 0.0], dtype=F64)))
