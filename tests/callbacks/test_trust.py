"""The callbacks in trainers this project did not write: gradient accumulation, unused parameters, batch norm,
manual optimization, several optimizers, user lr schedulers, integer labels, EarlyStopping on measured values.
Each either gives the right number (against a hand computation) or is refused before the first step with the
reason and the fix."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping

from conftest import rel
from helpers import flat_function, trainer
from lightning_flat.callbacks import (SAM, CurvatureOptions, FiniteLossGuard, HessianTrace, HyperparameterSchedule,
                                      LabelNoise, Sharpness)
from lightning_flat.datamodules import MatrixSensingDataModule
from lightning_flat.models import DeepLinearNet

F64 = torch.float64
LR, RHO = 0.1, 0.05


def sam_eps(g, rho):
    norm = torch.sqrt(sum((gi ** 2).sum() for gi in g))
    return [rho * gi / norm for gi in g]


class Regression(L.LightningModule):
    """A user's float64 regression module: [x, y] list batches of 6 from 24 rows, plain SGD; options for an unused
    parameter, batch norm, a NaN loss on one micro-batch, integer labels, manual optimization, two optimizers and
    an lr scheduler. It records the targets each training_step saw."""

    def __init__(self, unused=False, batch_norm=False, nan_batch=None, int_labels=False, manual=False,
                 two_optimizers=False, scheduler=False):
        super().__init__()
        torch.manual_seed(0)
        layers = [torch.nn.Linear(3, 5)] + ([torch.nn.BatchNorm1d(5)] if batch_norm else []) + \
            [torch.nn.Tanh(), torch.nn.Linear(5, 1)]
        self.net = torch.nn.Sequential(*layers).double()
        self.spare = torch.nn.Parameter(torch.ones(2, dtype=F64)) if unused else None
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(24, 3, generator=g, dtype=F64)
        self.y = torch.randint(0, 3, (24, 1), generator=g) if int_labels else torch.randn(24, 1, generator=g,
                                                                                            dtype=F64)
        self.nan_batch, self.two_optimizers, self.scheduler = nan_batch, two_optimizers, scheduler
        self.automatic_optimization = not manual
        self.seen = []

    def loss(self, batch):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y.to(F64))

    def training_step(self, batch, batch_idx):
        self.seen.append(batch[1].clone())
        loss = self.loss(batch)
        if self.nan_batch is not None and batch_idx == self.nan_batch:
            loss = loss * float("nan")
        if not self.automatic_optimization:
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
        return loss

    def configure_optimizers(self):
        if self.two_optimizers:
            return [torch.optim.SGD(self.net[0].parameters(), lr=LR), torch.optim.SGD(self.net[-1].parameters(), lr=LR)]
        opt = torch.optim.SGD(self.parameters(), lr=LR)
        if self.scheduler:
            return [opt], [torch.optim.lr_scheduler.StepLR(opt, 10)]
        return opt

    def train_dataloader(self):
        ds = torch.utils.data.TensorDataset(self.x, self.y)
        return torch.utils.data.DataLoader(ds, batch_size=6, shuffle=False)


def fit(model, steps, callbacks=(), **kw):
    torch.manual_seed(5)
    tr, mem = trainer(steps, callbacks, **kw)
    tr.fit(model)
    return tr, mem


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def grad_at(model, W, x, y):
    """The gradient of the MSE on (x, y) at parameters W (a dict), by torch.func, independent of the callbacks."""
    names = list(W)
    P = {n: W[n].clone().requires_grad_() for n in names}
    loss = torch.nn.functional.mse_loss(torch.func.functional_call(model, P, (x,)), y)
    return dict(zip(names, torch.autograd.grad(loss, list(P.values()), allow_unused=True)))


# ---------------------------------------------------------------------------------------- silent wrong numbers
def test_sam_under_accumulation_is_the_sam_step_on_the_whole_batch():
    model = Regression()
    W0 = {k: v for k, v in params(model).items()}
    fit(model, 1, [SAM(rho=RHO)], accumulate_grad_batches=2)  # one optimizer step over rows 0-11
    net = Regression().net  # the same init, for the reference
    W = {k.removeprefix("net."): v for k, v in W0.items()}
    x, y = model.x[:12], model.y[:12]
    g = grad_at(net, W, x, y)
    eps = sam_eps(list(g.values()), RHO)
    gp = grad_at(net, {k: W[k] + e for k, e in zip(W, eps)}, x, y)
    # float64: both sides are a few hundred flops of O(1) numbers
    for k, p in model.net.named_parameters():
        assert rel(p, W[k] - LR * gp[k]) < 1e-10, k


def test_sam_acts_on_the_used_parameters_when_one_gets_no_gradient():
    model = Regression(unused=True)
    W0 = params(model)
    fit(model, 1, [SAM(rho=RHO)])
    W = {k.removeprefix("net."): v for k, v in W0.items() if k.startswith("net.")}
    x, y = model.x[:6], model.y[:6]
    net = Regression().net
    g = grad_at(net, W, x, y)
    eps = sam_eps(list(g.values()), RHO)
    gp = grad_at(net, {k: W[k] + e for k, e in zip(W, eps)}, x, y)
    for k, p in model.net.named_parameters():
        assert rel(p, W[k] - LR * gp[k]) < 1e-10, k  # the SAM step, not plain SGD
    assert torch.equal(model.spare.detach(), W0["spare"])


def test_sam_does_not_update_batch_norm_statistics_twice():
    plain, sam = Regression(batch_norm=True), Regression(batch_norm=True)
    fit(plain, 1)
    fit(sam, 1, [SAM(rho=RHO)])
    bn_plain, bn_sam = plain.net[1], sam.net[1]
    assert torch.equal(bn_plain.running_mean, bn_sam.running_mean)  # one forward's update, bitwise
    assert torch.equal(bn_plain.running_var, bn_sam.running_var)
    assert int(bn_sam.num_batches_tracked) == 1


def test_label_noise_draws_afresh_for_every_micro_batch():
    acc, single = Regression(), Regression()
    fit(acc, 1, [LabelNoise(std=1.0)], accumulate_grad_batches=2)
    fit(single, 1, [LabelNoise(std=1.0)])
    noise = [acc.seen[i] - acc.y[6 * i:6 * i + 6] for i in range(2)]
    assert not torch.allclose(noise[0], noise[1])  # two draws, not one reused
    assert torch.equal(acc.seen[0], single.seen[0])  # micro-batch 0 draws what an unaccumulated step draws


def test_guard_sees_a_non_finite_micro_batch():
    model = Regression(nan_batch=0)  # the first of two micro-batches is NaN, the last is finite
    W0 = params(model)
    guard = FiniteLossGuard()
    with pytest.warns(UserWarning, match="non-finite training loss at step 0"):
        tr, _ = fit(model, 3, [guard], accumulate_grad_batches=2)
    assert guard.stopped_step == 0 and tr.global_step <= 1  # (Lightning counts the refused step)
    assert all(torch.equal(p, W0[k]) for k, p in params(model).items())  # the NaN update was never applied


@pytest.mark.parametrize("order", ["noise_first", "trace_first"])
def test_kept_curvature_batch_has_no_label_noise_whatever_the_order(order):
    # (loss_fn: a read through training_step would also append to model.seen)
    ln, ht = LabelNoise(std=1.0), HessianTrace(every_n_steps=2, num_matvecs=30, loss_fn=lambda m, b: m.loss(b))
    model = Regression()
    fit(model, 2, [ln, ht] if order == "noise_first" else [ht, ln])
    assert torch.equal(ht.state_dict()["source"]["batch"][1], model.y[:6])  # the clean targets of the first batch
    assert not torch.equal(model.seen[0], model.y[:6])  # while training saw noisy ones


def test_schedule_and_a_user_lr_scheduler_are_refused_together():
    with pytest.raises(ValueError, match=r"HyperparameterSchedule\(lr=...\) and the module's learning-rate scheduler "
                                         r"\(StepLR\)"):
        fit(Regression(scheduler=True), 2, [HyperparameterSchedule(lr=0.1)])


# ---------------------------------------------------------------------------------------- refusals at setup
@pytest.mark.parametrize("make, error, match", [
    (lambda: (Regression(manual=True), [HessianTrace(10)]), ValueError, "HessianTrace: with manual optimization"),
    (lambda: (Regression(manual=True), [Sharpness(10)]), ValueError, "Sharpness: with manual optimization"),
    (lambda: (Regression(manual=True), [SAM(0.05)]), ValueError, "SAM: with manual optimization"),
    (lambda: (Regression(two_optimizers=True, manual=True), [SAM(0.05, loss_fn=lambda m, b: m.loss(b))]),
     ValueError, "SAM: the module has 2 optimizers"),
    (lambda: (Regression(int_labels=True), [LabelNoise(1.0)]), TypeError,
     "LabelNoise adds Gaussian noise to real-valued regression targets; these targets are torch.int64"),
], ids=["trace-manual", "sharpness-manual", "sam-manual", "sam-two-optimizers", "label-noise-int-labels"])
def test_refused_before_the_first_update(make, error, match):
    model, callbacks = make()
    W0 = params(model)
    with pytest.raises(error, match=match):
        fit(model, 2, callbacks)
    assert all(torch.equal(p, W0[k]) for k, p in params(model).items())


def test_manual_optimization_with_loss_fn_is_measured():
    model = Regression(manual=True)
    ht = HessianTrace(every_n_steps=1, num_matvecs=30, loss_fn=lambda m, b: m.loss(b))
    fit(model, 2, [ht])
    assert [s for s, _ in ht.history["hessian/trace"]] == [0, 1, 2]


@pytest.mark.parametrize("make, match", [
    (lambda: HessianTrace(num_matvecs=3), "num_matvecs must be >= 6"),
    (lambda: LabelNoise(target_key=1.5), "target_key must be a str"),
    (lambda: SAM(normalize="True"), "normalize must be True or False"),
])
def test_strict_arguments(make, match):
    with pytest.raises((TypeError, ValueError), match=match):
        make()


# ---------------------------------------------------------------------------------------- monitorable values
@pytest.mark.parametrize("logger", [True, False])
def test_early_stopping_on_sharpness(logger, tmp_path):
    dm = MatrixSensingDataModule(n=40, d_out=4, d_in=4, rank=1, batch_size=8, seed=0, steps_per_epoch=10)
    net = DeepLinearNet([4, 4, 4], lr=0.02, seed=0)
    sharp = Sharpness(every_n_steps=5)
    stop = EarlyStopping(monitor="hessian/sharpness", mode="max", stopping_threshold=0.0,
                         check_on_train_epoch_end=True)
    tr = L.Trainer(max_steps=200, logger=logger and None, callbacks=[sharp, stop], enable_progress_bar=False,
                   enable_checkpointing=False, enable_model_summary=False, precision="64-true",
                   default_root_dir=tmp_path)  # (logger=True writes its CSV logs there, not in the current folder)
    tr.fit(net, dm)
    assert tr.global_step == 10 and stop.stopped_epoch == 0  # stopped at the first epoch end it checked
    step, value = sharp.history["hessian/sharpness"][-1]
    # Lightning keeps logged values as float32 tensors: 2^-24 relative
    assert step == 10 and rel(tr.callback_metrics["hessian/sharpness"], value) < 1e-6


# ---------------------------------------------------------------------------------------- reads leave nothing
class SideEffects(Regression):
    """training_step with a side effect a user might write: a list of collected losses, a torchmetrics metric's
    update, or a hidden state carried across steps (an RNN's)."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        if kind == "metric":
            import torchmetrics

            self.metric = torchmetrics.MeanSquaredError().double()
        self.losses, self.hidden = [], torch.zeros(1, dtype=F64)

    def training_step(self, batch, batch_idx):
        loss = self.loss(batch)
        if self.kind == "list":
            self.losses.append(loss.detach())
        elif self.kind == "metric":
            self.metric.update(self.net(batch[0]).detach(), batch[1])
        else:
            self.hidden = 0.9 * self.hidden + loss.detach()
        return loss


@pytest.mark.parametrize("kind", ["list", "metric", "hidden"])
def test_reads_through_a_training_step_with_side_effects_are_measured_and_undone(kind):
    plain, measured = SideEffects(kind), SideEffects(kind)
    W0 = params(measured)
    fit(plain, 3)
    # 120 >= 3 x 26 parameters: the Hutch++ sketch spans the whole space, so the trace is exact to rounding
    ht, sh = HessianTrace(every_n_steps=1, num_matvecs=120), Sharpness(every_n_steps=1, tol=1e-12)
    fit(measured, 3, [ht, sh])
    # training saw nothing of the reads: weights, collected losses, the carried state and the metric, bitwise
    assert all(torch.equal(p, q) for p, q in zip(plain.parameters(), measured.parameters()))
    assert len(measured.losses) == len(plain.losses) and all(torch.equal(a, b) for a, b in
                                                            zip(plain.losses, measured.losses))
    assert torch.equal(plain.hidden, measured.hidden)
    if kind == "metric":
        assert torch.equal(plain.metric.sum_squared_error, measured.metric.sum_squared_error)
        assert int(plain.metric.total) == int(measured.metric.total) == 18
    # and each read is the dense Hessian of the loss on the kept first batch (float64 rounding; Lanczos to 1e-12)
    H = dense_hessian_of(W0, mse_at(Regression().net, measured.x[:6], measured.y[:6], "net."))
    assert rel(first(ht, "hessian/trace"), torch.trace(H)) < 1e-9
    assert rel(first(sh, "hessian/sharpness"), torch.linalg.eigvalsh(H)[-1]) < 1e-8


def test_a_read_with_side_effects_works_with_loss_fn():
    model = SideEffects("list")
    ht = HessianTrace(every_n_steps=1, num_matvecs=30, loss_fn=lambda m, b: m.loss(b))
    fit(model, 2, [ht])
    assert len(model.losses) == 2  # training's own two steps, nothing from the three reads


# ---------------------------------------------------------------------------------------- where PyTorch allows it
def dense_hessian_of(params, loss_of_params):
    """The dense float64 Hessian of ``loss_of_params(dict)`` over the given parameters (a name -> tensor dict)."""
    f, flat = flat_function(params, loss_of_params)
    return torch.func.hessian(f)(flat)


def mse_at(net, x, y, prefix=""):
    return lambda P: torch.nn.functional.mse_loss(
        torch.func.functional_call(net, {k.removeprefix(prefix): v for k, v in P.items() if k.startswith(prefix)},
                                   (x,)), y)


def first(cb, key):
    step, value = cb.history[key][0]
    assert step == 0
    return value


def test_unused_parameter_has_zero_curvature_not_a_crash():
    model = Regression(unused=True)
    W0 = params(model)  # with the unused one: its rows and columns of H are zero
    loss_fn = lambda m, b: m.loss(b)  # noqa: E731  (training_step records what it sees)
    ht = HessianTrace(every_n_steps=1, num_matvecs=120, loss_fn=loss_fn)  # > 3 x 26 used parameters: exact
    sh = Sharpness(every_n_steps=1, loss_fn=loss_fn, tol=1e-12)
    fit(model, 1, [ht, sh])
    H = dense_hessian_of(W0, mse_at(Regression().net, model.x[:6], model.y[:6], "net."))
    # Hutch++ at full budget is exact to rounding; Lanczos converged to 1e-12
    assert rel(first(ht, "hessian/trace"), torch.trace(H)) < 1e-9
    assert rel(first(sh, "hessian/sharpness"), torch.linalg.eigvalsh(H)[-1]) < 1e-9


def test_curvature_of_several_batches():
    model = Regression()
    W0 = {k.removeprefix("net."): v for k, v in params(model).items()}
    loss_fn = lambda m, b: m.loss(b)  # noqa: E731
    ht = HessianTrace(every_n_steps=1, num_matvecs=120, loss_fn=loss_fn, options=CurvatureOptions(batches=3))
    fit(model, 3, [ht])
    steps = [s for s, _ in ht.history["hessian/trace"]]
    assert steps == [2, 3]  # reads start once the 3 batches are kept (step 2, before its update)
    net = Regression().net
    # the weights of step 2: replay two plain SGD steps on rows 0-5 and 6-11 by hand
    W = dict(W0)
    for i in range(2):
        g = grad_at(net, W, model.x[6 * i:6 * i + 6], model.y[6 * i:6 * i + 6])
        W = {k: W[k] - LR * g[k] for k in W}
    Hs = [dense_hessian_of(W, mse_at(net, model.x[6 * i:6 * i + 6], model.y[6 * i:6 * i + 6])) for i in range(3)]
    assert rel(ht.history["hessian/trace"][0][1], torch.trace(sum(Hs) / 3)) < 1e-9


class Attention(L.LightningModule):
    """A one-head attention regressor through torch's scaled_dot_product_attention, float64."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v = (torch.nn.Linear(3, 3).double() for _ in range(3))
        self.out = torch.nn.Linear(3, 1).double()
        g = torch.Generator().manual_seed(2)
        self.x, self.y = torch.randn(8, 4, 3, generator=g, dtype=F64), torch.randn(8, 1, generator=g, dtype=F64)

    def forward(self, x):
        a = torch.nn.functional.scaled_dot_product_attention(self.q(x), self.k(x), self.v(x))
        return self.out(a.mean(1))

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.mse_loss(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(self.x, self.y), batch_size=4)


def test_attention_hessian():
    model = Attention()
    W0 = params(model)
    sh = Sharpness(every_n_steps=1, tol=1e-12)
    fit(model, 1, [sh])
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):  # as the read does: torch 2.15's CPU pick has no forward-mode derivative
        H = dense_hessian_of(W0, mse_at(Attention(), model.x[:4], model.y[:4]))
    assert rel(first(sh, "hessian/sharpness"), torch.linalg.eigvalsh(H)[-1]) < 1e-9


class HalfMLP(L.LightningModule):
    """A tanh MLP trained in bf16 (precision="bf16-true")."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
        g = torch.Generator().manual_seed(3)
        self.x, self.y = torch.randn(12, 3, generator=g), torch.randn(12, 1, generator=g)

    def training_step(self, batch, batch_idx):
        # the mean squared error written out: torch 2.3 has no bfloat16 mse_loss on CPU
        return (self.net(batch[0]) - batch[1]).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(self.x, self.y), batch_size=6)


