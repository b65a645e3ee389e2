"""Tiny pruning tasks for the CLI and task tests: a 8-16-3 tanh MLP on seeded random data.

``task`` follows the contract of :mod:`optbrain.tasks`; the other functions return the wrong
things on purpose.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from optbrain.train import train

N_IN, N_HIDDEN, N_OUT = 8, 16, 3


def make_model() -> nn.Sequential:
    """The task's architecture, freshly initialised (load a pruned model into it)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(N_IN, N_HIDDEN), nn.Tanh(), nn.Linear(N_HIDDEN, N_OUT))


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, N_IN, generator=g)
    y = x[:, :N_OUT].argmax(dim=1)
    return x, y


def _parts():
    x, y = _data(96, 0)
    xt, yt = _data(48, 1)
    train_loader = DataLoader(
        TensorDataset(x, y), batch_size=32, shuffle=True, generator=torch.Generator()
    )
    test_loader = DataLoader(TensorDataset(xt, yt), batch_size=48)
    loss_fn = nn.CrossEntropyLoss()
    model = make_model()
    train(model, train_loader, loss_fn, epochs=5, lr=1e-2, seed=0)
    return model, loss_fn, train_loader, test_loader


def task():
    """The tuple form: (model, loss_fn, train_loader, test_loader)."""
    return _parts()


def task_dict():
    """The dict form, with a validation loader and (X, Y) tensors as the test data."""
    model, loss_fn, train_loader, test_loader = _parts()
    xv, yv = _data(40, 2)
    return {
        "model": model,
        "loss_fn": loss_fn,
        "train_loader": train_loader,
        "val_loader": DataLoader(TensorDataset(xv, yv), batch_size=20),
        "test_loader": _data(30, 3),
    }


def regression_task():
    """An MSE task (no accuracies) without test data."""
    x, _ = _data(64, 4)
    y = x[:, :N_OUT].sin()
    model = make_model()
    return {
        "model": model,
        "loss_fn": nn.MSELoss(),
        "train_loader": DataLoader(TensorDataset(x, y), batch_size=16),
    }


# ------------------------------------------------------------------------- wrong on purpose
def returns_string():
    return "model"


def returns_two():
    model, loss_fn, train_loader, _ = _parts()
    return model, loss_fn


def wrong_model():
    _, loss_fn, train_loader, test_loader = _parts()
    return "not a model", loss_fn, train_loader, test_loader


def misspelt_key():
    model, loss_fn, train_loader, test_loader = _parts()
    return {"model": model, "loss_fn": loss_fn, "train_loader": train_loader, "test_laoder": 1}


def iterator_loader():
    model, loss_fn, train_loader, test_loader = _parts()
    return model, loss_fn, iter(train_loader), test_loader


def unbatched_loader():
    model, loss_fn, _, test_loader = _parts()
    return model, loss_fn, [torch.zeros(4, N_IN)], test_loader


def vector_loss():
    model, _, train_loader, test_loader = _parts()
    return model, nn.CrossEntropyLoss(reduction="none"), train_loader, test_loader


def raises():
    raise RuntimeError("the data server is down")


def needs_argument(path):
    return _parts()


NOT_CALLABLE = 3


# ------------------------------------------------------------------------- NaN / inf in the data
def _poisoned(x, y, batch: int, where: str = "x", value: float = float("nan")):
    """(x, y) split into batches of 16 (no shuffling), with one value of ``batch`` poisoned."""
    x, y = x.clone(), y.clone().float() if where == "y" else y.clone()
    (x if where == "x" else y)[16 * batch] = value
    return DataLoader(TensorDataset(x, y), batch_size=16)


def nan_in_train_batch_3():
    model, loss_fn, _, test_loader = _parts()
    return model, loss_fn, _poisoned(*_data(96, 0), batch=3), test_loader


def nan_in_test_only():
    model, loss_fn, train_loader, _ = _parts()
    return model, loss_fn, train_loader, _poisoned(*_data(48, 1), batch=2)


def inf_in_val_targets():
    x, _ = _data(64, 4)
    y = x[:, :N_OUT].sin()
    model = make_model()
    xv, _ = _data(32, 5)
    return {
        "model": model,
        "loss_fn": nn.MSELoss(),
        "train_loader": DataLoader(TensorDataset(x, y), batch_size=16),
        "val_loader": _poisoned(xv, xv[:, :N_OUT].sin(), batch=1, where="y", value=float("inf")),
    }


class _TurnsBad:
    """A loader whose third pass (the first two are the scan and round 0) yields a NaN."""

    def __init__(self, x, y):
        self.x, self.y, self.passes = x, y, 0

    def __iter__(self):
        self.passes += 1
        for i in range(0, len(self.x), 16):
            x = self.x[i : i + 16].clone()
            if self.passes >= 4 and i == 32:
                x[0, 0] = float("nan")
            yield x, self.y[i : i + 16]


def nan_appears_later():
    model, loss_fn, train_loader, _ = _parts()
    return model, loss_fn, train_loader, _TurnsBad(*_data(48, 1))
