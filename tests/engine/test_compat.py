"""The Lightning and torch behaviour that lightning_flat.engine.compat relies on. Each test fails when a release
changes it, so the fused path breaks here and not silently in training."""

import inspect

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature

from helpers import trainer
from lightning_flat.engine import compat
from lightning_flat.loggers import MemoryLogger


class Jumps(L.LightningModule):
    """Each training_step counts 4 extra steps through compat.advance_global_step and logs the step it ends on."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen = []

    def training_step(self, batch, batch_idx):
        compat.advance_global_step(self.trainer, 4)
        self.log("end", float(self.trainer.global_step))  # Lightning completes this call's own step afterwards
        return (self.w - 1).square().sum()

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.seen.append((self.trainer.global_step, batch_idx))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return [torch.zeros(1)] * 1000


def test_advance_global_step_counts_steps_batches_and_the_logging_step():
    model, mem = Jumps(), MemoryLogger()
    tr = L.Trainer(max_steps=20, logger=mem, log_every_n_steps=5, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False)
    tr.fit(model)
    assert tr.global_step == 20  # max_steps is exact: 4 calls of 5 steps
    assert [s for s, _ in model.seen] == [5, 10, 15, 20]
    progress = tr.fit_loop.epoch_loop.batch_progress
    assert progress.total.ready == progress.total.completed == 20  # batches count steps too
    # self.log values land at the step of the call's last SGD step (Lightning's logging step), every 5 steps
    assert mem.history["end"] == [(4, 4.0), (9, 9.0), (14, 14.0), (19, 19.0)]


def test_checkpoint_step_period_is_read_from_model_checkpoint():
    assert compat.checkpoint_step_period(ModelCheckpoint(every_n_train_steps=7)) == 7
    assert compat.checkpoint_step_period(ModelCheckpoint()) == 0
    assert compat.checkpoint_step_period(Callback()) == 0


def test_silenced_logging_restores_the_module():
    class M(L.LightningModule):
        pass

    m = M()
    with compat.silenced_logging(m):
        assert m.log("x", 1.0) is None and m.log_dict({"x": 1.0}) is None
    assert "log" not in m.__dict__ and m.log.__func__ is L.LightningModule.log


def test_fast_setattr_does_what_module_setattr_does():
    class Plain(torch.nn.Module):
        pass

    class Fast(compat.FastSetattr, torch.nn.Module):
        pass

    for cls in (Plain, Fast):
        m = cls()
        m.name, m.count = "a", 1
        m.name, m.count, m.flag = None, 2.5, True
        m.p = torch.nn.Parameter(torch.zeros(1))  # registries still go through nn.Module
        assert m.__dict__["name"] is None and m.__dict__["count"] == 2.5 and m.__dict__["flag"] is True
        assert list(m._parameters) == ["p"] and "p" not in m.__dict__


def test_cache_signature_is_what_lightning_inspects():
    def step(self, batch, batch_idx):
        pass

    compat.cache_signature(step)
    assert step.__signature__ == inspect.signature(step)
    assert is_param_in_hook_signature(step, "batch_idx", min_args=2)
    step.__signature__ = inspect.Signature([inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)])
    assert not is_param_in_hook_signature(step, "batch_idx", min_args=2)  # Lightning reads __signature__


def test_a_lightning_flat_model_logs_each_step_where_lightning_would(tmp_path):
    """The same run fused and one step per call writes the same (step, value) pairs to the loggers."""
    from lightning_flat.datamodules import MatrixSensingDataModule
    from lightning_flat.models import DeepLinearNet

    histories = []
    for chunk_size in (1, 50):
        tr, mem = trainer(30, log_every_n_steps=4)
        tr.fit(DeepLinearNet([3, 4, 3], lr=0.05, chunk_size=chunk_size),
               MatrixSensingDataModule(n=20, d_out=3, d_in=3, rank=1, batch_size=4, seed=0))
        histories.append(mem.history)
    assert histories[0] == histories[1] and [s for s, _ in histories[0]["train/loss"]] == list(range(3, 30, 4))


def test_callback_hooks_are_the_ones_the_engine_knows():
    """A Lightning release that adds a hook to Callback fails here: someone must look at where Lightning calls it
    (per training batch or not) before the engine runs fused chunks beside a callback that defines it. Until then a
    new hook named like a per-step one is treated as per-step (fused chunks end at each step)."""
    assert compat.callback_hooks() == compat.KNOWN_CALLBACK_HOOKS
    assert set(compat.per_step_hooks()) == {"on_train_batch_start", "on_train_batch_end", "on_before_backward",
                                            "on_after_backward", "on_before_optimizer_step", "on_before_zero_grad"}


def test_per_step_hooks_are_the_ones_lightning_calls_per_batch():
    """Each hook per_step_hooks() names runs once per training batch (counted on a 4-batch fit), the others less."""
    calls = {}

    class Count(Callback):
        pass

    for name in compat.callback_hooks():
        def hook(self, *args, _name=name, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
        setattr(Count, name, hook)

    class M(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def training_step(self, batch, batch_idx):
            return (self.w - batch[0]).square().sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self):
            return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(4, 1)), batch_size=1)

    tr = L.Trainer(max_epochs=1, logger=False, callbacks=[Count()], enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False)
    tr.fit(M())
    per_batch = {name for name, n in calls.items() if n == 4}
    assert set(compat.per_step_hooks()) == per_batch


def test_compiled_submodules_are_found_by_their_wrapper():
    net = torch.nn.Sequential(torch.nn.Linear(2, 2))
    net.add_module("fast", torch.compile(torch.nn.Linear(2, 2)))
    assert compat.compiled_submodules(net) == ["fast"]
    assert compat.compiled_submodules(torch.nn.Linear(2, 2)) == []