def test_bf16_weights_are_measured_in_float32_and_training_is_untouched():
    plain, measured = HalfMLP(), HalfMLP()
    fit(plain, 2, precision="bf16-true")
    sh = Sharpness(every_n_steps=1, tol=1e-10)
    fit(measured, 2, [sh], precision="bf16-true")
    assert all(p.dtype == torch.bfloat16 for p in measured.parameters())
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), measured.parameters()))  # bitwise
    W = {n: p.detach().double() for n, p in measured.named_parameters()}  # the bf16 values, exactly
    x = measured.x[:6].to(torch.bfloat16).double()  # what the read saw: the bf16 batch, upcast
    H = dense_hessian_of(W, mse_at(HalfMLP().net.double(), x, measured.y[:6].to(torch.bfloat16).double(), "net."))
    # the read runs in float32 on exactly these values: float32 rounding, 1e-5 relative is a wide margin
    assert rel(sh.last["hessian/sharpness"], torch.linalg.eigvalsh(H)[-1]) < 1e-5


class DictBatches(Regression):
    """Batches as dicts {"x": ..., "y": ...}."""

    def loss(self, batch):
        return torch.nn.functional.mse_loss(self.net(batch["x"]), batch["y"])

    def training_step(self, batch, batch_idx):
        return self.loss(batch)

    def train_dataloader(self):
        rows = [{"x": x, "y": y} for x, y in zip(self.x, self.y)]
        return torch.utils.data.DataLoader(rows, batch_size=6, shuffle=False)


