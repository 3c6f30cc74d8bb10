"""Degenerate and extreme inputs: half precision is measured in float32, and ranks, norms, balancedness and the
Hessian trace stay finite wherever the true value is representable (scaled computations), matching float64."""

import math

import pytest
import torch

from lightning_flat import functional as F
from lightning_flat.measurements import Dense

F64 = torch.float64
# float32 evaluation of an O(1) quantity after exact power-of-two scaling: a few dozen roundings of relative
# 2^-24 each, so 1e-5 relative is a wide margin; the float64 references are exact to ~1e-15
TOL32 = 1e-5


def rel(a, b):
    return abs(float(a) - float(b)) / max(abs(float(b)), 1e-300)


@pytest.mark.parametrize("scale", [1e20, 1e-25, 1.0])
def test_ranks_and_norms_of_huge_and_tiny_matrices(scale):
    M = torch.diag(torch.tensor([3.0, 1.0, 0.0])) * scale  # float32; s^2 overflows (1e40) or underflows (1e-50)
    ref = M.double()
    assert rel(F.effective_rank(M, "stable"), F.effective_rank(ref, "stable")) < TOL32  # 10/9, whatever the scale
    assert rel(F.schatten_norm(M, 2), torch.linalg.matrix_norm(ref)) < TOL32  # the Frobenius norm
    assert rel(F.schatten_norm(M, 0.5), F.schatten_norm(ref, 0.5)) < TOL32
    assert rel(F.nuclear_norm(M), 4 * scale) < TOL32
    assert rel(F.effective_rank(M, "entropy"), F.effective_rank(ref, "entropy")) < TOL32


def test_zero_matrix_is_finite_everywhere():
    Z = torch.zeros(3, 3)
    for value in (F.effective_rank(Z, "stable"), F.effective_rank(Z, "entropy"), F.schatten_norm(Z, 2),
                  F.soft_rank(Z), F.balancedness([Z, Z]), F.hessian_trace([Z, Z], Dense(torch.ones(2, 3, 3)))):
        assert float(value) == 0.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_measured_in_float32(dtype):
    g = torch.Generator().manual_seed(0)
    W = [(100 * torch.randn(3, 3, generator=g)).to(dtype) for _ in range(2)]  # W^T W ~ 1e4-1e5: overflows float16
    ref = [w.double() for w in W]  # the same (rounded) values, exactly
    A = torch.randn(4, 3, 3, generator=g)
    for got, want in ((F.balancedness(W), F.balancedness(ref)),
                      (F.effective_rank(W[0], "stable"), F.effective_rank(ref[0], "stable")),
                      (F.hessian_trace(W, Dense(A)), F.hessian_trace(ref, Dense(A.double())))):
        assert got.dtype == torch.float32 and math.isfinite(float(got)) and rel(got, want) < TOL32


def test_balancedness_of_huge_balanced_factors():
    """Balanced factors of norm 1e20 in float32: W^T W overflows (the unscaled difference is inf - inf = NaN); the
    true distance, 0 (or small), is returned."""
    g = torch.Generator().manual_seed(1)
    Q = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=F64)).Q
    D = torch.diag(torch.tensor([3.0, 1.0, 0.5], dtype=F64))
    W1, W2 = (Q @ D * 1e20).float(), (D @ Q.T * 1e20).float()  # W2^T W2 = Q D^2 Q^T = W1 W1^T: balanced
    naive = torch.linalg.matrix_norm(W2.T @ W2 - W1 @ W1.T)
    assert not math.isfinite(float(naive))
    got = F.balancedness([W1, W2])
    want = F.balancedness([W1.double(), W2.double()])  # the rounded float32 factors' own (tiny) imbalance
    # relative to the scale of the terms, |W|^2 ~ 1e41: float32 rounding of the scaled products, ~1e-7 of it
    assert math.isfinite(float(got)) and abs(float(got) - float(want)) <= 1e-6 * 9e40


