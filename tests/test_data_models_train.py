"""Digits data, reference models, the built-in trainer and the demo's statistics."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.data import DataLoader, TensorDataset

from optbrain.curvature_report import spearman
from optbrain.data import DigitsData, load_digits_split, loaders
from optbrain.models import LeCunTanh, digits_cnn, digits_mlp
from optbrain.train import TrainResult, evaluate, train


@pytest.fixture(scope="module")
def digits() -> DigitsData:
    return load_digits_split()


# ------------------------------------------------------------------------------ data
def test_split_sizes_ranges_and_types(digits):
    assert digits.x_train.shape == (1257, 64) and digits.x_test.shape == (540, 64)
    assert digits.y_train.shape == (1257,) and digits.y_test.shape == (540,)
    assert digits.x_train.dtype == torch.float32 and digits.y_train.dtype == torch.int64
    assert digits.n_classes == 10 and digits.n_features == 64
    x = torch.cat([digits.x_train, digits.x_test])
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert set(digits.y_train.tolist()) == set(range(10))


def test_split_is_stratified(digits):
    train_frac = torch.bincount(digits.y_train, minlength=10) / len(digits.y_train)
    test_frac = torch.bincount(digits.y_test, minlength=10) / len(digits.y_test)
    assert torch.allclose(train_frac, test_frac, atol=0.01)


def test_split_is_deterministic_and_seed_dependent(digits):
    again = load_digits_split()
    assert torch.equal(again.x_train, digits.x_train) and torch.equal(again.y_test, digits.y_test)
    other = load_digits_split(seed=1)
    assert not torch.equal(other.y_train, digits.y_train)


def test_split_options():
    d = load_digits_split(test_size=0.5, scale=False, flat=False, dtype=torch.float64)
    assert d.x_train.shape[1:] == (1, 8, 8) and d.x_train.dtype == torch.float64
    assert len(d.y_train) + len(d.y_test) == 1797 and abs(len(d.y_test) - 898.5) <= 1
    assert float(d.x_train.max()) == 16.0
    assert d.n_features == 64
    with pytest.raises(ValueError, match="test_size"):
        load_digits_split(test_size=1.5)


def test_loaders(digits):
    tr, te = loaders(digits, batch_size=100, shuffle=True, seed=3)
    first = next(iter(tr))[1]
    assert torch.equal(first, next(iter(loaders(digits, 100, True, 3)[0]))[1])
    assert not torch.equal(first, digits.y_train[:100])
    assert torch.equal(torch.cat([y for _, y in te]), digits.y_test)
    assert sum(len(y) for _, y in tr) == 1257
    unshuffled, _ = loaders(digits, batch_size=100, shuffle=False)
    assert torch.equal(next(iter(unshuffled))[1], digits.y_train[:100])
    with pytest.raises(ValueError, match="batch_size"):
        loaders(digits, batch_size=0)


# ------------------------------------------------------------------------------ models
def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_digits_mlp_structure():
    m = digits_mlp()
    assert _count(m) == 64 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10 == 50_610
    assert [type(layer) for layer in m] == [nn.Linear, nn.Tanh, nn.Linear, nn.Tanh, nn.Linear]
    assert [n for n, _ in m.named_parameters()][:2] == ["0.weight", "0.bias"]
    assert m(torch.zeros(5, 64)).shape == (5, 10)
    small = digits_mlp((20,), activation="sigmoid")
    assert [type(layer) for layer in small] == [nn.Linear, nn.Sigmoid, nn.Linear]
    assert _count(small) == 64 * 20 + 20 + 20 * 10 + 10
    assert isinstance(digits_mlp(activation="lecun_tanh")[1], LeCunTanh)
    with pytest.raises(ValueError, match="activation"):
        digits_mlp(activation="swish")


def test_digits_cnn_structure():
    m = digits_cnn()
    assert _count(m) == (8 * 9 + 8) + (16 * 8 * 9 + 16) + (16 * 2 * 2 * 10 + 10) == 1898
    assert m(torch.zeros(3, 1, 8, 8)).shape == (3, 10)
    assert any(isinstance(layer, LeCunTanh) for layer in m)


@pytest.mark.parametrize("make", [digits_mlp, digits_cnn])
def test_model_seed_is_reproducible_and_leaves_global_rng_alone(make):
    state = torch.random.get_rng_state()
    a, b = make(seed=7), make(seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    c = make(seed=8)
    assert not torch.equal(next(a.parameters()), next(c.parameters()))


def test_lecun_tanh_formula():
    x = torch.linspace(-5, 5, 101, dtype=torch.float64)
    f = LeCunTanh()
    assert torch.allclose(f(x), 1.7159 * torch.tanh(2 * x / 3), rtol=0, atol=1e-15)
    one = torch.tensor([1.0, -1.0], dtype=torch.float64)
    assert torch.allclose(f(one), one, atol=2e-4)  # LeCun's design point f(±1) ≈ ±1


# ------------------------------------------------------------------------------ training
def _fit(digits, seed=0, epochs=8, hidden=(300, 100), **kw):
    tr, te = loaders(digits, batch_size=64, shuffle=True, seed=seed)
    model = digits_mlp(hidden, seed=seed)
    res = train(model, tr, nn.CrossEntropyLoss(), epochs=epochs, seed=seed, **kw)
    return model, res, te


def test_training_reaches_high_accuracy(digits):
    state = torch.random.get_rng_state()
    model, res, te = _fit(digits, lr=2e-3)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert isinstance(res, TrainResult) and res.epochs_run == 8 and res.best_epoch == 8
    assert len(res.train_loss) == 8 and res.val_loss == []
    assert res.train_loss[-1] < 0.2 * res.train_loss[0]
    ev = evaluate(model, te, nn.CrossEntropyLoss())
    assert ev["accuracy"] > 0.9, ev


def test_training_is_deterministic_under_a_seed(digits):
    def fit(seed):
        # dropout makes the global RNG matter: train() must seed a private copy of it
        tr, _ = loaders(digits, batch_size=64, shuffle=True, seed=0)
        model = nn.Sequential(nn.Linear(64, 32), nn.Dropout(0.3), nn.Tanh(), nn.Linear(32, 10))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(123)
            model.apply(lambda m: m.reset_parameters() if isinstance(m, nn.Linear) else None)
        res = train(model, tr, nn.CrossEntropyLoss(), epochs=2, seed=seed)
        return model, res

    (m1, r1), (m2, r2), (_, r3) = fit(0), fit(0), fit(1)
    assert r1.train_loss == r2.train_loss and r1.train_loss != r3.train_loss
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)


def test_sgd_with_momentum_trains(digits):
    model, res, te = _fit(digits, epochs=3, hidden=(32,), optimizer="sgd", lr=0.1, momentum=0.9)
    assert res.train_loss[-1] < res.train_loss[0]
    assert evaluate(model, te, nn.CrossEntropyLoss())["accuracy"] > 0.8


def test_early_stopping_restores_best_weights():
    # a tiny training set that is easy to overfit; the validation set has the opposite labels
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=g)
    y = (x[:, 0] > 0).long()
    tr = DataLoader(TensorDataset(x, y), batch_size=8)
    val = DataLoader(TensorDataset(x, 1 - y), batch_size=32)
    model = digits_mlp((8,), n_in=4, n_out=2, seed=0)
    snapshots = []
    loss = nn.CrossEntropyLoss()
    res = train(
        model, tr, loss, epochs=50, lr=1e-2, val_loader=val, patience=3, seed=0,
        progress=lambda done, total: snapshots.append(
            [p.detach().clone() for p in model.parameters()]
        ),
    )  # fmt: skip
    assert res.epochs_run < 50 and res.epochs_run == res.best_epoch + 3
    assert len(res.val_loss) == res.epochs_run
    assert res.val_loss[res.best_epoch - 1] == min(res.val_loss)
    for p, q in zip(model.parameters(), snapshots[res.best_epoch - 1]):
        assert torch.equal(p, q)
    assert evaluate(model, val, loss)["loss"] == pytest.approx(min(res.val_loss))


def test_training_with_parametrized_mask_keeps_pruned_weights_zero(digits):
    class Mask(nn.Module):
        def __init__(self, mask):
            super().__init__()
            self.register_buffer("mask", mask)

        def forward(self, w):
            return w * self.mask

    tr, te = loaders(digits, batch_size=64, seed=0)
    model = digits_mlp((32,), seed=0)
    mask = torch.rand(model[0].weight.shape, generator=torch.Generator().manual_seed(0)) > 0.5
    parametrize.register_parametrization(model[0], "weight", Mask(mask.float()))
    res = train(model, tr, nn.CrossEntropyLoss(), epochs=5, lr=1e-2, weight_decay=1e-3, seed=0)
    assert res.train_loss[-1] < res.train_loss[0]
    assert torch.all(model[0].weight[~mask] == 0)
    assert evaluate(model, te, nn.CrossEntropyLoss())["accuracy"] > 0.8


def test_evaluate_regression_and_modes():
    model = nn.Sequential(nn.Linear(3, 1), nn.Dropout(0.5))
    model.train()
    x, y = torch.ones(10, 3), torch.zeros(10, 1)
    res = evaluate(model, [(x[:4], y[:4]), (x[4:], y[4:])], nn.MSELoss())
    assert set(res) == {"loss"} and model.training
    assert res["loss"] == pytest.approx(float(model[0](x).detach().pow(2).mean()))
    summed = evaluate(model, [(x[:4], y[:4]), (x[4:], y[4:])], nn.MSELoss(reduction="sum"))
    assert summed["loss"] == pytest.approx(res["loss"])


def test_evaluate_accuracy_uses_the_class_dimension():
    class Fixed(nn.Module):
        def forward(self, x):
            return x

    # outputs N x C x T as CrossEntropyLoss expects them; targets N x T
    logits = torch.zeros(2, 3, 4)
    logits[:, 2, :] = 1.0
    y = torch.full((2, 4), 2, dtype=torch.long)
    y[0, 0] = 0
    res = evaluate(Fixed(), [(logits, y)], nn.CrossEntropyLoss())
    assert res["accuracy"] == pytest.approx(7 / 8)
    binary = evaluate(
        Fixed(), [(torch.tensor([[2.0], [-1.0], [3.0]]), torch.tensor([1, 0, 0]))],
        lambda out, t: (out.squeeze(1) * 0).sum(),
    )  # fmt: skip
    assert binary["accuracy"] == pytest.approx(2 / 3)


def test_train_rejects_bad_arguments(digits):
    tr, te = loaders(digits, batch_size=64)
    m = digits_mlp((4,))
    loss = nn.CrossEntropyLoss()
    with pytest.raises(ValueError, match="optimizer"):
        train(m, tr, loss, epochs=1, optimizer="lbfgs")
    with pytest.raises(ValueError, match="val_loader"):
        train(m, tr, loss, epochs=1, patience=2)
    with pytest.raises(ValueError, match="epochs"):
        train(m, tr, loss, epochs=-1)
    with pytest.raises(ValueError, match="empty|no samples"):
        train(m, [], loss, epochs=1)


# ------------------------------------------------------------------------------ spearman
def test_spearman_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, generator=g)
    b = a + 0.5 * torch.randn(500, generator=g)
    assert spearman(a, b) == pytest.approx(stats.spearmanr(a.numpy(), b.numpy())[0], abs=1e-12)
    ties_a = torch.tensor([1.0, 1.0, 2.0, 3.0, 3.0, 3.0, 0.0])
    ties_b = torch.tensor([0.5, 2.0, 1.0, 3.0, 4.0, 3.0, 0.0])
    assert spearman(ties_a, ties_b) == pytest.approx(
        stats.spearmanr(ties_a.numpy(), ties_b.numpy())[0], abs=1e-12
    )


def test_spearman_edge_cases():
    x = torch.arange(10.0)
    assert spearman(x, x**3) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)
    assert math.isnan(spearman(x, torch.ones(10)))
    with pytest.raises(ValueError, match="equally long"):
        spearman(x, x[:5])