SETUPS = {
    "plain": (Regression, {}),
    "batch norm": (lambda: Regression(batch_norm=True), {}),
    "accumulation": (Regression, {"accumulate_grad_batches": 2}),
    "clipping": (Regression, {"gradient_clip_val": 0.1}),
    "dict batches": (DictBatches, {}),
    "attention": (Attention, {}),
    "bf16": (HalfMLP, {"precision": "bf16-true"}),
}


@pytest.mark.parametrize("setup", list(SETUPS))
def test_training_is_bitwise_the_same_with_and_without_the_measuring_callbacks(setup):
    make, kw = SETUPS[setup]
    plain, measured = make(), make()
    fit(plain, 4, **kw)
    loss_fn = (lambda m, b: m.loss(b)) if isinstance(measured, Regression) else None  # Regression records batches
    fit(measured, 4, [HessianTrace(every_n_steps=2, num_matvecs=30, loss_fn=loss_fn),
                      Sharpness(every_n_steps=2, loss_fn=loss_fn)], **kw)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), measured.state_dict().values()))


def test_m_sam_on_batch_norm_falls_back_to_chunks_and_is_the_m_sam_step():
    """torch.func refuses batch norm's in-place statistics: m-SAM then runs chunk by chunk with autograd. The step
    equals a hand computation: each chunk's SAM gradient at its own ascent point (batch statistics of the chunk),
    weighted by |c|/B; the running statistics are those of the step's one forward."""
    import copy

    model, plain = Regression(batch_norm=True), Regression(batch_norm=True)
    ref = copy.deepcopy(model.net)  # train mode: batch statistics, like the callback's chunks
    fit(model, 1, [SAM(rho=RHO, m=3)])
    fit(plain, 1)
    x, y = model.x[:6], model.y[:6]
    params = dict(ref.named_parameters())
    buffers = {k: v.clone() for k, v in ref.named_buffers()}
    total = {k: torch.zeros_like(v) for k, v in params.items()}

    def loss(P, idx):
        return torch.nn.functional.mse_loss(
            torch.func.functional_call(ref, {**P, **{k: v.clone() for k, v in buffers.items()}}, (x[idx],)), y[idx])

    for idx in ([0, 1, 2], [3, 4, 5]):
        P = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
        g = torch.autograd.grad(loss(P, idx), list(P.values()))
        eps = sam_eps(g, RHO)
        Pp = {k: (v.detach() + e).requires_grad_() for (k, v), e in zip(P.items(), eps)}
        gp = torch.autograd.grad(loss(Pp, idx), list(Pp.values()))
        total = {k: t + 0.5 * gi for (k, t), gi in zip(total.items(), gp)}
    for k, p in model.net.named_parameters():
        assert rel(p, params[k].detach() - LR * total[k]) < 1e-10, k
    assert torch.equal(model.net[1].running_mean, plain.net[1].running_mean)


