"""Data of the generalisation studies: sunspots, Mackey–Glass, contiguity."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from optbrain.data.contiguity import clump_count, contiguity_split, load_contiguity
from optbrain.data.mackey_glass import load_mackey_glass, mackey_glass
from optbrain.data.sunspots import NMSE_VARIANCE, load_sunspots, sunspot_series


# ------------------------------------------------------------------------------ sunspots
def test_sunspot_splits_and_normaliser():
    pytest.importorskip("statsmodels")
    d = load_sunspots()
    assert {k: v.shape[0] for k, v in d.x.items()} == {"train": 209, "test1": 35, "test2": 24}
    assert d.x["train"].shape[1] == 12 and d.y["test2"].shape == (24, 1)
    assert (d.years["train"][0], d.years["train"][-1]) == (1712, 1920)
    assert (d.years["test1"][0], d.years["test1"][-1]) == (1921, 1955)
    assert (d.years["test2"][0], d.years["test2"][-1]) == (1956, 1979)
    assert round(d.variance, 1) == 1495.6 and d.variance == pytest.approx(NMSE_VARIANCE, rel=1e-12)
    years, act = sunspot_series()
    # the window of year t holds years t-12 .. t-1 (oldest first), target year t
    raw = d.x["test1"] * d.scale + d.offset
    i = int(np.nonzero(years == 1930)[0][0])
    row = int(np.nonzero(d.years["test1"].numpy() == 1930)[0][0])
    np.testing.assert_allclose(raw[row].numpy(), act[i - 12 : i], rtol=1e-12)
    assert float(d.y["test1"][row] * d.scale + d.offset) == pytest.approx(act[i], rel=1e-12)
    # standardised on the training years 1700-1920
    train_years = act[(years >= 1700) & (years <= 1920)]
    assert d.offset == pytest.approx(train_years.mean()) and d.scale == pytest.approx(
        train_years.std()
    )
    # NMSE: predicting the 1700-1979 mean everywhere on 1700-1979 gives exactly 1
    plain = load_sunspots(standardize=False)
    assert (plain.offset, plain.scale) == (0.0, 1.0)
    record = act[(years >= 1700) & (years <= 1979)]
    assert plain.nmse(float(((record - record.mean()) ** 2).mean())) == pytest.approx(1.0)
    assert d.nmse(2.0) == pytest.approx(2.0 * d.scale**2 / d.variance)


def test_sunspot_bad_lags():
    with pytest.raises(ValueError, match="lags"):
        load_sunspots(lags=0)


# ------------------------------------------------------------------------------ contiguity
def test_clump_counts_follow_the_binomial_formula():
    for n in range(1, 13):
        codes = torch.arange(2**n)
        bits = (codes[:, None] >> torch.arange(n - 1, -1, -1)) & 1
        counts = torch.bincount(clump_count(bits), minlength=n + 2)
        for k in range(0, n // 2 + 2):
            assert int(counts[k]) == math.comb(n + 1, 2 * k), (n, k)


def test_contiguity_data():
    x, y = load_contiguity()
    assert x.shape == (792, 10) and y.shape == (792, 1)
    assert int((y < 0).sum()) == 330 and int((y > 0).sum()) == 462
    assert set(x.unique().tolist()) == {-1.0, 1.0}
    counts = clump_count((x > 0).long())
    assert torch.equal(torch.where(counts == 3, 1.0, -1.0).to(y), y[:, 0])
    assert len({tuple(r) for r in x.tolist()}) == 792
    a, b = contiguity_split(100, seed=3), contiguity_split(100, seed=3)
    assert torch.equal(a.x_train, b.x_train) and a.x_test.shape == (692, 10)
    train = {tuple(r) for r in a.x_train.tolist()}
    assert not train & {tuple(r) for r in a.x_test.tolist()}
    assert not torch.equal(contiguity_split(100, seed=4).x_train, a.x_train)
    with pytest.raises(ValueError, match="n_train"):
        contiguity_split(792)
    with pytest.raises(ValueError, match="clumps"):
        load_contiguity(clumps=(2, 2))


# ------------------------------------------------------------------------------ Mackey-Glass
A, B, TAU, Z0 = 0.2, 0.1, 17.0, 1.2


def method_of_steps(t_end: float, rtol: float = 1e-11, atol: float = 1e-12):
    """z(t) by the method of steps: on [kτ, (k+1)τ] the delayed term comes from the previous
    interval's dense output, so each interval is an ODE solved by scipy's DOP853."""
    from scipy.integrate import solve_ivp

    pieces = []

    def past(s: float) -> float:
        if s <= 0:
            return Z0
        sol = pieces[min(int(s // TAU), len(pieces) - 1)]
        return float(sol.sol(s)[0])

    t0, z = 0.0, Z0
    while t0 < t_end:
        t1 = t0 + TAU

        def rhs(t, zz):
            d = past(t - TAU)
            return [-B * zz[0] + A * d / (1 + d**10)]

        sol = solve_ivp(
            rhs, (t0, t1), [z], method="DOP853", dense_output=True, rtol=rtol, atol=atol
        )
        pieces.append(sol)
        t0, z = t1, float(sol.y[0, -1])
    return past


@pytest.mark.parametrize("backend", ["auto", "python"])
def test_jitcdde_agrees_with_the_method_of_steps(backend):
    pytest.importorskip("jitcdde")
    ref = method_of_steps(260.0)
    z = mackey_glass(230, transient=30.0, rtol=1e-10, atol=1e-10, backend=backend)
    expected = np.array([ref(30.0 + k) for k in range(230)])
    np.testing.assert_allclose(z, expected, rtol=0, atol=1e-7)
    assert z.min() > 0.2 and z.max() < 1.5  # on the attractor's range


def test_mackey_glass_task_layout():
    pytest.importorskip("jitcdde")
    d = load_mackey_glass(n_train=20, n_test=30)
    assert d.x_train.shape == (20, 6) and d.x_test.shape == (30, 6) and d.y_test.shape == (30, 1)
    z = d.series
    assert z.shape == (36 + 50,)
    # x(k) = [z(k-6), z(k-12), ..., z(k-36)], y(k) = z(k), k = 36, 37, ...
    assert torch.equal(d.x_train[0], z[[30, 24, 18, 12, 6, 0]])
    assert torch.equal(d.y_train[0, 0], z[36])
    assert torch.equal(d.x_test[0], z[[50, 44, 38, 32, 26, 20]]) and d.y_test[0, 0] == z[56]
    seeded = load_mackey_glass(n_train=20, n_test=30, seed=1)
    assert seeded.z0 != 1.2 and not torch.equal(seeded.series, z)
    assert torch.equal(load_mackey_glass(n_train=20, n_test=30, seed=1).series, seeded.series)


def test_mackey_glass_bad_input():
    with pytest.raises(ValueError, match="backend"):
        mackey_glass(10, backend="fortran")
    with pytest.raises(ValueError, match="transient >= tau"):
        mackey_glass(10, transient=5.0)
    with pytest.raises(ValueError, match="n_train"):
        load_mackey_glass(n_train=0)
