"""The sweep's chunking: how many samples one backward sweep takes, and that chunks of any size
give the same diagonals as one sweep over the whole batch (chain and graph engines)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from optbrain import Problem
from optbrain.curvature import EmpiricalFisherDiagonal, GGNDiagonal, budget
from optbrain.curvature.budget import BUDGET, FLOOR, LIVE, samples_per_sweep, split


def test_samples_per_sweep_keeps_the_columns_near_a_gradient_pass():
    # 10 columns of 576 per sample beside 2890 kept values and 4608 of patches, batch 1797:
    # 2·2890·1797 / (2890 + 4608 + 4·5760) samples
    assert samples_per_sweep(10, 576, 2890, 1797, 4608) == 2 * 2890 * 1797 // (
        2890 + 4608 + LIVE * 5760
    )
    n = samples_per_sweep(10, 576, 2890, 1797, 4608)
    held = n * (2890 + 4608 + LIVE * 5760)
    assert held <= 2 * 2890 * 1797


def test_samples_per_sweep_floor_and_cap():
    assert samples_per_sweep(1, 10, 10, 1) == FLOOR // (10 + LIVE * 10)  # tiny batches: the floor
    assert samples_per_sweep(1000, 1000, 10**9, 10**9) == BUDGET // 10**6  # the column cap
    assert samples_per_sweep(10**6, 10**6, 1, 1) == 1


def test_split():
    x, y = torch.arange(10), torch.arange(10) * 2
    parts = list(split(x, y, 4))
    assert [len(a) for a, _ in parts] == [4, 4, 2]
    assert torch.equal(torch.cat([b for _, b in parts]), y)
    assert len(list(split(x, y, None))) == 1


class _Res(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(5, 7), nn.Linear(7, 7), nn.Linear(7, 4)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.c(h + torch.tanh(self.b(h)))


@pytest.mark.parametrize("engine", ["chain", "graph"])
@pytest.mark.parametrize("estimator", [GGNDiagonal, EmpiricalFisherDiagonal])
def test_small_chunks_give_the_whole_batch_diagonal(monkeypatch, engine, estimator):
    torch.manual_seed(0)
    model = (
        _Res() if engine == "graph" else nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4))
    ).double()
    x, y = torch.randn(23, 5, dtype=torch.float64), torch.randint(0, 4, (23,))
    problem = Problem(model, nn.CrossEntropyLoss(), (x, y))
    assert estimator().path(problem).engine == engine
    whole = estimator().diagonal(problem)
    sizes = []
    real = budget.samples_per_sweep

    def tiny(*args, **kwargs):
        sizes.append(3)
        return 3

    target = "optbrain.curvature." + ("backprop" if engine == "chain" else "graph.sweep")
    monkeypatch.setattr(f"{target}.samples_per_sweep", tiny)
    chunked = estimator().diagonal(problem)
    assert sizes, "the engine did not ask for a chunk size"
    for k in whole:
        torch.testing.assert_close(chunked[k], whole[k], rtol=1e-12, atol=1e-14)
    assert real is budget.samples_per_sweep