def test_one_sam_with_batch_norm_and_compiled_modules_are_refused():
    with pytest.raises(ValueError, match="SAM\\(m=1\\): 1-SAM runs a forward on one example"):
        fit(Regression(batch_norm=True), 1, [SAM(rho=RHO, m=1)])

    class Compiled(Regression):
        def __init__(self):
            super().__init__()
            self.net = torch.compile(self.net)

        def training_step(self, batch, batch_idx):
            return self.loss(batch)

    with pytest.raises(ValueError, match=r"HessianTrace: the submodule\(s\) \['net'\] are torch.compile'd"):
        fit(Compiled(), 1, [HessianTrace(every_n_steps=1)])


class TwoLoaders(Regression):
    """Two training loaders (Lightning combines them: the batch is a dict of the loaders' batches)."""

    def loss(self, batch):
        return sum(torch.nn.functional.mse_loss(self.net(x), y) for x, y in batch.values())

    def training_step(self, batch, batch_idx):
        return self.loss(batch)

    def train_dataloader(self):
        a = torch.utils.data.TensorDataset(self.x[:12], self.y[:12])
        b = torch.utils.data.TensorDataset(self.x[12:], self.y[12:])
        return {"a": torch.utils.data.DataLoader(a, batch_size=3), "b": torch.utils.data.DataLoader(b, batch_size=4)}


