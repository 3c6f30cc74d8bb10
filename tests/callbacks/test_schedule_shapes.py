"""Every schedule shape against hand-computed values at its phase boundaries; the Wang & Jacot configs."""

import math
import os

import pytest

from lightning_flat.callbacks.schedule import HyperparameterSchedule, Schedule

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "..", "examples")


def values(spec, steps):
    s = Schedule("x", spec)
    return [s.value(t) for t in steps]


def test_anneal():
    assert values({"shape": "anneal", "high": 0.2, "low": 0.02, "at": 100}, [0, 99, 100, 10**6]) == [0.2, 0.2, 0.02,
                                                                                                      0.02]


def test_periodic_and_cycles():
    spec = {"shape": "periodic", "values": [0.4, 0.1, 0.7], "lengths": [3, 2, 1]}
    assert values(spec, range(13)) == [0.4] * 3 + [0.1] * 2 + [0.7] + [0.4] * 3 + [0.1] * 2 + [0.7] + [0.4]
    capped = {**spec, "cycles": 1}
    assert values(capped, [5, 6, 100]) == [0.7, 0.7, 0.7]


def test_cosine():
    got = values({"shape": "cosine", "start": 1.0, "end": 0.1, "steps": 100}, [0, 25, 50, 100, 200])
    ref = [1.0, 0.1 + 0.45 * (1 + math.cos(math.pi / 4)), 0.55, 0.1, 0.1]
    assert all(abs(a - b) < 1e-15 for a, b in zip(got, ref))


def test_linear_warmup():
    got = values({"shape": "linear_warmup", "value": 0.5, "steps": 10, "start": 0.1}, [0, 5, 9, 10, 11])
    ref = [0.1, 0.3, 0.1 + 0.4 * 0.9, 0.5, 0.5]
    assert all(abs(a - b) < 1e-15 for a, b in zip(got, ref))
    assert values({"shape": "linear_warmup", "value": 2.0, "steps": 4}, [0, 1, 4]) == [0.0, 0.5, 2.0]


def test_segments_count_from_their_start():
    spec = [(0, 0.03), (500, {"shape": "periodic", "values": [0.4, 0.1], "lengths": [1000, 1000]}),
            (8500, {"shape": "constant", "value": 0.0})]
    assert values(spec, [0, 499, 500, 1499, 1500, 2499, 2500, 8499, 8500]) == [0.03, 0.03, 0.4, 0.4, 0.1, 0.1, 0.4,
                                                                               0.1, 0.0]


@pytest.mark.parametrize(
    "spec, match",
    [({"shape": "wave"}, "shape must be one of"), ({"shape": "anneal", "high": 1, "low": 0}, r"missing \['at'\]"),
     ({"shape": "cosine", "start": 1, "end": 0, "steps": 0}, "steps must be a positive int"),
     ({"shape": "periodic", "values": [1, 2], "lengths": [1]}, "values and lengths of one"),
     ({"shape": "anneal", "high": 1, "low": 0, "at": 5, "when": 3}, "unknown"),
     ({"shape": "anneal", "high": -1, "low": 0, "at": 5}, "high must be >= 0")],
    ids=["name", "missing", "steps", "periodic", "unknown", "negative"],
)
def test_bad_shapes(spec, match):
    with pytest.raises(ValueError, match=match):
        Schedule("lr", spec)


def cli_schedule(name):
    """Parse an example config with the lightning-flat CLI parser (types as the CLI sees them)."""
    from lightning.pytorch import LightningDataModule, LightningModule
    from lightning.pytorch.cli import LightningCLI

    base = os.path.join(EXAMPLES, "gatmiry2023", "quick.yaml")
    cfg = os.path.join(EXAMPLES, "wang_jacot2023", name)
    cli = LightningCLI(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                       run=False, args=["--config", base, "--config", cfg, "--trainer.logger=false"])
    (sched,) = [c for c in cli.trainer.callbacks if isinstance(c, HyperparameterSchedule)]
    return sched


def test_wang_jacot_e1():
    s = cli_schedule("e1_schedule.yaml")
    assert [s.values(t) for t in (0, 499, 500, 5999)] == [{"lr": 0.03, "weight_decay": 0.1}] * 2 + [
        {"lr": 0.2, "weight_decay": 0.1}] * 2


def test_wang_jacot_e1_offshoot():
    s = cli_schedule("e1_offshoot_schedule.yaml")
    got = [s.values(t) for t in (499, 500, 1999, 2000, 5999)]
    assert got == [{"lr": 0.03, "weight_decay": 0.1}, {"lr": 0.2, "weight_decay": 0.1},
                   {"lr": 0.2, "weight_decay": 0.1}, {"lr": 0.02, "weight_decay": 0.001},
                   {"lr": 0.02, "weight_decay": 0.001}]


def test_wang_jacot_e2():
    s = cli_schedule("e2_schedule.yaml")
    got = [s.values(t) for t in (499, 500, 4999, 5000, 7999)]
    assert got == [{"lr": 0.03, "weight_decay": 0.1}, {"lr": 0.25, "weight_decay": 0.1},
                   {"lr": 0.25, "weight_decay": 0.1}, {"lr": 0.05, "weight_decay": 0.001},
                   {"lr": 0.05, "weight_decay": 0.001}]


def test_wang_jacot_e4():
    s = cli_schedule("e4_schedule.yaml")
    high, low = {"lr": 0.4, "weight_decay": 0.1}, {"lr": 0.1, "weight_decay": 0.001}
    assert s.values(499) == {"lr": 0.03, "weight_decay": 0.1}
    for cycle in range(4):
        start = 500 + 2000 * cycle
        assert [s.values(t) for t in (start, start + 999, start + 1000, start + 1999)] == [high, high, low, low]