def test_trace_with_an_overflowing_intermediate():
    """W_1 ~ 1e20, W_2, W_3 ~ 1e-20: P_2^T P_2 ~ 1e40 overflows float32 (the unscaled formula gives NaN), yet every
    term of the trace is O(1)."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(6, 3, 3, generator=g)
    W = [torch.randn(3, 3, generator=g) for _ in range(3)]
    Ws = [W[0] * 1e20, W[1] / 1e20, W[2] / 1e20]
    want = F.hessian_trace([w.double() for w in Ws], Dense(A.double()))
    assert rel(F.hessian_trace(Ws, Dense(A)), want) < TOL32
    per = F.hessian_trace(Ws, Dense(A), per_layer=True)
    assert rel(per.sum(), want) < TOL32


@pytest.mark.parametrize("kind", ["dense", "entries"])
def test_depth_one_trace_does_not_depend_on_huge_weights(kind):
    """A depth-1 trace is (2/n) sum_i ||A_i||_F^2 whatever W is: finite for entries near 1e155, whose squares
    (1e310) overflow float64."""
    from lightning_flat.measurements import Entries

    g = torch.Generator().manual_seed(2)
    meas = Dense(torch.randn(5, 3, 3, generator=g, dtype=F64)) if kind == "dense" else \
        Entries(torch.tensor([0, 1, 2]), torch.tensor([2, 0, 1]), (3, 3), dtype=F64)
    W = torch.randn(3, 3, generator=g, dtype=F64) * 1e155
    want = (2.0 / len(meas)) * meas.dense().square().sum()  # independent: the closed form's own definition
    assert rel(F.hessian_trace([W], meas), want) < 1e-14 and rel(F.hessian_trace([W / 1e155], meas), want) < 1e-14


def test_balancedness_of_balanced_float64_factors_near_1e155():
    """W^T W ~ 1e310 overflows float64; the distance of balanced factors is their rounding's, finite and tiny
    relative to |W|^2."""
    g = torch.Generator().manual_seed(3)
    Q = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=F64)).Q
    D = torch.diag(torch.tensor([3.0, 1.0, 0.5], dtype=F64))
    W1, W2 = Q @ D * 1e155, D @ Q.T * 1e155
    got = F.balancedness([W1, W2])
    # float64 rounding of the scaled products: ~1e-15 relative to |W|^2 = 9 x 1e310 (itself not representable, hence
    # the division), and finite
    assert math.isfinite(float(got)) and float(got) / 1e155 / 1e155 <= 1e-14 * 9


def test_scaling_is_exact_in_float64():
    """Power-of-two scaling changes no bit: the trace of moderate weights equals the unscaled formula exactly."""
    g = torch.Generator().manual_seed(2)
    A = torch.randn(5, 3, 3, generator=g, dtype=F64)
    W = [3.7 * torch.randn(3, 3, generator=g, dtype=F64) for _ in range(3)]
    P, S = F.partial_products(W)
    G = torch.stack([p.T @ p for p in P])
    K = torch.stack([s @ s.T for s in S])
    naive = (Dense(A).curvature(G, K, symmetric=True) * (2 / 5)).sum(0)
    assert rel(F.hessian_trace(W, Dense(A)), naive) <= 1e-15


def test_scaling_keeps_the_gradient():
    """The trace is differentiated for the trace penalty: its gradient through the scaled computation equals the
    unscaled formula's (the power-of-two scales are exact and detached; torch.ldexp, which has no gradient, is kept
    off the differentiated path)."""
    g = torch.Generator().manual_seed(3)
    A = Dense(torch.randn(6, 3, 3, generator=g, dtype=F64))
    W = [(3 * torch.randn(3, 3, generator=g, dtype=F64)).requires_grad_() for _ in range(3)]
    got = torch.autograd.grad(F.hessian_trace(W, A), W)
    P, S = F.partial_products(W)
    naive = (A.curvature(torch.stack([p.T @ p for p in P]), torch.stack([s @ s.T for s in S]), symmetric=True)
             * (2 / 6)).sum(0)
    want = torch.autograd.grad(naive, W)
    # the same operations on exactly scaled values: equal to a few roundings
    assert all(float((a - b).abs().max()) <= 1e-14 * float(b.abs().max()) for a, b in zip(got, want))
    Wb = [w.detach().clone().requires_grad_() for w in W]
    got = torch.autograd.grad(F.balancedness(Wb), Wb)
    Wn = [w.detach().clone().requires_grad_() for w in W]
    naive = sum(torch.linalg.matrix_norm(Wn[j + 1].T @ Wn[j + 1] - Wn[j] @ Wn[j].T) for j in range(2))
    want = torch.autograd.grad(naive, Wn)
    assert all(float((a - b).abs().max()) <= 1e-12 * float(b.abs().max()) for a, b in zip(got, want))
