"""The curvature callbacks on LightningModules as users write them, with no loss_fn: Lightning's own demo Transformer
(lazily built caches) and LSTM (a carried hidden state), batch norm read in train mode, manual optimization with a
loss_fn. Each read equals the dense Hessian of the same loss on the same batch (float64), and training is bitwise
the same with and without the callbacks."""

import copy

import lightning as L
import pytest
import torch
from lightning.pytorch.demos import Transformer
from lightning.pytorch.demos.lstm import SimpleLSTM
from torch.nn.attention import SDPBackend, sdpa_kernel

from conftest import rel
from helpers import flat_function
from lightning_flat.callbacks import SAM, CurvatureOptions, HessianTrace, Sharpness

F64 = torch.float64


def fit(model, steps, callbacks=()):
    tr = L.Trainer(max_steps=steps, logger=False, callbacks=list(callbacks), enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1)
    torch.manual_seed(7)  # dropout masks of training: the same stream with and without reads
    tr.fit(model)
    return tr


def loss_of_flat(module, loss_of_module):
    """``(f, flat)``: ``f(v) = loss_of_module(call)`` where ``call(*args)`` runs ``module`` with the parameters cut
    from ``v`` (``torch.func.functional_call``), at ``flat``, the module's parameters."""
    params = {n: p.detach() for n, p in module.named_parameters()}
    return flat_function(params, lambda P: loss_of_module(lambda *args: torch.func.functional_call(module, P, args)))


def dense_hessian(module, loss_of_module):
    """The dense Hessian of ``loss_of_module(call)`` in all parameters of ``module`` by ``torch.autograd.functional``
    (the Jacobian of the gradient, row by row; attention on its math kernel). Not ``torch.func.hessian``: its
    forward-over-reverse Hessian of batch norm in train mode is wrong in torch 2.13 (finite differences below)."""
    f, flat = loss_of_flat(module, loss_of_module)
    with sdpa_kernel(SDPBackend.MATH):
        return torch.autograd.functional.hessian(f, flat)


def first(cb, key):
    step, value = cb.history[key][0]
    assert step == 0
    return value


# ------------------------------------------------------------------------------------- Lightning's demo Transformer
class Tokens(L.LightningModule):
    """Lightning's demo Transformer (its source mask and positional table are built on the first forward) trained
    as the demo's LightningTransformer trains it, on a fixed stream of random tokens, float64."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.model = Transformer(vocab_size=7, ninp=4, nhead=1, nhid=8, nlayers=1, dropout=0.1).double()
        g = torch.Generator().manual_seed(1)
        self.tokens = torch.randint(0, 7, (12, 6), generator=g)

    def training_step(self, batch, batch_idx):
        inputs, target = batch
        output = self.model(inputs, target)
        return torch.nn.functional.nll_loss(output, target.view(-1))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        ds = torch.utils.data.TensorDataset(self.tokens[:, :-1], self.tokens[:, 1:])
        return torch.utils.data.DataLoader(ds, batch_size=4)


def test_lightning_demo_transformer_with_lazy_caches():
    plain, measured = Tokens(), Tokens()
    reference = copy.deepcopy(measured.model).eval()  # weights at step 0, no cache built yet
    p = sum(q.numel() for q in reference.parameters())
    fit(plain, 3)
    ht, sh = HessianTrace(every_n_steps=10, num_matvecs=3 * p + 3), Sharpness(every_n_steps=10, tol=1e-10)
    fit(measured, 3, [ht, sh])
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), measured.parameters()))
    x, y = measured.tokens[:4, :-1].contiguous(), measured.tokens[:4, 1:].contiguous()
    H = dense_hessian(reference, lambda model: torch.nn.functional.nll_loss(model(x, y), y.reshape(-1)))
    # Hutch++ with a sketch spanning all p coordinates: exact to float64 rounding of O(p) products
    assert rel(first(ht, "hessian/trace"), torch.trace(H)) < 1e-8
    # Lanczos to 1e-10 relative
    assert rel(first(sh, "hessian/sharpness"), torch.linalg.eigvalsh(H)[-1]) < 1e-8


# --------------------------------------------------------------------------------- Lightning's demo LSTM (stateful)
class Words(L.LightningModule):
    """Lightning's demo LSTM as its LightningLSTM trains it: the hidden state carried from batch to batch."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.model = SimpleLSTM(vocab_size=5, ninp=3, nhid=3, nlayers=1, dropout=0.0).double()
        self.hidden = None
        g = torch.Generator().manual_seed(2)
        self.tokens = torch.randint(0, 5, (12, 5), generator=g)

    def training_step(self, batch, batch_idx):
        inputs, target = batch
        if self.hidden is None:
            self.hidden = tuple(h.double() for h in self.model.init_hidden(inputs.size(0)))
        self.hidden = (self.hidden[0].detach(), self.hidden[1].detach())
        output, self.hidden = self.model(inputs, self.hidden)
        return torch.nn.functional.nll_loss(output, target.reshape(-1))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        ds = torch.utils.data.TensorDataset(self.tokens[:, :-1], self.tokens[:, 1:])
        return torch.utils.data.DataLoader(ds, batch_size=4)


