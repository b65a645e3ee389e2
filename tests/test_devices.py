"""Issue 16, item 5: the new large-scale code paths (streamed diagonals, SubsampledDiagonal,
block-diagonal and K-FAC OBS) run where the model is and agree with the CPU in float64."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from devices import DEVICES
from optbrain.curvature import (
    ESTIMATORS,
    BlockInverse,
    GGNDiagonal,
    KFACInverse,
    SubsampledDiagonal,
)
from optbrain.problem import Problem
from optbrain.pruners import OBSPruner
from optbrain.streaming import BatchStream

F64 = torch.float64
SEEDED = {"hutchinson": {"samples": 4, "seed": 1}, "mc_fisher": {"samples": 2, "seed": 1}}


def _setting():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 5, generator=g, dtype=F64), torch.randint(0, 3, (96,), generator=g)
    return model, x, y


def _problem(model, x, y, device) -> Problem:
    m = copy.deepcopy(model).to(device)
    stream = BatchStream(lambda: ((x[i : i + 32], y[i : i + 32]) for i in range(0, 96, 32)))
    return Problem(m, nn.CrossEntropyLoss(), stream)  # batches move to the model's device


def _close(got: dict, want: dict, device: str) -> None:
    for k in want:
        assert got[k].device.type == device
        torch.testing.assert_close(got[k].cpu(), want[k].cpu(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_streamed_diagonals_on_device(device, name):
    model, x, y = _setting()
    kwargs = SEEDED.get(name, {})
    got = ESTIMATORS[name](**kwargs).diagonal(_problem(model, x, y, device))
    want = ESTIMATORS[name](**kwargs).diagonal(_problem(model, x, y, "cpu"))
    _close(got, want, device)


@pytest.mark.parametrize("device", DEVICES)
def test_subsampled_diagonal_on_device(device):
    model, x, y = _setting()
    sub = SubsampledDiagonal(GGNDiagonal(), 0.5, first=64, min_batches=2)
    got, want = (
        sub.estimate(_problem(model, x, y, device)),
        sub.estimate(_problem(model, x, y, "cpu")),
    )
    _close(got.diagonal, want.diagonal, device)
    _close(got.stderr, want.stderr, device)
    assert (got.samples, got.converged) == (want.samples, want.converged)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("inverse", [BlockInverse(4, alpha=1e-3), KFACInverse(alpha=1e-3)])
def test_structured_obs_on_device(device, inverse):
    model, x, y = _setting()
    results = []
    for dev in (device, "cpu"):
        p = _problem(model, x, y, dev)
        mask, info = OBSPruner(inverse=inverse)(p, sparsity=0.5)
        weights = {k: v.detach() for k, v in p.model.state_dict().items()}
        assert all(v.device.type == dev for v in weights.values())
        results.append((mask, weights, info.predicted_increase))
    (m1, w1, i1), (m2, w2, i2) = results
    assert all(torch.equal(m1[k].cpu(), m2[k].cpu()) for k in m1.names)
    _close(w1, w2, device)
    assert i1 == pytest.approx(i2, rel=1e-9)
