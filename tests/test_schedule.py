"""Schedules: closed forms, monotonicity, valid targets, input validation."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from optbrain.schedule import SCHEDULES, cubic, geometric, linear, one_shot
from optbrain.selection import target_count

fractions = st.floats(0.0, 0.999, allow_nan=False)
round_counts = st.integers(1, 50)


def schedules(uncapped_geometric: bool = True):
    """Any schedule with valid arguments (optionally leaving out ``geometric`` without ``final``,
    whose values round to 1.0 after enough rounds: see ``test_geometric_never_reaches_one``)."""
    rates = st.floats(0.0, 0.9, allow_nan=False)
    return st.one_of(
        st.builds(one_shot, fractions),
        st.builds(linear, fractions, round_counts),
        st.builds(geometric, rates) if uncapped_geometric else st.nothing(),
        st.builds(geometric, rates, fractions),
        st.builds(lambda f, r: cubic(f, r), fractions, round_counts),
        fractions.flatmap(lambda f: st.builds(cubic, st.just(f), round_counts, st.floats(0.0, f))),
    )


# --------------------------------------------------------------------------- closed forms
def test_closed_form_values():
    assert [one_shot(0.6)(r) for r in (1, 2, 10)] == [0.6, 0.6, 0.6]
    assert [linear(0.8, 4)(r) for r in range(7)] == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 0.8, 0.8])
    assert [geometric(0.2)(r) for r in range(4)] == pytest.approx([0, 0.2, 0.36, 0.488])
    assert [geometric(0.5, final=0.8)(r) for r in range(5)] == pytest.approx(
        [0, 0.5, 0.75, 0.8, 0.8]
    )
    c = cubic(0.9, 3)
    assert [c(r) for r in range(6)] == pytest.approx(
        [0.0, 0.9 - 0.9 * (2 / 3) ** 3, 0.9 - 0.9 * (1 / 3) ** 3, 0.9, 0.9, 0.9]
    )
    c = cubic(0.9, 4, initial=0.1)
    assert c(0) == pytest.approx(0.1) and c(2) == pytest.approx(0.9 - 0.8 / 8) and c(4) == 0.9


@given(st.floats(0.0, 0.99), st.integers(1, 30), st.integers(0, 60))
def test_linear_formula(final, rounds, r):
    assert linear(final, rounds)(r) == pytest.approx(final * min(r, rounds) / rounds)


@given(st.floats(0.0, 0.99), st.integers(0, 40))
def test_geometric_formula_deletes_rate_of_what_is_left(rate, r):
    g = geometric(rate)
    assert g(r) == pytest.approx(1 - (1 - rate) ** r)
    if r >= 1:  # remaining fraction shrinks by (1 - rate) each round
        assert 1 - g(r) == pytest.approx((1 - g(r - 1)) * (1 - rate))


@given(st.floats(0.0, 0.99), st.integers(1, 30), st.integers(0, 60))
def test_cubic_formula(final, rounds, r):
    t = min(r, rounds) / rounds
    assert cubic(final, rounds)(r) == pytest.approx(final * (1 - (1 - t) ** 3))


# --------------------------------------------------------------------------- properties
@given(schedules())
def test_schedules_are_monotone_non_decreasing(schedule):
    values = [schedule(r) for r in range(0, 60)]
    assert all(b >= a for a, b in zip(values, values[1:])), values


@given(schedules(uncapped_geometric=False), st.integers(1, 200))
def test_schedule_values_are_valid_sparsity_targets(schedule, r):
    """Every value a schedule gives is a fraction a selector accepts."""
    v = schedule(r)
    assert isinstance(v, float)
    assert 0.0 <= v < 1.0
    target_count(v, 1000)


def test_geometric_never_reaches_one():
    # 1 - 0.5**60 == 1.0 in float: the schedule must stay strictly below 1
    assert geometric(0.5)(60) < 1.0
    target_count(geometric(0.5)(60), 100)


def test_cubic_rejects_initial_above_final():
    with pytest.raises(ValueError):
        cubic(0.3, 5, initial=0.6)


# --------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "make",
    [
        lambda: one_shot(1.0),
        lambda: one_shot(-0.1),
        lambda: one_shot(float("nan")),
        lambda: one_shot("0.5"),
        lambda: linear(1.2, 3),
        lambda: linear(0.5, 0),
        lambda: linear(0.5, -2),
        lambda: linear(0.5, 2.0),
        lambda: geometric(1.0),
        lambda: geometric(-0.2),
        lambda: geometric(0.2, final=1.0),
        lambda: cubic(0.5, 0),
        lambda: cubic(1.0, 3),
        lambda: cubic(0.5, 3, initial=-0.1),
        lambda: cubic(0.5, 3, initial=float("nan")),
    ],
)
def test_out_of_range_arguments_raise(make):
    with pytest.raises(ValueError, match="must be"):
        make()


def test_registry_and_immutability():
    assert SCHEDULES == {
        "one_shot": one_shot,
        "linear": linear,
        "geometric": geometric,
        "cubic": cubic,
    }
    s = linear(0.5, 2)
    with pytest.raises(AttributeError):
        s.final = 0.9  # frozen: a schedule in a run's config cannot drift
    assert math.isclose(s(1), 0.25)
