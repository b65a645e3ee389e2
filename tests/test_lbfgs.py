"""Full-batch L-BFGS training: closed-form least squares, early stopping, masks, bad input."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from optbrain.errors import EmptyDataError, NonFiniteLossError
from optbrain.lbfgs import train_lbfgs
from optbrain.masking import Mask, attach
from optbrain.train import evaluate

D = torch.float64


def data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g, dtype=D)
    y = (
        x @ torch.tensor([[1.0], [-2.0], [0.5]], dtype=D)
        + 0.3
        + 0.1 * torch.randn(n, 1, generator=g, dtype=D)
    )
    return x, y


def test_reaches_the_least_squares_solution():
    x, y = data()
    torch.manual_seed(0)
    model = nn.Linear(3, 1).double()
    res = train_lbfgs(model, (x, y), nn.MSELoss(), max_iter=100)
    a = torch.cat([x, torch.ones(len(x), 1, dtype=D)], 1)
    sol = torch.linalg.lstsq(a, y).solution[:, 0]
    assert torch.allclose(model.weight[0], sol[:3], atol=1e-8)
    assert float(model.bias[0].detach()) == pytest.approx(float(sol[3]), abs=1e-8)
    assert res.epochs_run == 10 and res.best_epoch == 10 and len(res.train_loss) == 10


def test_batches_are_weighted_by_their_size():
    x, y = data()
    torch.manual_seed(0)
    one, two = nn.Linear(3, 1).double(), nn.Linear(3, 1).double()
    two.load_state_dict(one.state_dict())
    train_lbfgs(one, (x, y), nn.MSELoss(), max_iter=50)
    train_lbfgs(two, [(x[:10], y[:10]), (x[10:], y[10:])], nn.MSELoss(), max_iter=50)
    assert torch.allclose(one.weight, two.weight, atol=1e-8)


def test_early_stopping_keeps_the_best_validation_weights():
    x, y = data(12, seed=1)  # few samples, many parameters: validation loss turns up
    xv, yv = data(200, seed=2)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 30), nn.Tanh(), nn.Linear(30, 1)).double()
    res = train_lbfgs(
        model, (x, y), nn.MSELoss(), max_iter=400, val_data=(xv, yv), patience=3, check_every=2
    )
    assert res.epochs_run < 200 and res.best_epoch == res.epochs_run - 3
    assert evaluate(model, [(xv, yv)], nn.MSELoss())["loss"] == pytest.approx(min(res.val_loss))


def test_pruned_entries_stay_zero():
    x, y = data()
    model = nn.Linear(3, 1).double()
    keep = torch.tensor([[True, False, True]])
    attach(model, Mask({"weight": keep}))
    train_lbfgs(model, (x, y), nn.MSELoss(), max_iter=30)
    assert model.weight[0, 1] == 0.0 and model.weight[0, 0] != 0.0


def test_a_line_search_into_nan_keeps_the_last_good_weights(caplog):
    x, y = data()
    y = y + 20.0  # the optimum lies where the loss below is NaN

    def loss_fn(out, t):
        bad = torch.where(out.abs().max() > 5.0, torch.nan, 0.0)
        return ((out - t) ** 2).mean() + bad

    model = nn.Linear(3, 1).double()
    with torch.no_grad():
        model.weight.zero_(), model.bias.zero_()
    with caplog.at_level(logging.WARNING, logger="optbrain.lbfgs"):
        train_lbfgs(model, (x, y), loss_fn, max_iter=50)
    assert "last good weights" in caplog.text
    assert torch.isfinite(loss_fn(model(x), y))


def test_bad_input():
    x, y = data()
    model = nn.Linear(3, 1).double()
    with pytest.raises(ValueError, match="max_iter"):
        train_lbfgs(model, (x, y), nn.MSELoss(), max_iter=-1)
    with pytest.raises(ValueError, match="val_data"):
        train_lbfgs(model, (x, y), nn.MSELoss(), max_iter=5, patience=2)
    with pytest.raises(EmptyDataError):
        train_lbfgs(model, [], nn.MSELoss(), max_iter=5)
    with pytest.raises(NonFiniteLossError, match="before training"):
        train_lbfgs(model, (x, y * torch.nan), nn.MSELoss(), max_iter=5)
