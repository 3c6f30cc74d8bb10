"""Bad data and bad arguments are refused where they are given (construction, or setup for what needs the
Trainer), with a message that names the argument, the bad value and what is allowed; files that cannot be trusted
are detected. Each row is one bad input a user could give."""

import lightning as L
import pytest
import torch

from helpers import trainer
from lightning_flat.callbacks import SAM, Balancedness, FiniteLossGuard, LabelNoise, Sharpness
from lightning_flat.datamodules import MatrixSensingDataModule, MeasurementDataModule
from lightning_flat.measurements import Dense, Entries, RankOne
from lightning_flat.models import DeepLinearNet, QuadraticNet, ResidualLinearNet

F64 = torch.float64
NAN, INF = float("nan"), float("inf")


def _A(bad=None):
    A = torch.randn(5, 3, 4, dtype=F64, generator=torch.Generator().manual_seed(0))
    if bad is not None:
        A[1, 2, 0] = bad
    return A


CONSTRUCTION = [
    ("Dense A with a NaN", lambda: Dense(_A(NAN)), ValueError, r"A must be finite, got 1 non-finite entry \(the first at index \(1, 2, 0\): nan\)"),
    ("Dense A with an inf", lambda: Dense(_A(INF)), ValueError, "A must be finite"),
    ("RankOne u with a NaN", lambda: RankOne(torch.full((4, 3), NAN, dtype=F64), torch.ones(4, 2, dtype=F64)), ValueError,
     "u must be finite, got 12 non-finite entries"),
    ("targets with a NaN", lambda: MeasurementDataModule.from_problem(
        Dense(_A()), torch.tensor([1.0, 2.0, NAN, 0.0, 1.0], dtype=F64)), ValueError, "targets must be finite"),
    ("ground truth with an inf", lambda: MeasurementDataModule.from_problem(
        Dense(_A()), torch.zeros(5, dtype=F64), ground_truth=torch.full((3, 4), INF, dtype=F64)), ValueError,
     "ground_truth must be finite"),
    ("targets of the wrong length", lambda: MeasurementDataModule.from_problem(Dense(_A()), torch.zeros(4, dtype=F64)),
     ValueError, r"targets must be a float tensor of shape \(5,\)"),
    ("init_scale overflowing float32", lambda: DeepLinearNet([3, 3, 3], init_scale=1e39), ValueError,
     r"init_scale=1e\+39 overflows torch.float32"),
    ("ResidualLinearNet scale overflowing float32", lambda: ResidualLinearNet(3, 2, scale=1e40), ValueError,
     "scale=1e\\+40 overflows"),
    ("QuadraticNet init_scale overflowing", lambda: QuadraticNet(3, 2, 1, init_scale=1e40), ValueError, "overflows"),
    ("QuadraticNet seed as a string", lambda: QuadraticNet(3, 2, 1, seed="0"), TypeError,
     "seed must be an int or a list of ints, got '0'"),
    ("QuadraticNet seed as a float", lambda: QuadraticNet(3, 2, 1, seed=1.5), TypeError, "seed must be an int"),
    ("QuadraticNet negative seed", lambda: QuadraticNet(3, 2, 1, seed=-3), ValueError, "non-negative"),
    ("negative seed in a replica list", lambda: DeepLinearNet([3, 3], replicas=2, seed=[0, -1]), ValueError,
     "non-negative"),
    ("per-replica lr of the wrong length", lambda: DeepLinearNet([3, 3], replicas=3, lr=[0.1, 0.2]), ValueError,
     "list of 3 numbers"),
    ("unit_norm as a string", lambda: MatrixSensingDataModule(n=10, d_out=3, d_in=3, rank=1, unit_norm="no"),
     TypeError, "unit_norm must be True or False, got 'no'"),
    ("SAM adaptive='False'", lambda: SAM(0.1, adaptive="False"), TypeError, "adaptive must be True or False"),
    ("Sharpness edge_of_stability=1", lambda: Sharpness(edge_of_stability=1), TypeError, "edge_of_stability must be"),
    ("FiniteLossGuard check_grads='yes'", lambda: FiniteLossGuard(check_grads="yes"), TypeError, "check_grads must"),
    ("Balancedness per_layer=None", lambda: Balancedness(per_layer=None), TypeError, "per_layer must be"),
    ("Entries rows out of range", lambda: Entries(torch.tensor([0, 5]), torch.tensor([0, 0]), (3, 3)), ValueError,
     r"rows must lie in \[0, 3\)"),
]


