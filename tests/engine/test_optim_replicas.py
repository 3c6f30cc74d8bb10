"""ReplicaSGD's one update on both paths, frozen replicas, and the replica bookkeeping."""

import math

import pytest
import torch

from conftest import F64, randn, rel
from lightning_flat.engine import ReplicaSGD, active_mean, freeze_nonfinite, replica_metrics, replica_seeds


def params(gen, R=3):
    return [torch.nn.Parameter(randn(R, 4, 5, g=gen)), torch.nn.Parameter(randn(R, 2, 4, g=gen))]


def test_apply_gradients_is_step_bitwise(gen):
    a, b = params(gen), None
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    kw = dict(lr=torch.tensor([0.1, 0.2, 0.05], dtype=F64), momentum=0.9,
              weight_decay=torch.tensor([0.0, 0.1, 0.01], dtype=F64))
    oa, ob = ReplicaSGD(a, **kw), ReplicaSGD(b, **kw)
    for _ in range(4):
        grads = [randn(*p.shape, g=gen) for p in a]
        for p, g in zip(a, grads):
            p.grad = g.clone()
        oa.step()
        ob.apply_gradients(grads)
    assert all(torch.equal(p, q) for p, q in zip(a, b))


def test_single_model_update_is_torch_sgd(gen):
    a = [torch.nn.Parameter(randn(4, 5, g=gen))]
    b = [torch.nn.Parameter(a[0].detach().clone())]
    oa = ReplicaSGD(a, lr=0.1, momentum=0.5, weight_decay=0.01)
    ob = torch.optim.SGD(b, lr=0.1, momentum=0.5, weight_decay=0.01)
    for _ in range(5):
        g = randn(4, 5, g=gen)
        a[0].grad, b[0].grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    assert rel(a[0], b[0]) < 1e-15  # torch's SGD in other kernels: a few ulps over 5 steps


def test_frozen_replicas_keep_weights_and_momentum(gen):
    active = torch.tensor([True, False, True])
    ps = params(gen)
    before = [p.detach().clone() for p in ps]
    opt = ReplicaSGD(ps, lr=0.1, momentum=0.9, active=active)
    grads = [torch.ones_like(p) for p in ps]
    for g in grads:
        g[1] = float("nan")  # the frozen replica's gradient holds NaN
    opt.apply_gradients(grads)
    for p, q in zip(ps, before):
        assert torch.equal(p[1], q[1]) and torch.equal(p[0], q[0] - 0.1)
        assert torch.isfinite(p).all()


def test_active_mean_and_metrics():
    v = torch.tensor([1.0, 5.0, 3.0])
    assert float(active_mean(v, torch.tensor([True, False, True]))) == 2.0
    assert math.isnan(float(active_mean(v, torch.tensor([False, False, False]))))
    assert float(active_mean(torch.tensor(4.0), None)) == 4.0
    out = replica_metrics("k", v, torch.tensor([True, True, False]), limit=2)
    assert list(out) == ["k", "k/r0", "k/r1"] and float(out["k"]) == 3.0


def test_freeze_nonfinite_records_and_warns():
    active, diverged = torch.ones(3, dtype=torch.bool), {}
    with pytest.warns(UserWarning, match=r"replica 1 \(seed 8\) diverged at step 4"):
        assert freeze_nonfinite(torch.tensor([0.1, float("inf"), 0.2]), active, diverged, 4, [7, 8, 9]) == [1]
    assert active.tolist() == [True, False, True] and diverged == {1: (4, float("inf"))}
    assert freeze_nonfinite(torch.tensor([0.1, float("nan"), 0.2]), active, diverged, 5, [7, 8, 9]) == []


def test_replica_seeds():
    assert replica_seeds(3, 2) == [3, 4] and replica_seeds([5, 5], 2) == [5, 5]
    with pytest.raises(ValueError, match="list of 3 ints"):
        replica_seeds([1, 2], 3)
    with pytest.raises(ValueError, match="non-negative"):
        replica_seeds(-1, 1)
    with pytest.raises(TypeError, match="list of ints"):
        replica_seeds([1.5], 1)
