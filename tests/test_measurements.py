import pytest
import torch

from conftest import F64, randn, rel
from helpers import make_measurements
from lightning_flat.measurements import Dense, Entries, MeasurementBatch, RankOne

KINDS = ["dense", "rankone", "entries"]


@pytest.mark.parametrize("kind", KINDS)
def test_call_and_adjoint_match_dense_definition(kind, gen):
    m = make_measurements(kind, 7, 3, 5, gen)
    A = m.dense()
    assert A.shape == (7, 3, 5) and m.shape == (3, 5) and len(m) == 7
    E = randn(4, 3, 5, g=gen)  # replica batch
    assert rel(m(E), torch.einsum("nij,rij->rn", A, E)) < 1e-13
    r = randn(4, 7, g=gen)
    assert rel(m.adjoint(r), torch.einsum("nij,rn->rij", A, r)) < 1e-13


@pytest.mark.parametrize("a_lead, e_lead", [((), ()), ((), (1,)), ((1,), ()), ((1,), (1,)), ((1, 1), (1,)),
                                             ((3,), (3,)), ((3,), ()), ((), (3,)), ((2, 1), (1, 3))])
def test_dense_call_broadcasts_leading_dims(a_lead, e_lead, gen):
    """Every path of Dense.__call__ (one gemv for a single model, the batched form otherwise) against einsum."""
    A, E = randn(*a_lead, 7, 3, 5, g=gen), randn(*e_lead, 3, 5, g=gen)
    y = Dense(A)(E)
    ref = torch.einsum("...nij,...ij->...n", A, E)
    assert y.shape == ref.shape and rel(y, ref) < 1e-13


@pytest.mark.parametrize("kind", KINDS)
def test_adjoint_is_the_adjoint(kind, gen):
    m = make_measurements(kind, 9, 4, 3, gen)
    E, r = randn(4, 3, g=gen), randn(9, g=gen)
    lhs = (m(E) * r).sum()
    rhs = (E * m.adjoint(r)).sum()
    assert abs(float(lhs - rhs)) < 1e-12 * max(1.0, abs(float(lhs)))


@pytest.mark.parametrize("kind", ["rankone", "entries"])
def test_structured_curvature_equals_dense(kind, gen):
    m = make_measurements(kind, 11, 4, 3, gen)
    dense = Dense(m.dense())
    P, S = randn(2, 5, 3, g=gen), randn(2, 4, 6, g=gen)
    G, K = P.transpose(-1, -2) @ P, S @ S.transpose(-1, -2)
    assert rel(m.curvature(G, K), dense.curvature(G, K, method="direct")) < 1e-12


def test_dense_curvature_methods_agree_with_definition(gen):
    m = Dense(randn(13, 4, 3, g=gen))
    G, K = randn(3, 3, g=gen), randn(4, 4, g=gen)  # not symmetric on purpose
    ref = sum(torch.trace(A @ G @ A.T @ K) for A in m.A)
    assert rel(m.curvature(G, K, method="direct"), ref) < 1e-12
    assert rel(m.curvature(G, K, method="moment"), ref) < 1e-12
    Gb, Kb = randn(5, 3, 3, g=gen), randn(5, 4, 4, g=gen)
    assert rel(m.curvature(Gb, Kb, method="moment"), m.curvature(Gb, Kb, method="direct")) < 1e-12
    Gs, Ks = Gb @ Gb.mT, Kb + Kb.mT  # symmetric: the folded moment (a quarter of the size) gives the same
    assert m.folded_moment().shape == (10, 6)
    assert rel(m.curvature(Gs, Ks, method="moment", symmetric=True), m.curvature(Gs, Ks, method="direct")) < 1e-12


def test_dense_moment_is_cached_and_moves_with_to(gen):
    m = Dense(randn(20, 3, 3, g=gen))
    S = m.moment()
    assert m.moment() is S
    F = m.folded_moment()
    assert m.folded_moment() is F
    m32 = m.to(torch.float32)
    assert m32.dtype == torch.float32 and m32._moment is not None and m32._moment.dtype == torch.float32
    assert m32._folded is not None and m32._folded.dtype == torch.float32
    assert m.to(torch.float64) is m


