"""Data of the Hassibi–Stork reproductions: XOR, MONK-1/2/3, the 5-d Gaussian mixture."""

from __future__ import annotations

import math

import pytest
import torch

from optbrain.data import load_gaussian_mixture, load_monk, xor_data, xor_solved
from optbrain.data.gaussian_mixture import (
    COMPONENT_CLASS,
    MEANS,
    VARIANCES,
    bayes_posterior,
    sample_mixture,
)
from optbrain.data.monk import ATTRIBUTE_SIZES, monk_attributes, monk_labels, monk_one_hot


# ------------------------------------------------------------------------------ XOR
def test_xor_patterns_and_targets():
    x, y = xor_data()
    assert x.shape == (4, 2) and y.shape == (4, 1) and x.dtype == torch.float32
    assert [tuple(r) for r in x.tolist()] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    expected = torch.logical_xor(x[:, 0] > 0, x[:, 1] > 0)
    assert torch.equal(y[:, 0] > 0.5, expected)
    assert sorted(y.flatten().tolist()) == pytest.approx([0.1, 0.1, 0.9, 0.9])
    x2, y2 = xor_data(low=0.0, high=1.0, dtype=torch.float64)
    assert y2.dtype == torch.float64 and y2.flatten().tolist() == [0, 1, 1, 0]
    with pytest.raises(ValueError, match="low < high"):
        xor_data(low=1.0, high=0.0)


def test_xor_solved():
    _, y = xor_data()
    assert xor_solved(y, y) and xor_solved(y, y, tolerance=1e-9)
    near = torch.tensor([[0.45], [0.55], [0.9], [0.1]])
    assert xor_solved(near, y) and not xor_solved(near, y, tolerance=0.1)
    wrong = torch.tensor([[0.1], [0.9], [0.4], [0.1]])  # pattern 10 on the wrong side
    assert not xor_solved(wrong, y)
    with pytest.raises(ValueError, match="one each"):
        xor_solved(torch.zeros(3), y)


# ------------------------------------------------------------------------------ MONK
def _brute_force_rule(problem: int, a: tuple[int, ...]) -> bool:
    a1, a2, a3, a4, a5, a6 = a
    if problem == 1:
        return a1 == a2 or a5 == 1
    if problem == 2:
        return sum(v == 1 for v in a) == 2
    return (a5 == 3 and a4 == 1) or (a5 != 4 and a2 != 3)


def test_monk_space_and_positive_counts():
    attrs = monk_attributes()
    assert attrs.shape == (432, 6) == (math.prod(ATTRIBUTE_SIZES), 6)
    assert len({tuple(r) for r in attrs.tolist()}) == 432
    for j, k in enumerate(ATTRIBUTE_SIZES):
        assert set(attrs[:, j].tolist()) == set(range(1, k + 1))
    counts = {p: int(monk_labels(p, attrs).sum()) for p in (1, 2, 3)}
    assert counts == {1: 216, 2: 142, 3: 228}
    for p in (1, 2, 3):  # the vectorised rules equal a literal reading, row by row
        labels = monk_labels(p, attrs).tolist()
        assert labels == [_brute_force_rule(p, tuple(r)) for r in attrs.tolist()]


def test_monk_one_hot_is_valid_and_invertible():
    attrs = monk_attributes()
    x = monk_one_hot(attrs)
    assert x.shape == (432, 17) and set(x.unique().tolist()) == {0.0, 1.0}
    start = 0
    for j, k in enumerate(ATTRIBUTE_SIZES):
        block = x[:, start : start + k]
        assert torch.equal(block.sum(1), torch.ones(432))  # exactly one hot per attribute
        assert torch.equal(block.argmax(1) + 1, attrs[:, j])  # and it is the right one
        start += k
    assert len({tuple(r) for r in x.tolist()}) == 432
    with pytest.raises(ValueError, match="a5 must take values 1..4"):
        monk_one_hot(torch.tensor([[1, 1, 1, 1, 5, 1]]))