def test_lightning_demo_lstm_with_a_carried_state():
    plain, measured = Words(), Words()
    reference = copy.deepcopy(measured.model)
    fit(plain, 3)
    sh = Sharpness(every_n_steps=1, tol=1e-10)  # read with the carried state as training left it
    fit(measured, 3, [sh])
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), measured.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(plain.hidden, measured.hidden))  # training's own state
    x, y = measured.tokens[:4, :-1].contiguous(), measured.tokens[:4, 1:].contiguous()
    h0 = tuple(h.double() for h in reference.init_hidden(4))
    H = dense_hessian(reference, lambda model: torch.nn.functional.nll_loss(model(x, h0)[0], y.reshape(-1)))
    assert rel(first(sh, "hessian/sharpness"), torch.linalg.eigvalsh(H)[-1]) < 1e-8


def test_msam_on_a_carried_state_is_refused_before_the_first_update():
    model = Words()
    W0 = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"SAM\(m=2\) could not evaluate Words's loss on chunks of 2"):
        fit(model, 2, [SAM(0.05, m=2)])
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), W0))


def test_nsam_leaves_the_carried_state_to_training():
    plain, sam = Words(), Words()
    fit(plain, 1)
    fit(sam, 1, [SAM(0.05)])
    # the ascent point's forward ran on training's state and was undone: the state training carries is its own
    assert all(torch.equal(a, b) for a, b in zip(plain.hidden, sam.hidden))


# ------------------------------------------------------------------------------------------ batch norm in train mode
class Normed(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Tanh(),
                                       torch.nn.Linear(4, 1)).double()
        g = torch.Generator().manual_seed(3)
        self.x, self.y = torch.randn(16, 3, generator=g, dtype=F64), torch.randn(16, 1, generator=g, dtype=F64)

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.mse_loss(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(self.x, self.y), batch_size=8)


def test_batch_norm_read_in_train_mode():
    plain, measured = Normed(), Normed()
    reference = copy.deepcopy(measured.net)
    fit(plain, 3)
    sh = Sharpness(every_n_steps=1, tol=1e-10, options=CurvatureOptions(eval_mode=False))
    fit(measured, 3, [sh])
    # training untouched: weights and running statistics (the reads' forwards updated them, and were undone)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), measured.state_dict().values()))
    # the read's loss normalizes by the batch's statistics: the reference does the same, without running statistics
    reference[1].track_running_stats, reference[1].running_mean, reference[1].running_var = False, None, None
    x, y = measured.x[:8], measured.y[:8]
    loss = lambda net: torch.nn.functional.mse_loss(net(x), y)  # noqa: E731
    H = dense_hessian(reference, loss)
    # the reference itself, against central differences of the gradient (step 1e-6: truncation ~1e-12 times third
    # derivatives of O(10), rounding ~1e-16 / 1e-6 = 1e-10 per entry)
    f, flat = loss_of_flat(reference, loss)
    grad = lambda v: torch.autograd.grad(f(v.requires_grad_(True)), v)[0]  # noqa: E731
    fd = torch.stack([(grad(flat + 1e-6 * e) - grad(flat - 1e-6 * e)) / 2e-6 for e in torch.eye(flat.numel(),
                                                                                                 dtype=F64)], 1)
    assert float((fd - H).abs().max()) < 1e-7 * float(H.abs().max())
    assert rel(first(sh, "hessian/sharpness"), torch.linalg.eigvalsh(H)[-1]) < 1e-8


# ------------------------------------------------------------------------------------- manual optimization, loss_fn
class Manual(Normed):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        loss = torch.nn.functional.mse_loss(self.net(batch[0]), batch[1])
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()


def test_manual_optimization_with_a_loss_fn():
    loss_fn = lambda m, b: torch.nn.functional.mse_loss(m.net(b[0]), b[1])  # noqa: E731
    plain, measured = Manual(), Manual()
    reference = copy.deepcopy(measured.net).eval()
    fit(plain, 3)
    sh = Sharpness(every_n_steps=1, tol=1e-10, loss_fn=loss_fn)
    fit(measured, 3, [sh])
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), measured.state_dict().values()))
    x, y = measured.x[:8], measured.y[:8]
    H = dense_hessian(reference, lambda net: torch.nn.functional.mse_loss(net(x), y))
    assert rel(first(sh, "hessian/sharpness"), torch.linalg.eigvalsh(H)[-1]) < 1e-8


# ------------------------------------------------------------------------------------------ a loss that is not one
class NoLoss(Normed):
    def training_step(self, batch, batch_idx):
        self.log("loss", torch.nn.functional.mse_loss(self.net(batch[0]), batch[1]))  # and returns nothing


@pytest.mark.parametrize("cls", [HessianTrace, Sharpness])
def test_a_training_step_without_a_loss_is_refused_before_the_first_update(cls):
    model = NoLoss()
    W0 = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"NoLoss.training_step returned None, which has no loss to differentiate: "
                                         r"pass loss_fn="):
        fit(model, 2, [cls(every_n_steps=1)])
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), W0))
