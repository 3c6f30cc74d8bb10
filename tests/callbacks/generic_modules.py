"""Plain user LightningModules that know nothing of lightning_flat (used by the generic-path tests and the DDP run)."""

import lightning as L
import torch


class TanhMLP(L.LightningModule):
    """A float64 tanh MLP regression on a fixed synthetic dataset; optional dropout."""

    def __init__(self, width: int = 8, dropout: float = 0.0, lr: float = 0.05, n: int = 80, batch_size: int = 16):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        torch.manual_seed(1)
        layers = [torch.nn.Linear(4, width), torch.nn.Tanh()]
        if dropout:
            layers.append(torch.nn.Dropout(dropout))
        layers += [torch.nn.Linear(width, width), torch.nn.Tanh(), torch.nn.Linear(width, 1)]
        self.net = torch.nn.Sequential(*layers).double()
        self.x = torch.randn(n, 4, generator=g, dtype=torch.float64)
        self.y = torch.sin(self.x.sum(1, keepdim=True)) + 0.1 * torch.randn(n, 1, generator=g, dtype=torch.float64)
        self.lr, self.batch_size = lr, batch_size

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("my/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.5)

    def train_dataloader(self):
        ds = torch.utils.data.TensorDataset(self.x, self.y)
        sampler = None
        if self.trainer.world_size > 1:  # rank r reads rows r, r + W, ...: the ranks' batches tile the single batch
            sampler = torch.utils.data.distributed.DistributedSampler(
                ds, num_replicas=self.trainer.world_size, rank=self.trainer.global_rank, shuffle=False)
        return torch.utils.data.DataLoader(ds, batch_size=self.batch_size, shuffle=False, sampler=sampler)


def dense_hessian(module: TanhMLP, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The dense Hessian of the batch loss in eval mode, by torch.func.hessian over the flattened parameters."""
    names = [n for n, _ in module.named_parameters()]
    params = [p.detach() for p in module.parameters()]
    shapes = [p.shape for p in params]
    flat = torch.cat([p.reshape(-1) for p in params])
    net = module.net
    was = net.training
    net.eval()

    def loss(v):
        out, k = {}, 0
        for name, shape in zip(names, shapes):
            size = shape.numel()
            out[name.removeprefix("net.")] = v[k:k + size].reshape(shape)
            k += size
        return torch.nn.functional.mse_loss(torch.func.functional_call(net, out, (x,)), y)

    H = torch.func.hessian(loss)(flat)
    net.train(was)
    return H
