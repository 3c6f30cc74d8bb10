import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

F64 = torch.float64


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


def randn(*shape, g, dtype=F64):
    return torch.randn(*shape, generator=g, dtype=dtype)


def rel(a, b):
    a = a.detach().to(F64) if isinstance(a, torch.Tensor) else torch.as_tensor(a, dtype=F64)
    b = b.detach().to(F64) if isinstance(b, torch.Tensor) else torch.as_tensor(b, dtype=F64)
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-300))