@pytest.mark.parametrize(("problem", "n_train", "n_flip"), [(1, 124, 0), (2, 169, 0), (3, 122, 6)])
def test_load_monk_subsets_and_noise(problem, n_train, n_flip):
    d = load_monk(problem, seed=3)
    assert d.x_train.shape == (n_train, 17) and d.y_train.shape == (n_train, 1)
    assert d.x_test.shape == (432, 17) and d.y_test.shape == (432, 1)
    assert len(set(d.train_index.tolist())) == n_train  # drawn without replacement
    assert torch.equal(d.x_train, d.x_test[d.train_index])
    truth = d.y_test[d.train_index]
    differs = (d.y_train != truth).flatten().nonzero().flatten()
    assert torch.equal(differs, d.flipped) and len(d.flipped) == n_flip
    assert int(d.y_test.sum()) == {1: 216, 2: 142, 3: 228}[problem]
    again = load_monk(problem, seed=3)
    assert torch.equal(again.train_index, d.train_index) and torch.equal(again.y_train, d.y_train)
    assert not torch.equal(load_monk(problem, seed=4).train_index, d.train_index)


def test_load_monk_options_and_errors():
    d = load_monk(1, n_train=432, noise=0.5, dtype=torch.float64)
    assert d.x_train.dtype == torch.float64 and len(d.flipped) == 216
    with pytest.raises(ValueError, match="1, 2 or 3"):
        load_monk(4)
    with pytest.raises(ValueError, match="n_train"):
        load_monk(1, n_train=0)
    with pytest.raises(ValueError, match="noise"):
        load_monk(3, noise=1.5)


# ------------------------------------------------------------------------------ mixture
def test_mixture_sizes_determinism_and_classes():
    d = load_gaussian_mixture(seed=0)
    assert d.x_train.shape == (1000, 5) and d.y_train.shape == (1000, 1)
    assert d.x_test.shape == (1000, 5) and d.x_val.shape == (0, 5)
    assert set(d.y_train.flatten().tolist()) == {0.0, 1.0}
    e = load_gaussian_mixture(seed=0, n_val=300)
    assert torch.equal(e.x_train, d.x_train) and torch.equal(e.x_test, d.x_test)
    assert e.x_val.shape == (300, 5)
    assert not torch.equal(load_gaussian_mixture(seed=1).x_train, d.x_train)
    with pytest.raises(ValueError, match="n_test"):
        load_gaussian_mixture(n_test=-1)


def test_mixture_component_statistics():
    n = 80_000
    x, y, comp = sample_mixture(n, torch.Generator().manual_seed(0), torch.float64)
    # classes and components equiprobable (binomial sd of a fraction: sqrt(p(1-p)/n))
    assert abs(float(y.mean()) - 0.5) < 4 * math.sqrt(0.25 / n)
    frac = torch.bincount(comp, minlength=4).double() / n
    assert torch.all((frac - 0.25).abs() < 4 * math.sqrt(0.25 * 0.75 / n))
    assert torch.equal(y.flatten().long(), COMPONENT_CLASS[comp])
    for c in range(4):
        xc = x[comp == c]
        m = xc.shape[0]
        se_mean = (VARIANCES[c] / m).sqrt()
        assert torch.all((xc.mean(0) - MEANS[c]).abs() < 4.5 * se_mean), c
        se_var = VARIANCES[c] * math.sqrt(2.0 / (m - 1))  # sd of a Gaussian sample variance
        assert torch.all((xc.var(0) - VARIANCES[c]).abs() < 4.5 * se_var), c
        corr = torch.corrcoef(xc.T) - torch.eye(5, dtype=torch.float64)
        assert float(corr.abs().max()) < 4.5 / math.sqrt(m)  # diagonal covariances


def test_bayes_posterior_matches_generative_frequencies():
    x, y, _ = sample_mixture(40_000, torch.Generator().manual_seed(1), torch.float64)
    p = bayes_posterior(x)
    assert p.shape == (40_000, 1) and float(p.min()) >= 0 and float(p.max()) <= 1
    # calibration: within bins of the posterior, the class-A frequency equals the posterior
    for lo in (0.1, 0.3, 0.5, 0.7):
        sel = (p >= lo) & (p < lo + 0.1)
        assert abs(float(y[sel].mean()) - float(p[sel].mean())) < 0.03
    # the Bayes rule beats any single coordinate threshold
    bayes_err = float(((p > 0.5).double() != y).double().mean())
    assert 0.05 < bayes_err < 0.45
    assert bayes_err < min(
        float(((x[:, [j]] > 0.5).double() != y).double().mean()) for j in range(5)
    )
