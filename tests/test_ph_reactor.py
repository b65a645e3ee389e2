"""The Henson–Seborg pH reactor against closed forms: mixing, the charge balance, the valve law."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from optbrain.data import ph_reactor as R

P = R.ReactorParameters()


def balance(ph: float, wa4: float, wb4: float) -> float:
    """The charge balance written out from its definition (PAPERS.md §10): Wa = [H⁺] − [OH⁻] −
    [HCO₃⁻] − 2[CO₃²⁻] with the carbonate fractions of Wb at Ka1, Ka2."""
    h = 10.0**-ph
    ka1, ka2 = 10.0**-P.pk1, 10.0**-P.pk2
    d = h * h + ka1 * h + ka1 * ka2
    hco3, co3 = wb4 * ka1 * h / d, wb4 * ka1 * ka2 / d
    return h - 1e-14 / h - hco3 - 2 * co3 - wa4


def test_nominal_steady_state_matches_closed_form_mixing():
    ss = R.steady_state(*R.NOMINAL_FLOWS)
    q = np.array(R.NOMINAL_FLOWS)
    assert ss.wa4 == pytest.approx(float(q @ np.array(P.wa)) / q.sum(), rel=1e-12)
    assert ss.wb4 == pytest.approx(float(q @ np.array(P.wb)) / q.sum(), rel=1e-12)
    assert ss.wa4 == pytest.approx(-4.36e-4, abs=5e-7)  # PAPERS.md §10: −4.36e-4, 5.28e-4
    assert ss.wb4 == pytest.approx(5.28e-4, abs=5e-7)
    assert ss.ph == pytest.approx(7.03, abs=0.005)  # "closed-form mixing gives 7.03"
    assert abs(ss.ph - 7.0) < 0.05  # the nominal pH 7.0
    assert ss.h == pytest.approx(14.0, abs=0.05)
    assert balance(ss.ph, ss.wa4, ss.wb4) == pytest.approx(0.0, abs=1e-15)


@pytest.mark.parametrize(
    "wa4, wb4, expected",
    [(1e-3, 0.0, 3.0), (-1e-3, 0.0, 11.0), (1e-5, 0.0, 5.0), (0.0, 0.0, 7.0)],
)
def test_strong_acid_and_base_without_buffer(wa4, wb4, expected):
    # [H⁺] − [OH⁻] = Wa: the sign error of one public copy (+10^(−pH)) fails these
    assert R.ph_from_invariants(wa4, wb4) == pytest.approx(expected, abs=2e-3)


@pytest.mark.parametrize("ph", [2.5, 4.0, 6.35, 7.0, 8.2, 10.25, 12.0])
@pytest.mark.parametrize("wb4", [0.0, 5e-4, 3e-3])
def test_ph_inverts_the_charge_balance(ph, wb4):
    # choose Wa4 so that ph is the root, then recover it
    wa4 = balance(ph, 0.0, wb4)
    assert R.ph_from_invariants(wa4, wb4) == pytest.approx(ph, abs=1e-9)


def test_titration_curve_is_monotone():
    q3 = np.linspace(0.5, 40.0, 120)
    ph = np.array([R.steady_state(16.6, 0.55, q).ph for q in q3])
    assert np.all(np.diff(ph) > 0)
    assert ph[0] < 4.0 and ph[-1] > 10.0


@pytest.mark.parametrize("q", [(16.6, 0.55, 15.6), (10.0, 1.0, 25.0), (20.0, 0.0, 5.0)])
def test_level_obeys_valve_law_at_steady_state(q):
    ss = R.steady_state(*q)
    assert P.cv4 * (ss.h + P.z) ** P.n == pytest.approx(sum(q), rel=1e-12)


def test_reduced_valve_law_is_a_parameter_choice():
    p = R.ReactorParameters(z=0.0, n=0.5, cv4=8.75)
    ss = R.steady_state(*R.NOMINAL_FLOWS, params=p)
    assert 8.75 * math.sqrt(ss.h) == pytest.approx(sum(R.NOMINAL_FLOWS), rel=1e-12)


def test_long_simulation_settles_on_steady_state():
    start = R.steady_state(*R.NOMINAL_FLOWS)
    flows = np.tile([15.0, 0.8, 19.0], (400, 1))  # 400 × 15 s = 100 min ≫ the time constants
    traj = R.simulate(flows, 15.0, (start.wa4, start.wb4, start.h))
    end = R.steady_state(15.0, 0.8, 19.0)
    assert traj.states[-1, 2] == pytest.approx(end.h, abs=1e-4)
    assert traj.ph[-1] == pytest.approx(end.ph, abs=1e-4)
    assert traj.ph[0] == pytest.approx(start.ph, abs=1e-12)
    assert abs(traj.ph[5] - end.ph) > 0.1  # it did move


def test_simulation_from_steady_state_stays_there():
    traj = R.simulate(np.tile(R.NOMINAL_FLOWS, (50, 1)), 10.0)
    ss = R.steady_state(*R.NOMINAL_FLOWS)
    assert np.allclose(traj.ph, ss.ph, atol=1e-7)
    assert np.allclose(traj.states[:, 2], ss.h, atol=1e-7)


def test_step_response_direction_and_zero_order_hold():
    flows = np.tile(R.NOMINAL_FLOWS, (30, 1))
    flows[10:, 2] = 18.0  # more base from t_10 on
    traj = R.simulate(flows, 10.0)
    assert np.allclose(traj.ph[:11], traj.ph[0], atol=1e-9)  # nothing changes before t_10
    assert np.all(np.diff(traj.ph[10:]) > 0)


def test_random_steps_respect_range_and_hold():
    rng = np.random.default_rng(1)
    u = R.random_steps(500, 12.0, 19.0, (5, 9), rng)
    assert u.shape == (500,) and u.min() >= 12.0 and u.max() <= 19.0
    runs = np.diff(np.flatnonzero(np.diff(u) != 0))
    assert runs.min() >= 5 and runs.max() <= 9


def test_sequences_are_seeded_and_independent():
    spec = R.SequenceSpec(n_train=80, n_val=60, n_test=50, noise_std=0.05)
    a, b, c = R.make_sequences(spec, 3), R.make_sequences(spec, 3), R.make_sequences(spec, 4)
    assert (a.train.y == b.train.y).all() and (a.test.u == b.test.u).all()
    assert not (a.train.u[:50] == c.train.u[:50]).all()
    assert not (a.train.u[:50] == a.val.u[:50]).all()
    assert a.train.u.shape == (80, 1) and a.val.y.shape == (60, 1) and len(a.test) == 50
    noise = (a.train.y - a.train.y_clean).std()
    assert 0.02 < float(noise) < 0.09
    assert a.split("val") is a.val


def test_disturbances_are_optional_and_leave_the_input_alone():
    spec = R.SequenceSpec(n_train=120, n_val=20, n_test=20)
    plain = R.make_sequences(spec, 0)
    dist = R.make_sequences(
        R.SequenceSpec(n_train=120, n_val=20, n_test=20, q1_steps=(14.0, 19.0)), 0
    )
    assert torch.equal(plain.train.u, dist.train.u)  # the excitation does not change
    assert torch.equal(plain.train.disturbances[:, 0], torch.full((120,), 16.6))
    q1 = dist.train.disturbances[:, 0]
    assert q1.min() >= 14.0 and q1.max() <= 19.0 and len(set(q1.tolist())) > 1
    assert torch.equal(dist.train.disturbances[:, 1], plain.train.disturbances[:, 1])
    # the simulation sees the disturbance: more acid, lower pH where q1 is high
    more = q1[:-1] > 16.6
    diff = (dist.train.y_clean - plain.train.y_clean)[1:, 0]
    assert (diff[more] < 0).float().mean() > 0.6
    with pytest.raises(ValueError, match="q2_steps"):
        R.make_sequences(R.SequenceSpec(q2_steps=(1.0, 0.5)))


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf])
def test_bad_flows_are_refused(bad):
    with pytest.raises(ValueError, match="flows"):
        R.steady_state(16.6, bad, 15.6)
    flows = np.tile(R.NOMINAL_FLOWS, (5, 1))
    flows[3, 0] = bad
    with pytest.raises(ValueError, match="flows"):
        R.simulate(flows, 10.0)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="sample_period"):
        R.simulate(np.tile(R.NOMINAL_FLOWS, (5, 1)), 0.0)
    with pytest.raises(ValueError, match="T × 3"):
        R.simulate(np.ones((5, 2)), 10.0)
    with pytest.raises(ValueError, match="hold"):
        R.random_steps(10, 1.0, 2.0, (0, 3), np.random.default_rng(0))
    with pytest.raises(ValueError, match="q3_range"):
        R.make_sequences(R.SequenceSpec(q3_range=(19.0, 12.0)))
    with pytest.raises(ValueError, match="noise_std"):
        R.make_sequences(R.SequenceSpec(noise_std=-0.1))


def test_solver_failure_names_the_simulated_time(monkeypatch):
    import scipy.integrate

    real = scipy.integrate.solve_ivp

    def failing(fun, t_span, y0, **kw):
        sol = real(fun, t_span, y0, **kw)
        if t_span[0] >= 50.0:  # the second constant-flow interval fails part-way
            sol.success, sol.message = False, "step size too small"
            sol.t, sol.y = sol.t[:2], sol.y[:, :2]
        return sol

    monkeypatch.setattr(scipy.integrate, "solve_ivp", failing)
    flows = np.tile(R.NOMINAL_FLOWS, (10, 1))
    flows[5:, 2] = 18.0
    with pytest.raises(R.ReactorSimulationError, match=r"t = 70 s.*step size too small"):
        R.simulate(flows, 10.0)


def test_empty_tank_is_reported():
    flows = np.zeros((50, 3))
    flows[0] = R.NOMINAL_FLOWS
    p = R.ReactorParameters(z=0.0, n=0.5, cv4=8.75)
    with pytest.raises(R.ReactorSimulationError, match="simulated time"):
        R.simulate(flows, 60.0, params=p)
