"""ReplicaSGD's one update on both paths, frozen replicas, and the replica bookkeeping."""

import math

import pytest
import torch

from conftest import F64, randn, rel
from lightning_flat.engine import ReplicaSGD, Replicas, active_mean, per_stream, replica_metrics, replica_seeds, step_seed


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
    reps = Replicas(3)
    reps.active.copy_(torch.tensor([True, False, True]))
    ps = params(gen)
    before = [p.detach().clone() for p in ps]
    opt = ReplicaSGD(ps, lr=0.1, momentum=0.9, replicas=reps)
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
    reps = Replicas(3, seed=[7, 8, 9])
    with pytest.warns(UserWarning, match=r"replica 1 \(seed 8\) diverged at step 4"):
        assert reps.freeze_nonfinite(torch.tensor([0.1, float("inf"), 0.2]), 4) == [1]
    assert reps.active.tolist() == [True, False, True] and reps.diverged == {1: (4, float("inf"))}
    assert reps.freeze_nonfinite(torch.tensor([0.1, float("nan"), 0.2]), 5) == []
    assert reps.stop_reason(torch.tensor([0.1, 0.0, 0.2])) is None
    assert "a replica diverged" in reps.stop_reason(torch.tensor([0.1, 0.0, 0.2]), policy="any")
    reps.freeze_nonfinite(torch.tensor([float("nan"), 0.0, float("nan")]), 6)
    assert "every replica diverged" in reps.stop_reason(torch.zeros(3))
    # one run is never frozen: it stops, with the loss in the reason
    single = Replicas(1, seed=3)
    assert single.freeze_nonfinite(torch.tensor(float("nan")), 1) == [] and bool(single.active.all())
    assert single.stop_reason(torch.tensor(float("nan"))) == "a non-finite training loss (nan)"


def test_replicas_take_one_argument_form_for_any_count(gen):
    one, three = Replicas(1, seed=[5]), Replicas(3, seed=2)
    assert one.seeds == [5] and three.seeds == [2, 3, 4] and (one.dims, three.dims) == (0, 1)
    # a list of one value is that value; R values for R replicas; anything else is refused, naming the argument
    assert one.hyperparameter("lr", [0.1]) == 0.1 and three.hyperparameter("lr", [0.1, 0.2, 0.3]) == [0.1, 0.2, 0.3]
    with pytest.raises(ValueError, match="lr must be a number or a list of 3 numbers"):
        three.hyperparameter("lr", [0.1, 0.2])
    with pytest.raises(ValueError, match=r"lr\[1\]"):
        three.hyperparameter("lr", [0.1, -1.0, 0.3])
    assert one.pick(0.5, 0) == 0.5 and three.pick([1, 2, 3], 2) == 3
    # masked sums and means over the active runs, by hand
    three.active.copy_(torch.tensor([True, False, True]))
    v = torch.tensor([1.0, 100.0, 4.0])
    assert float(three.masked_sum(v)) == 5.0 and float(three.mean(v)) == 2.5 and three.first_active() == 0
    assert float(one.masked_sum(torch.tensor(7.0))) == 7.0 and float(one.mean(torch.tensor(7.0))) == 7.0
    assert list(three.metrics("k", v)) == ["k", "k/r0", "k/r2"]
    W = randn(3, 2, 2, g=gen)
    assert all(torch.equal(x[0], W[r]) for r, x in enumerate(three.split([W])))
    W0 = W[0]
    single = one.split([W0])
    assert len(single) == 1 and single[0][0] is W0


def test_initial_draws_are_the_single_runs_draws():
    reps = Replicas(3, seed=[4, 9, 4])
    draws = reps.initial(lambda r, g: [torch.randn(2, generator=g, dtype=F64) * (r + 1)])
    for r, s in enumerate([4, 9, 4]):
        single = Replicas(1, seed=s).initial(lambda _, g: [torch.randn(2, generator=g, dtype=F64) * (r + 1)])
        assert torch.equal(draws[0][r], single[0])


def test_per_stream_draws_are_keyed_by_each_seed():
    g = torch.Generator()
    draw = lambda gen: torch.randint(100, (4,), generator=gen)  # noqa: E731
    rows = per_stream([3, 5, 3], lambda s: (1, s, 7), draw, g)
    for r, s in enumerate([3, 5, 3]):
        assert torch.equal(rows[r], torch.randint(100, (4,), generator=torch.Generator().manual_seed(step_seed(1, s, 7))))
    # one stream, or shared streams with share=True: one draw, no replica dimension
    assert per_stream([5], lambda s: (1, s, 7), draw, g).shape == (4,)
    assert torch.equal(per_stream([5, 5], lambda s: (1, s, 7), draw, g, share=True), rows[1])
    assert torch.equal(per_stream(None, lambda s: (1, 7), draw, g),
                       torch.randint(100, (4,), generator=torch.Generator().manual_seed(step_seed(1, 7))))


def test_replica_seeds():
    assert replica_seeds(3, 2) == [3, 4] and replica_seeds([5, 5], 2) == [5, 5]
    with pytest.raises(ValueError, match="list of 3 ints"):
        replica_seeds([1, 2], 3)
    with pytest.raises(ValueError, match="non-negative"):
        replica_seeds(-1, 1)
    with pytest.raises(TypeError, match="list of ints"):
        replica_seeds([1.5], 1)