@pytest.mark.parametrize("kind", KINDS)
def test_subset_is_one_gather(kind, gen):
    m = make_measurements(kind, 10, 3, 4, gen)
    idx = torch.tensor([3, 3, 0, 9])
    s = m.subset(idx)
    assert len(s) == 4 and s.shape == m.shape
    assert torch.equal(s.dense(), m.dense()[idx])
    # a per-replica index (R, B) broadcasts against replica matrices (R, d_out, d_in)
    idx2 = torch.tensor([[0, 1], [2, 2]])
    E = randn(2, 3, 4, g=gen)
    out = m.subset(idx2)(E)
    ref = torch.stack([m(E[r])[idx2[r]] for r in range(2)])
    assert rel(out, ref) < 1e-13


def test_measurement_batch_moves_and_is_mutable(gen):
    m = make_measurements("dense", 5, 2, 2, gen)
    b = MeasurementBatch(m, randn(5, g=gen))
    assert b.to("cpu") is b
    b32 = b.to(torch.float32)
    assert b32.targets.dtype == torch.float32 and b32.measurements.dtype == torch.float32
    b.targets = b.targets + 1
    assert len(b) == 5


def test_bad_inputs_name_the_argument(gen):
    with pytest.raises(ValueError, match="A must have"):
        Dense(torch.zeros(3, 4))
    with pytest.raises(TypeError, match="A must be a floating"):
        Dense(torch.zeros(3, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="u and v"):
        RankOne(torch.zeros(3, 2), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="rows must lie in"):
        Entries(torch.tensor([0, 5]), torch.tensor([0, 1]), (3, 3))
    with pytest.raises(ValueError, match="cols must lie in"):
        Entries(torch.tensor([0, 1]), torch.tensor([0, -1]), (3, 3))
    with pytest.raises(ValueError, match="shape must be a pair"):
        Entries(torch.tensor([0]), torch.tensor([0]), (3, 0))
    with pytest.raises(TypeError, match="rows must be an integer"):
        Entries(torch.tensor([0.0]), torch.tensor([0]), (3, 3))
    m = make_measurements("dense", 4, 2, 3, gen)
    with pytest.raises(ValueError, match=r"E must have shape \(\.\.\., 2, 3\)"):
        m(torch.zeros(3, 2, dtype=F64))
    with pytest.raises(ValueError, match=r"r must have shape \(\.\.\., 4\)"):
        m.adjoint(torch.zeros(5, dtype=F64))
    with pytest.raises(ValueError, match="G must have shape"):
        m.curvature(torch.zeros(2, 2, dtype=F64), torch.zeros(2, 2, dtype=F64))
    with pytest.raises(ValueError, match="method must be one of"):
        m.curvature(torch.zeros(3, 3, dtype=F64), torch.zeros(2, 2, dtype=F64), method="fast")


def test_wandb_report_holds_config_figures_checks_and_summary(tmp_path, monkeypatch):
    """The example report run, offline: its files name the config, the figure, the checks table and the summary."""
    import glob
    import json
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lightning_flat.loggers import wandb_report

    monkeypatch.setenv("WANDB_MODE", "offline")
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    png = str(tmp_path / "fig1_demo.png")
    fig.savefig(png)
    plt.close(fig)
    checks = [dict(name="Q1 something holds", value=0.5, passed=True), dict(name="Q2 other", value=2.0, passed=False)]
    run_dir = wandb_report(str(tmp_path), "demo-report", {"quick": True}, [png], checks, {"tau_median": 2700.0})
    assert os.path.isdir(run_dir) and run_dir.startswith(str(tmp_path / "wandb" / "offline-run-"))
    assert glob.glob(os.path.join(run_dir, "files", "media", "images", "fig1_demo*.png"))
    (table,) = glob.glob(os.path.join(run_dir, "files", "media", "table", "checks*.table.json"))
    table = json.load(open(table))
    assert table["columns"] == ["check", "value", "passed"] and table["data"][1] == ["Q2 other", 2.0, False]
    # offline, the config and summary records live in the run's .wandb file (protobuf; keys as plain bytes). wandb's
    # service process writes it and may still be flushing the last records when finish() returns on a busy machine:
    # read it until they are there (up to 30 s)
    import time

    (record,) = glob.glob(os.path.join(run_dir, "run-*.wandb"))
    keys = (b"checks_passed", b"checks_total", b"tau_median", b"quick")
    deadline = time.monotonic() + 30
    while True:
        data = open(record, "rb").read()
        if all(k in data for k in keys) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert all(k in data for k in keys), [k for k in keys if k not in data]
