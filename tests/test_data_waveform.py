"""Breiman's waveform generator: shapes, balance, class means, pure-noise inputs, seeding."""

from __future__ import annotations

import math

import pytest
import torch

from optbrain.data import load_waveform_split, make_waveform
from optbrain.data.waveform import CLASS_WAVES, INFORMATIVE, N_BASE, base_waves, class_means

stats = pytest.importorskip("scipy.stats")

N = 30_000


@pytest.fixture(scope="module")
def big():
    return make_waveform(N, seed=123, dtype=torch.float64)


def test_base_waves_are_breimans_triangles():
    # the table hard-coded in skmultiflow's WaveformGenerator / the CART book (peaks 7, 15, 11)
    tri = [0, 1, 2, 3, 4, 5, 6, 5, 4, 3, 2, 1, 0]
    expected = torch.zeros(3, 21, dtype=torch.float64)
    for k, peak in enumerate((7, 15, 11)):
        expected[k, peak - 7 : peak + 6] = torch.tensor(tri, dtype=torch.float64)
    assert torch.equal(base_waves(), expected)
    assert CLASS_WAVES == ((0, 1), (0, 2), (1, 2))
    # positions 1 and 21 are zero in every wave: only 2..20 are informative
    assert torch.equal(
        base_waves().abs().sum(0) > 0, torch.tensor([i in INFORMATIVE for i in range(21)])
    )


def test_shapes_dtypes_and_noise_features():
    x, y = make_waveform(50, seed=0)
    assert x.shape == (50, 40) and x.dtype == torch.float32
    assert y.shape == (50,) and y.dtype == torch.int64 and set(y.tolist()) <= {0, 1, 2}
    x21, _ = make_waveform(7, noise_features=0, seed=0, dtype=torch.float64)
    assert x21.shape == (7, 21) and x21.dtype == torch.float64
    d = load_waveform_split(30, 20, 10, seed=4)
    assert (d.x_train.shape, d.x_val.shape, d.x_test.shape) == ((30, 40), (20, 40), (10, 40))
    assert d.n_features == 40 and d.noise == tuple(range(21, 40)) and d.n_classes == 3


def test_seeded_and_global_rng_untouched():
    state = torch.random.get_rng_state()
    a = make_waveform(100, seed=5)
    b = make_waveform(100, seed=5)
    c = make_waveform(100, seed=6)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert torch.equal(torch.random.get_rng_state(), state)
    d = load_waveform_split(50, 50, 50, seed=1)
    assert not torch.equal(d.x_train, d.x_val)  # independent draws, not copies
    assert torch.equal(load_waveform_split(50, 50, 50, seed=1).x_test, d.x_test)


def test_classes_are_balanced(big):
    _, y = big
    counts = torch.bincount(y, minlength=3).double()
    sd = math.sqrt(N * (1 / 3) * (2 / 3))
    assert ((counts - N / 3).abs() < 5 * sd).all(), counts
    small = torch.bincount(make_waveform(300, seed=0)[1], minlength=3)
    assert (small > 60).all()


def test_wave_inputs_follow_the_triangular_means(big):
    x, y = big
    means = class_means()
    for c in range(3):
        xc = x[y == c, :N_BASE]
        se = xc.std(0) / math.sqrt(xc.shape[0])
        err = (xc.mean(0) - means[c]).abs()
        assert (err < 5 * se).all(), (c, err.max())
        # the peaks of the two mixed waves are where the class mean is largest
        a, b = CLASS_WAVES[c]
        top2 = set(xc.mean(0).topk(2).indices.tolist())
        assert len(top2 & {[6, 14, 10][a], [6, 14, 10][b]}) >= 1
    # the mixing weight is uniform: for class 0, x_7 - x_15 = 12u - 6 + noise, variance 144/12 + 2
    x0 = x[y == 0]
    assert abs(float((x0[:, 6] - x0[:, 14]).var()) - (144 / 12 + 2)) < 0.6


def test_noise_inputs_are_standard_normal_and_class_independent(big):
    x, y = big
    noise = x[:, N_BASE:]
    assert noise.shape[1] == 19
    for j in range(noise.shape[1]):
        col = noise[:, j].numpy()
        assert stats.kstest(col, "norm").pvalue > 1e-3, j
        groups = [col[(y == c).numpy()] for c in range(3)]
        assert stats.f_oneway(*groups).pvalue > 1e-3, j
        assert stats.kruskal(*groups).pvalue > 1e-3, j
    corr = torch.corrcoef(x.T)
    off = corr[N_BASE:, :] - torch.eye(40, dtype=x.dtype)[N_BASE:, :]
    assert off.abs().max() < 5 / math.sqrt(N)
    # positions 1 and 21 are noise as well; the informative ones are not class independent
    for j in (0, 20):
        assert stats.f_oneway(*[x[y == c, j].numpy() for c in range(3)]).pvalue > 1e-3
    for j in INFORMATIVE:
        assert stats.f_oneway(*[x[y == c, j].numpy() for c in range(3)]).pvalue < 1e-6


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n": 0}, "n must be a positive integer"),
        ({"n": 2.5}, "n must be a positive integer"),
        ({"n": 5, "noise_features": -1}, "noise_features must be >= 0"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_waveform(**kwargs)


def test_bad_split_sizes_name_the_argument():
    with pytest.raises(ValueError, match="n_val must be a positive integer"):
        load_waveform_split(10, 0, 10)
