"""The curvature callbacks on a user's own LightningModule: values against a dense torch.func.hessian, and no
trace left in the model or its training."""

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from conftest import rel
from generic_modules import TanhMLP, dense_hessian
from helpers import KillAt, Killed, trainer
from lightning_flat.callbacks import CurvatureOptions, HessianTrace, Sharpness


def fit(model, steps, callbacks=(), **kw):
    torch.manual_seed(123)
    tr, mem = trainer(steps, callbacks, precision="32-true", **kw)
    tr.fit(model)
    return tr, mem


def first_batch(m):
    return m.x[: m.batch_size], m.y[: m.batch_size]


def test_trace_and_sharpness_against_dense_hessian():
    m = TanhMLP()
    size = sum(p.numel() for p in m.parameters())
    default, full, sharp = HessianTrace(10), HessianTrace(10, num_matvecs=3 * size + 3, options=CurvatureOptions(seed=5)), Sharpness(10)
    tr, mem = fit(m, 20, [default, full, sharp])
    H = dense_hessian(m, *first_batch(m))
    exact = torch.trace(H)
    step, value = default.history["hessian/trace"][-1]
    _, stderr = default.history["hessian/trace_stderr"][-1]
    assert step == 20
    # defaults: Hutch++ with 99 HVPs, whose error is that of the mean of its 33 residual Hutchinson probes; stderr is
    # their standard error (sample std / sqrt(33)), so 5 of them (a Student t tail of 2e-5 at 32 degrees of freedom)
    assert abs(value - float(exact)) <= 5 * stderr
    assert rel(full.history["hessian/trace"][-1][1], exact) < 1e-6  # budget above the parameter count
    assert rel(sharp.history["hessian/sharpness"][-1][1], torch.linalg.eigvalsh(H)[-1]) < 1e-4
    assert "hessian/trace_stderr" in mem.history and mem.history["hessian/trace"][0][0] == 0


def test_top_k_eigenvalues():
    m = TanhMLP()
    cb = Sharpness(5, top_k=3)
    fit(m, 5, [cb])
    evals = torch.linalg.eigvalsh(dense_hessian(m, *first_batch(m))).flip(0)
    for i in range(3):
        assert rel(cb.last[f"hessian/eigenvalue_{i}"], evals[i]) < 1e-4


def test_a_read_leaves_no_trace():
    m = TanhMLP(dropout=0.3)
    cbs = [HessianTrace(100), Sharpness(100)]
    tr, _ = fit(m, 3, cbs)
    m.train()
    m.net[2].eval()  # a mixed mode, which must come back as it was
    params = [p.detach().clone() for p in m.parameters()]
    grads = [p.grad.clone() for p in m.parameters()]
    modes = [mod.training for mod in m.modules()]
    rng = torch.get_rng_state()
    for cb in cbs:
        with torch.no_grad():
            cb.measure(tr, m)
    assert all(torch.equal(a, p) for a, p in zip(params, m.parameters()))
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, m.parameters()))
    assert modes == [mod.training for mod in m.modules()]
    assert torch.equal(rng, torch.get_rng_state())


@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["mlp", "dropout"])
@pytest.mark.parametrize("eval_mode", [True, False], ids=["eval", "train-mode"])
def test_seeded_run_is_bitwise_the_same_with_and_without_callbacks(dropout, eval_mode):
    plain = TanhMLP(dropout=dropout)
    fit(plain, 12)
    measured = TanhMLP(dropout=dropout)
    fit(measured, 12, [HessianTrace(2, options=CurvatureOptions(eval_mode=eval_mode)),
                           Sharpness(3, options=CurvatureOptions(eval_mode=eval_mode))])
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), measured.parameters()))




def test_resume_continues_states_and_curves(tmp_path):
    def setup(extra=()):
        cbs = [HessianTrace(3, num_matvecs=30), Sharpness(3, tol=1e-10)]
        ck = ModelCheckpoint(dirpath=str(tmp_path), every_n_train_steps=5, save_top_k=-1, filename="{step}")
        return cbs, [*cbs, ck, *extra]

    ref_cbs, cbs = setup()
    ref = TanhMLP()
    fit(ref, 12, cbs, enable_checkpointing=True)

    _, cbs = setup([KillAt(7)])
    with pytest.raises(Killed):
        fit(TanhMLP(), 12, cbs, enable_checkpointing=True)

    new_cbs, cbs = setup()
    model = TanhMLP()
    torch.manual_seed(123)
    tr, _ = trainer(12, cbs, precision="32-true", enable_checkpointing=True)
    tr.fit(model, ckpt_path=str(tmp_path / "step=5.ckpt"))  # step 5 ends epoch 1 (80 rows, batches of 16)
    assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), model.parameters()))
    for old, new in zip(ref_cbs, new_cbs):
        assert old.history == new.history
    assert torch.equal(ref_cbs[1].state_dict()["v"][0], new_cbs[1].state_dict()["v"][0])
    assert all(torch.equal(a, b) for a, b in zip(ref_cbs[0].state_dict()["source"]["batch"],
                                                    new_cbs[0].state_dict()["source"]["batch"]))
