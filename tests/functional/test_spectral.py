import numpy as np
import pytest
import torch

from conftest import F64, randn, rel
from lightning_flat import functional as F


def np_svals(M):
    return np.linalg.svd(M.numpy(), compute_uv=False)


def test_effective_ranks_against_numpy(gen):
    M = randn(6, 4, g=gen) @ torch.diag(torch.tensor([3.0, 1.0, 0.1, 0.0], dtype=F64)) @ randn(4, 5, g=gen)
    s = np_svals(M)
    p = s[s > 0] / s.sum()
    assert rel(F.effective_rank(M, "entropy"), np.exp(-(p * np.log(p)).sum())) < 1e-12
    assert rel(F.effective_rank(M, "stable"), (s ** 2).sum() / s[0] ** 2) < 1e-12
    assert F.effective_rank(M, "numerical") == 3
    assert F.effective_rank(M, "numerical", tol=0.5) == 1


def test_degenerate_matrices_are_rank_zero_and_finite():
    Z = torch.zeros(2, 3, 4, dtype=F64)
    for kind in ("entropy", "stable", "numerical"):
        r = F.effective_rank(Z, kind)
        assert r.shape == (2,) and torch.equal(r, torch.zeros(2, dtype=F64))
    assert F.nuclear_norm(Z).eq(0).all() and F.schatten_norm(Z, 0.5).eq(0).all()
    assert F.representation_cost(Z, 3).eq(0).all()


def test_norms(gen):
    M = randn(5, 3, g=gen)
    s = torch.tensor(np_svals(M))
    assert rel(F.nuclear_norm(M), s.sum()) < 1e-12
    assert rel(F.schatten_norm(M, 2), torch.linalg.matrix_norm(M)) < 1e-12
    assert rel(F.schatten_norm(M, 1), s.sum()) < 1e-12
    assert rel(F.schatten_norm(M, 0.5), s.sqrt().sum() ** 2) < 1e-12


@pytest.mark.parametrize("depth", [1, 2, 3, 5])
def test_representation_cost_is_attained_by_balanced_factors(depth, gen):
    M = randn(4, 3, g=gen)
    U, s, Vh = torch.linalg.svd(M, full_matrices=False)
    root = s.pow(1.0 / depth)
    W = [torch.diag(root) @ Vh] + [torch.diag(root)] * (depth - 2) + ([U @ torch.diag(root)] if depth > 1 else [])
    if depth == 1:
        W = [M]
    assert rel(F.end_to_end(W), M) < 1e-12
    assert rel(F.representation_cost(M, depth), sum(w.square().sum() for w in W)) < 1e-12


def test_bad_arguments(gen):
    M = randn(3, 3, g=gen)
    with pytest.raises(ValueError, match="kind must be one of"):
        F.effective_rank(M, "renyi")
    with pytest.raises(ValueError, match="p must be > 0"):
        F.schatten_norm(M, 0)
    with pytest.raises(ValueError, match="depth must be a positive int"):
        F.representation_cost(M, 0)
    with pytest.raises(ValueError, match="M must have at least 2"):
        F.nuclear_norm(torch.zeros(3, dtype=F64))


def test_balancedness(gen):
    W = [randn(3, 2, g=gen), randn(4, 3, g=gen), randn(2, 4, g=gen)]
    ref = [torch.linalg.matrix_norm(W[j + 1].T @ W[j + 1] - W[j] @ W[j].T) for j in range(2)]
    assert rel(F.balancedness(W), sum(ref)) < 1e-12
    assert rel(F.balancedness(W, per_layer=True), torch.stack(ref)) < 1e-12
    assert F.balancedness(W[:1]) == 0
    # balanced factors of a matrix: zero
    U, s, Vh = torch.linalg.svd(randn(3, 3, g=gen))
    Wb = [torch.diag(s.sqrt()) @ Vh, U @ torch.diag(s.sqrt())]
    assert F.balancedness(Wb) < 1e-12