@pytest.mark.parametrize("what, make, error, match", CONSTRUCTION, ids=[c[0] for c in CONSTRUCTION])
def test_refused_at_construction(what, make, error, match):
    with pytest.raises(error, match=match):
        make()


def _fit(model, dm, **kw):
    tr, _ = trainer(3, precision=kw.pop("precision", "32-true"), **kw)
    tr.fit(model, dm)
    return model


DM = dict(n=20, d_out=3, d_in=4, rank=1, batch_size=5)

SETUP = [
    ("model dims not the datamodule's", lambda: _fit(DeepLinearNet([3, 5, 3]), MatrixSensingDataModule(**DM)),
     "DeepLinearNet maps to 3x3 matrices .* MatrixSensingDataModule's measurements act on 3x4 ones"),
    ("an end-to-end matrix overflowing float32", lambda: _fit(DeepLinearNet([4] + [5] * 8 + [3], init_scale=1e6),
                                                               MatrixSensingDataModule(**DM)),
     r"end-to-end matrix is not finite in torch.float32 .*\(init_scale=1000000.0\) overflows"),
    ("LabelNoise std per replica, wrong length", lambda: _fit(DeepLinearNet([4, 5, 3], replicas=3),
                                                              MatrixSensingDataModule(**DM),
                                                              callbacks=[LabelNoise(std=[1.0, 2.0])]),
     r"LabelNoise\(std=\[...\]\) has 2 values .* 3 replica\(s\)"),
]


@pytest.mark.parametrize("what, run, match", SETUP, ids=[c[0] for c in SETUP])
def test_refused_before_the_first_step(what, run, match):
    with pytest.raises(ValueError, match=match):
        run()


def test_the_same_init_is_fine_in_float64():
    model = _fit(DeepLinearNet([4] + [5] * 8 + [3], init_scale=1e6, lr=0.0), MatrixSensingDataModule(**DM),
                 precision="64-true")  # (lr 0: accepted and trained; at this scale any lr > 0 diverges)
    assert model.trainer.global_step == 3


def test_corrupt_checkpoint_says_so(tmp_path):
    dm = MatrixSensingDataModule(**DM)
    tr = L.Trainer(max_steps=4, logger=False, enable_progress_bar=False, enable_model_summary=False,
                   default_root_dir=tmp_path)
    tr.fit(DeepLinearNet([4, 3]), dm)
    good = tr.checkpoint_callback.best_model_path
    bad = tmp_path / "truncated.ckpt"
    data = open(good, "rb").read()
    bad.write_bytes(data[: len(data) // 2])
    tr = L.Trainer(max_steps=8, logger=False, enable_progress_bar=False, enable_model_summary=False,
                   default_root_dir=tmp_path)
    model = DeepLinearNet([4, 3])
    before = [w.detach().clone() for w in model.weights()]
    with pytest.raises(RuntimeError, match="corrupted"):
        tr.fit(model, dm, ckpt_path=str(bad))
    assert all(torch.equal(a, b) for a, b in zip(before, model.weights()))  # nothing half-loaded


def test_unwritable_output_folder_fails_first(tmp_path):
    from lightning_flat.io import output_folder

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(PermissionError, match=f"the output folder '{blocker / 'out'}' is not writable"):
        output_folder(blocker / "out")
    assert output_folder(tmp_path / "new" / "out") == str(tmp_path / "new" / "out")


def test_examples_refuse_an_unwritable_out_before_training(tmp_path):
    from helpers import run_example

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(PermissionError, match="not writable"):
        run_example("wang_jacot2023/run.py", ["--quick", "--out", str(blocker / "out")])


def test_dtype_mismatches_name_the_argument_and_both_dtypes():
    from lightning_flat import functional as F

    m = Dense(_A())
    with pytest.raises(TypeError, match=r"E is torch.float32 but these Dense measurements are torch.float64"):
        m(torch.zeros(3, 4))
    with pytest.raises(TypeError, match=r"r is torch.float32 but these Dense measurements"):
        m.adjoint(torch.zeros(5))
    with pytest.raises(TypeError, match=r"weights is torch.float32 but these Dense measurements are torch.float64"):
        F.hessian_trace([torch.zeros(5, 4), torch.zeros(3, 5)], m)
    with pytest.raises(TypeError, match="weights must share one dtype"):
        F.end_to_end([torch.zeros(5, 4), torch.zeros(3, 5, dtype=F64)])
    # Entries only gathers: any dtype of E is fine
    e = Entries(torch.tensor([0]), torch.tensor([1]), (3, 4), dtype=F64)
    assert e(torch.ones(3, 4)).dtype == torch.float32
