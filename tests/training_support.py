"""Stand-ins for the training-loop tests (tests/unit/method, tests/unit/test_robustness.py, tests/integration): a tiny
dense model, an indexed dataset of (image, target) pairs, state helpers and a dataset that signals this process."""

import signal

import torch
from torch import nn

from ph_reg.method.data import TrainItem
from ph_reg.models import DenseOutput


class TinyDense(nn.Module):
    """A stand-in student: a linear map on pixel patches, returning a DenseOutput like DenseViT."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 4)
        self.registers = nn.Parameter(torch.zeros(2, 4))
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)

    def forward(self, x):
        patch = self.proj(x.permute(0, 2, 3, 1)) + self.registers.sum(0)
        return DenseOutput(patch, patch.mean((1, 2)))


class Pairs(torch.utils.data.Dataset):
    """Indexed by (epoch, i) like the real datasets."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, item):
        _, i = item
        return TrainItem(self.x[i], target=self.y[i])


def _dataset(n=6, poison=None):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, 2, 2, generator=gen)
    y = torch.randn(n, 2, 2, 4, generator=gen)
    if poison is not None:
        y[poison] = float("nan")
    return Pairs(x, y)


def _state(model):
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def _load(model, state):
    with torch.no_grad():
        for k, v in model.named_parameters():
            if k in state:
                v.copy_(state[k])


def _copies(seed: int = 0):
    """A factory of TinyDense models that all start from the same seeded initial weights."""
    torch.manual_seed(seed)
    init = _state(TinyDense())

    def fresh():
        model = TinyDense()
        _load(model, init)
        return model

    return fresh


class SignalAt(torch.utils.data.Dataset):
    """Sends ``signal`` to this process when item ``at = (epoch, nth item of the epoch)`` is read."""

    def __init__(self, base, at, signum=signal.SIGTERM):
        self.base, self.at, self.signum, self.seen = base, at, signum, {}

    def __len__(self):
        return len(self.base)

    def __getitem__(self, item):
        epoch, _ = item
        count = self.seen[epoch] = self.seen.get(epoch, 0) + 1
        if (epoch, count) == self.at:
            signal.raise_signal(self.signum)
        return self.base[item]
