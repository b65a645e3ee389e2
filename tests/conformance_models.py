"""The model kinds the pruner conformance suite runs every named method on.

Each kind is one :class:`Kind` entry of :data:`KINDS`: a seeded model, the shape of one input, and
the methods that cannot run on it with the named error they must raise. A new kind (a residual
graph, a recurrent model) is one more entry, plus a task function of the same name below for
``optbrain prune --task tests/conformance_models.py:NAME``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

CLASSES = 3
N = 48


def _seeded(build: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


@dataclass(frozen=True)
class Kind:
    """A model kind: ``build()`` a fresh seeded model taking inputs of shape ``(N, *inputs)``;
    ``cannot`` maps a method name to the error type it must raise on this kind."""

    name: str
    build: Callable[[], nn.Module]
    inputs: tuple[int, ...]
    cannot: dict[str, type[Exception]] = field(default_factory=dict)

    def model(self, seed: int = 0) -> nn.Module:
        return _seeded(self.build, seed)

    def data(self, seed: int = 0, n: int = N) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, *self.inputs, generator=g)
        y = (x.reshape(n, -1)[:, :CLASSES] * torch.tensor([1.0, -1.0, 0.5])).argmax(1)
        return x, y

    def loader(self, seed: int = 0) -> DataLoader:
        """A shuffling loader with a generator of its own (the case resume must get right)."""
        x, y = self.data(seed)
        gen = torch.Generator().manual_seed(seed)
        return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True, generator=gen)


class Residual(nn.Module):
    """A skip connection around a tanh block: not a chain, so the cell readers refuse it."""

    def __init__(self):
        super().__init__()
        self.inp, self.block = nn.Linear(6, 8), nn.Sequential(nn.Tanh(), nn.Linear(8, 8))
        self.out = nn.Linear(8, CLASSES)

    def forward(self, x):
        h = self.inp(x)
        return self.out(h + self.block(h))


KINDS = [
    Kind("chain", lambda: nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, CLASSES)), (6,)),
    Kind(
        "batchnorm",
        lambda: nn.Sequential(
            nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, CLASSES)
        ).eval(),
        (6,),
    ),
    Kind(
        "conv",
        lambda: nn.Sequential(
            nn.Conv2d(2, 3, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(3 * 2 * 2, CLASSES),
        ),
        (2, 6, 6),
    ),
    Kind(
        "residual",
        Residual,
        (6,),
        cannot={},  # cells and Unit-OBS follow the residual group through the graph reader
    ),
]
BY_NAME = {k.name: k for k in KINDS}


def _task(name: str):
    kind = BY_NAME[name]
    return {
        "model": kind.model(),
        "loss_fn": nn.CrossEntropyLoss(),
        "train_loader": kind.loader(),
        "val_loader": kind.data(seed=2, n=24),  # validation-set OBD needs one
        "test_loader": kind.data(seed=1, n=24),
    }


def chain():
    return _task("chain")


def batchnorm():
    return _task("batchnorm")


def conv():
    return _task("conv")


def residual():
    return _task("residual")