class LSTMRegression(L.LightningModule):
    """An LSTM over short sequences that carries its hidden state from batch to batch (a common user pattern)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lstm = torch.nn.LSTM(2, 3, batch_first=True).double()
        self.head = torch.nn.Linear(3, 1).double()
        g = torch.Generator().manual_seed(4)
        self.x, self.y = torch.randn(12, 5, 2, generator=g, dtype=F64), torch.randn(12, 1, generator=g, dtype=F64)
        self.state = None

    def loss(self, batch, state=None):
        out, state = self.lstm(batch[0], state)
        return torch.nn.functional.mse_loss(self.head(out[:, -1]), batch[1]), state

    def training_step(self, batch, batch_idx):
        loss, state = self.loss(batch, self.state)
        self.state = tuple(s.detach() for s in state)  # carried to the next batch
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(self.x, self.y), batch_size=4)


def test_several_loaders_are_measured_and_training_is_untouched():
    plain, measured = TwoLoaders(), TwoLoaders()
    fit(plain, 3)
    ht = HessianTrace(every_n_steps=1, num_matvecs=120)  # > 3 x 26 parameters: Hutch++ is exact
    fit(measured, 3, [ht])
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), measured.state_dict().values()))
    W0 = {k: v for k, v in params(TwoLoaders()).items()}
    net = TwoLoaders().net
    xa, ya, xb, yb = measured.x[:3], measured.y[:3], measured.x[12:16], measured.y[12:16]
    H = dense_hessian_of(W0, lambda P: mse_at(net, xa, ya, "net.")(P) + mse_at(net, xb, yb, "net.")(P))
    assert rel(ht.history["hessian/trace"][0][1], torch.trace(H)) < 1e-9  # the combined first batch, step 0


def test_lstm_with_a_carried_state_is_read_with_the_state_training_left():
    plain, measured = LSTMRegression(), LSTMRegression()
    W0 = params(measured)
    fit(plain, 3)
    sh = Sharpness(every_n_steps=1, tol=1e-10)  # through training_step: the carried state as training left it
    fit(measured, 3, [sh])
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), measured.state_dict().values()))
    assert all(torch.equal(a, b) for a, b in zip(plain.state, measured.state))  # the carried state is training's own
    # the first read, before any step: no carried state yet
    H = dense_hessian_of(W0, lambda P: torch.nn.functional.mse_loss(_lstm_out(measured, P, measured.x[:4]),
                                                                    measured.y[:4]))
    assert rel(sh.history["hessian/sharpness"][0][1], torch.linalg.eigvalsh(H)[-1]) < 1e-8


def _lstm_out(model, P, x):
    lstm = {k.removeprefix("lstm."): v for k, v in P.items() if k.startswith("lstm.")}
    head = {k.removeprefix("head."): v for k, v in P.items() if k.startswith("head.")}
    out, _ = torch.func.functional_call(model.lstm, lstm, (x,))
    return torch.func.functional_call(model.head, head, (out[:, -1],))


def test_label_noise_names_what_it_cannot_change():
    from dataclasses import dataclass

    @dataclass
    class Batch:
        x: torch.Tensor
        y: torch.Tensor

    from lightning_flat.engine import Replicas, StepContext

    ln = LabelNoise(1.0)
    ctx = StepContext(step=0, trainer=None, module=None, batch=Batch(torch.zeros(2), torch.zeros(2)),
                      replicas=Replicas(1, seed=None), in_place=True)
    with pytest.raises(TypeError, match="LabelNoise cannot change the targets of a Batch batch in place"):
        ln.step_targets(ctx)
