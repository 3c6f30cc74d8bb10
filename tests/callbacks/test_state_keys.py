"""Two differently configured instances of every callback class share a Trainer: their checkpoint state keys come
from their whole configuration, and each gets its own state back on resume."""

import lightning as L
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_flat.callbacks import (SAM, ApproximateRank, Balancedness, CurvatureOptions, EffectiveRank,
                                      EigenvaluesAbove, FiniteLossGuard, HessianTrace, HyperparameterSchedule,
                                      LabelNoise, MatrixNorms, MeasuringCallback, PreconditionedSharpness, Sharpness,
                                      SingularValues, SpectralDensity)
from lightning_flat.datamodules import MatrixSensingDataModule
from lightning_flat.models import DeepLinearNet

PAIRS = {
    "HessianTrace": lambda: (HessianTrace(2), HessianTrace(2, per_layer=True)),
    "Sharpness": lambda: (Sharpness(2), Sharpness(2, top_k=2)),
    "Sharpness-options": lambda: (Sharpness(2), Sharpness(2, options=CurvatureOptions(seed=3))),
    "SpectralDensity": lambda: (SpectralDensity(2), SpectralDensity(2, num_probes=5)),
    "EigenvaluesAbove": lambda: (EigenvaluesAbove(0.5, 2), EigenvaluesAbove(1.0, 2)),
    "PreconditionedSharpness": lambda: (PreconditionedSharpness(2), PreconditionedSharpness(2, tol=1e-6)),
    "Balancedness": lambda: (Balancedness(2), Balancedness(2, per_layer=True)),
    "EffectiveRank": lambda: (EffectiveRank(2), EffectiveRank(2, kinds=("stable",))),
    "MatrixNorms": lambda: (MatrixNorms(2), MatrixNorms(3)),
    "SingularValues": lambda: (SingularValues(2), SingularValues(2, top=1)),
    "ApproximateRank": lambda: (ApproximateRank(2), ApproximateRank(2, alpha=0.1)),
    "LabelNoise": lambda: (LabelNoise(0.1), LabelNoise(0.1, seed=1)),
    "SAM": lambda: (SAM(0.01), SAM(0.01, m=2)),
    "HyperparameterSchedule": lambda: (HyperparameterSchedule(lr=0.02), HyperparameterSchedule(weight_decay=0.01)),
    "FiniteLossGuard": lambda: (FiniteLossGuard(), FiniteLossGuard(check_grads=True)),
}


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_two_configurations_have_two_state_keys(name):
    a, b = PAIRS[name]()
    assert a.state_key != b.state_key and type(a).__qualname__ in a.state_key


def _fit(callbacks, steps, folder, ckpt_path=None):
    dm = MatrixSensingDataModule(n=24, d_out=3, d_in=3, rank=1, batch_size=6, seed=0)
    tr = L.Trainer(max_steps=steps, logger=False, precision="64-true", default_root_dir=str(folder),
                   callbacks=[*callbacks, ModelCheckpoint(dirpath=str(folder), every_n_train_steps=2,
                                                          save_top_k=-1)],
                   enable_progress_bar=False, enable_model_summary=False)
    tr.fit(DeepLinearNet([3, 4, 3], lr=0.05, seed=0), dm, ckpt_path=ckpt_path)
    return tr


@pytest.mark.parametrize("name", [n for n in sorted(PAIRS) if n not in ("PreconditionedSharpness", "SAM")])
def test_both_instances_share_a_trainer_and_resume_their_own_state(name, tmp_path):
    a, b = PAIRS[name]()
    _fit([a, b], 4, tmp_path)
    ckpt = str(tmp_path / "epoch=0-step=2.ckpt")
    a2, b2 = PAIRS[name]()
    _fit([a2, b2], 4, tmp_path / "resumed", ckpt_path=ckpt)
    for before, after in ((a, a2), (b, b2)):
        if isinstance(before, MeasuringCallback):
            # each instance resumed its own history: the resumed run's record equals the uninterrupted one's
            assert after.history == before.history and after.history
        else:
            assert after.state_dict() == before.state_dict()
