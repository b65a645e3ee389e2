"""A task whose ranks each load their own shard (``optbrain prune --shards given``)."""

from __future__ import annotations

import os

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from optbrain.train import train


def task():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 8, generator=g)
    y = x[:, :3].argmax(1)
    xt = torch.randn(48, 8, generator=g)
    yt = xt[:, :3].argmax(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    train(model, loader, nn.CrossEntropyLoss(), epochs=5, lr=1e-2, seed=0)
    r, size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    shard = TensorDataset(x[r::size], y[r::size])
    test = DataLoader(TensorDataset(xt, yt), batch_size=48)
    return model, nn.CrossEntropyLoss(), DataLoader(shard, batch_size=16), test
