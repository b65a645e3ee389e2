"""The Henson–Seborg pH neutralisation reactor (PAPERS.md §10), simulated with scipy.

Streams (flows in ml/s): q1 acid (HNO₃), q2 buffer (NaHCO₃), q3 base (NaOH), q4 effluent. The
state is the pair of reaction invariants of the effluent and the level h (cm)::

    A h dWa4/dt = q1 (Wa1 − Wa4) + q2 (Wa2 − Wa4) + q3 (Wa3 − Wa4)
    A h dWb4/dt = q1 (Wb1 − Wb4) + q2 (Wb2 − Wb4) + q3 (Wb3 − Wb4)
    A   dh/dt   = q1 + q2 + q3 − q4,          q4 = Cv4 (h + z)^n

and the pH is the root of the charge balance (Henson & Seborg 1994; the sign of 10^(−pH) is
negative, one public copy has it wrong)::

    0 = Wa4 + 10^(pH−14) − 10^(−pH) + Wb4 (1 + 2·10^(pH−pK2)) / (1 + 10^(pK1−pH) + 10^(pH−pK2))

whose right-hand side increases strictly with the pH, so ``brentq`` on a bracket finds the unique
root. The reduced valve law q4 = Cv √h of some studies is ``ReactorParameters(z=0, n=0.5,
cv4=8.75)``. The ODEs are integrated by ``scipy.integrate.solve_ivp`` (LSODA by default, which
switches to a stiff method by itself) over each interval on which the flows are constant (zero-order
hold at the sampling instants).

For identification (PAPERS.md §10, §14.1): input u = q3, output y = pH; q3 is excited by random
steps (levels uniform in a range, hold times uniform in a range of samples); q1 and q2 are constant
or random-step disturbances (``SequenceSpec.q1_steps``/``q2_steps``; any sequence through
:func:`simulate`); the pH is sampled every ``sample_period`` seconds and measured with Gaussian
noise. :func:`make_sequences` gives seeded training, validation
and test sequences (numpy Generators seeded from ``(seed, split)``; the global RNG is never used).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger(__name__)

__all__ = [
    "NOMINAL_FLOWS",
    "PHSequence",
    "PHSequences",
    "ReactorParameters",
    "ReactorSimulationError",
    "SequenceSpec",
    "SteadyState",
    "make_sequences",
    "mixing_invariants",
    "ph_from_invariants",
    "random_steps",
    "simulate",
    "steady_state",
]

NOMINAL_FLOWS = (16.6, 0.55, 15.6)
"""Nominal q1 (acid), q2 (buffer), q3 (base) in ml/s (Henson & Seborg's Table I)."""

_SPLITS = {"train": 0, "val": 1, "test": 2}


class ReactorSimulationError(RuntimeError):
    """The ODE solver failed; the message names the simulated time where it stopped."""


@dataclass(frozen=True)
class ReactorParameters:
    """Table I of Henson & Seborg (1994) as quoted in PAPERS.md §10 (cm, ml/s, mol/l)."""

    area: float = 207.0  # A, cm²
    z: float = 11.5  # valve offset, cm
    n: float = 0.607  # valve exponent
    cv4: float = 4.59  # valve coefficient
    pk1: float = 6.35
    pk2: float = 10.25
    wa: tuple[float, float, float] = (3.0e-3, -3.0e-2, -3.05e-3)  # Wa1, Wa2, Wa3
    wb: tuple[float, float, float] = (0.0, 3.0e-2, 5.0e-5)  # Wb1, Wb2, Wb3

    def outflow(self, h: float) -> float:
        """Valve law q4 = Cv4 (h + z)^n (ml/s)."""
        return self.cv4 * max(h + self.z, 0.0) ** self.n

    def level(self, q_total: float) -> float:
        """The level at which the valve passes ``q_total``: (q/Cv4)^(1/n) − z (cm)."""
        return (q_total / self.cv4) ** (1.0 / self.n) - self.z


@dataclass(frozen=True)
class SteadyState:
    """Steady state for constant flows: level h (cm), pH and the invariants Wa4, Wb4 (mol/l)."""

    h: float
    ph: float
    wa4: float
    wb4: float


def _check_flows(q: np.ndarray, what: str = "flows") -> None:
    if not np.all(np.isfinite(q)):
        raise ValueError(f"{what} must be finite; got {q[~np.isfinite(q)][:3].tolist()}")
    if np.any(q < 0):
        raise ValueError(f"{what} must be >= 0 ml/s; got {q[q < 0][:3].tolist()}")


def _charge_balance(ph: float, wa4: float, wb4: float, p: ReactorParameters) -> float:
    carb = (1.0 + 2.0 * 10.0 ** (ph - p.pk2)) / (1.0 + 10.0 ** (p.pk1 - ph) + 10.0 ** (ph - p.pk2))
    return wa4 + 10.0 ** (ph - 14.0) - 10.0 ** (-ph) + wb4 * carb


def ph_from_invariants(wa4: float, wb4: float, params: ReactorParameters | None = None) -> float:
    """The pH solving the charge balance for invariants ``wa4``, ``wb4`` (``brentq``)."""
    from scipy.optimize import brentq

    p = params or ReactorParameters()
    if not (math.isfinite(wa4) and math.isfinite(wb4)):
        raise ValueError(f"invariants must be finite; got Wa4={wa4!r}, Wb4={wb4!r}")
    lo, hi = -2.0, 16.0  # f(lo) < 0 < f(hi) for any |Wa4|, Wb4 ≥ 0 below ~10 mol/l
    while _charge_balance(lo, wa4, wb4, p) > 0:
        lo -= 2.0
    while _charge_balance(hi, wa4, wb4, p) < 0:
        hi += 2.0
    return float(brentq(_charge_balance, lo, hi, args=(wa4, wb4, p), xtol=1e-12))


def mixing_invariants(
    q1: float, q2: float, q3: float, params: ReactorParameters | None = None
) -> tuple[float, float]:
    """Flow-weighted invariants of the mixed inflow, (Σ qᵢ Waᵢ / Σ qᵢ, Σ qᵢ Wbᵢ / Σ qᵢ)."""
    p = params or ReactorParameters()
    q = np.array([q1, q2, q3], dtype=float)
    _check_flows(q)
    total = float(q.sum())
    if total <= 0:
        raise ValueError("at least one flow must be > 0")
    return float(q @ np.array(p.wa)) / total, float(q @ np.array(p.wb)) / total


def steady_state(
    q1: float, q2: float, q3: float, params: ReactorParameters | None = None
) -> SteadyState:
    """Steady state for constant flows (ml/s): invariants of the mixed inflow, the level of the
    valve law at q4 = q1 + q2 + q3, and the pH of the charge balance."""
    p = params or ReactorParameters()
    wa4, wb4 = mixing_invariants(q1, q2, q3, p)
    return SteadyState(p.level(q1 + q2 + q3), ph_from_invariants(wa4, wb4, p), wa4, wb4)


def _rhs(p: ReactorParameters, q: np.ndarray):
    wa, wb, area = np.array(p.wa), np.array(p.wb), p.area
    qa, qb, qt = float(q @ wa), float(q @ wb), float(q.sum())

    def f(t: float, x: np.ndarray) -> list[float]:
        wa4, wb4, h = x
        vol = area * max(h, 1e-9)
        return [(qa - qt * wa4) / vol, (qb - qt * wb4) / vol, (qt - p.outflow(h)) / area]

    return f


@dataclass
class Trajectory:
    """States at the sampling instants t_k = k·dt (k = 0..T): columns Wa4, Wb4, h; and the pH."""

    t: np.ndarray
    states: np.ndarray
    ph: np.ndarray


def simulate(
    flows: np.ndarray,
    sample_period: float,
    x0: tuple[float, float, float] | None = None,
    params: ReactorParameters | None = None,
    *,
    method: str = "LSODA",
    rtol: float = 1e-8,
    atol: tuple[float, float, float] = (1e-12, 1e-12, 1e-9),
) -> Trajectory:
    """Simulate the reactor under zero-order-hold flows.

    ``flows`` is T × 3 (q1, q2, q3 in ml/s) and holds on [t_k, t_{k+1}); the result has the T + 1
    states at t_0..t_T. ``x0`` = (Wa4, Wb4, h) defaults to the steady state of the first row.
    Consecutive equal rows are integrated in one ``solve_ivp`` call. A solver failure raises
    :class:`ReactorSimulationError` naming the simulated time.
    """
    from scipy.integrate import solve_ivp

    p = params or ReactorParameters()
    q = np.asarray(flows, dtype=float)
    if q.ndim != 2 or q.shape[1] != 3 or q.shape[0] < 1:
        raise ValueError(f"flows must be T × 3 (q1, q2, q3) with T >= 1; got shape {q.shape}")
    _check_flows(q)
    if not (math.isfinite(sample_period) and sample_period > 0):
        raise ValueError(f"sample_period must be a positive number of seconds, not {sample_period}")
    if x0 is None:
        ss = steady_state(*q[0], params=p)
        x0 = (ss.wa4, ss.wb4, ss.h)
    if not (all(math.isfinite(v) for v in x0) and x0[1] >= 0 and x0[2] > 0):
        raise ValueError(f"x0 = (Wa4, Wb4, h) must be finite with Wb4 >= 0 and h > 0; got {x0}")
    n = q.shape[0]
    states = np.empty((n + 1, 3))
    states[0] = x0
    change = np.flatnonzero(np.any(np.diff(q, axis=0) != 0, axis=1)) + 1
    bounds = [0, *change.tolist(), n]
    for a, b in zip(bounds[:-1], bounds[1:]):
        t_eval = np.arange(a + 1, b + 1) * sample_period
        sol = solve_ivp(
            _rhs(p, q[a]),
            (a * sample_period, b * sample_period),
            states[a],
            method=method,
            t_eval=t_eval,
            rtol=rtol,
            atol=list(atol),
        )
        if not sol.success or sol.y.shape[1] != b - a or not np.all(np.isfinite(sol.y)):
            t_fail = float(sol.t[-1]) if sol.t.size else a * sample_period
            raise ReactorSimulationError(
                f"the ODE solver ({method}) failed at simulated time t = {t_fail:.6g} s "
                f"(interval {a * sample_period:g}–{b * sample_period:g} s): {sol.message}"
            )
        states[a + 1 : b + 1] = sol.y.T
    if np.any(states[:, 2] <= 0):
        k = int(np.argmax(states[:, 2] <= 0))
        raise ReactorSimulationError(
            f"the tank ran empty at simulated time t = {k * sample_period:g} s"
        )
    ph = np.array([ph_from_invariants(s[0], s[1], p) for s in states])
    return Trajectory(np.arange(n + 1) * sample_period, states, ph)


def random_steps(
    n: int,
    low: float,
    high: float,
    hold: tuple[int, int],
    rng: np.random.Generator,
) -> np.ndarray:
    """``n`` samples of a random-step signal: levels uniform in [low, high], each held for a
    number of samples drawn uniformly from ``hold = (min, max)`` (inclusive)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n!r}")
    if not (math.isfinite(low) and math.isfinite(high) and low <= high):
        raise ValueError(f"need finite low <= high; got low={low!r}, high={high!r}")
    h_min, h_max = hold
    if not (1 <= h_min <= h_max):
        raise ValueError(f"hold must be (min, max) samples with 1 <= min <= max; got {hold!r}")
    out = np.empty(n)
    k = 0
    while k < n:
        length = int(rng.integers(h_min, h_max + 1))
        out[k : k + length] = rng.uniform(low, high)
        k += length
    return out


@dataclass(frozen=True)
class SequenceSpec:
    """How identification data are generated (the defaults are this project's choice: the
    paper's settings are not known, PAPERS.md §14.1 [U])."""

    n_train: int = 2000
    n_val: int = 1000
    n_test: int = 1000
    sample_period: float = 10.0  # s
    q3_range: tuple[float, float] = (12.0, 19.0)  # ml/s
    hold: tuple[int, int] = (5, 30)  # samples
    q1: float = NOMINAL_FLOWS[0]
    q2: float = NOMINAL_FLOWS[1]
    q1_steps: tuple[float, float] | None = None  # disturbance: random steps of q1 in this range
    q2_steps: tuple[float, float] | None = None  # disturbance: random steps of q2 in this range
    noise_std: float = 0.02  # pH units, Gaussian measurement noise
    params: ReactorParameters = field(default_factory=ReactorParameters)

    def validate(self) -> None:
        for name in ("n_train", "n_val", "n_test"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        lo, hi = self.q3_range
        _check_flows(np.array([lo, hi, self.q1, self.q2]), "flows (q3_range, q1, q2)")
        if lo > hi:
            raise ValueError(f"q3_range must be (low, high) with low <= high, got {self.q3_range}")
        for name in ("q1_steps", "q2_steps"):
            rng = getattr(self, name)
            if rng is not None:
                _check_flows(np.array(rng, dtype=float), name)
                if len(rng) != 2 or rng[0] > rng[1]:
                    raise ValueError(f"{name} must be (low, high) with low <= high, got {rng}")
        if not (math.isfinite(self.noise_std) and self.noise_std >= 0):
            raise ValueError(f"noise_std must be >= 0, got {self.noise_std!r}")


@dataclass
class PHSequence:
    """One identification sequence: ``u`` = q3 (ml/s) held on [t_k, t_{k+1}), ``y`` = measured
    pH at t_k (noisy), ``y_clean`` = noise-free pH; all T × 1 float tensors (k = 0..T−1);
    ``disturbances``: T × 2, the flows q1 and q2 (constant unless the spec varies them)."""

    u: Tensor
    y: Tensor
    y_clean: Tensor
    sample_period: float
    disturbances: Tensor

    def __len__(self) -> int:
        return self.u.shape[0]


@dataclass
class PHSequences:
    """Training, validation and test sequences of one seed, and how they were made."""

    train: PHSequence
    val: PHSequence
    test: PHSequence
    spec: SequenceSpec
    seed: int

    def split(self, name: str) -> PHSequence:
        if name not in _SPLITS:
            raise KeyError(f"no split {name!r}; choose from {', '.join(_SPLITS)}")
        return getattr(self, name)


def _sequence(spec: SequenceSpec, n: int, seed: int, split: int, dtype) -> PHSequence:
    rng = np.random.default_rng([seed, split])
    q3 = random_steps(n, *spec.q3_range, spec.hold, rng)
    other = np.random.default_rng([seed, split, 1])  # disturbances: a stream of their own
    q12 = [
        random_steps(n, *steps, spec.hold, other) if steps is not None else np.full(n, q)
        for q, steps in ((spec.q1, spec.q1_steps), (spec.q2, spec.q2_steps))
    ]
    flows = np.column_stack([*q12, q3])
    ss = steady_state(spec.q1, spec.q2, 0.5 * sum(spec.q3_range), spec.params)
    traj = simulate(flows, spec.sample_period, (ss.wa4, ss.wb4, ss.h), spec.params)
    clean = traj.ph[:n]  # pH at t_k, before the input held on [t_k, t_{k+1}) acts
    noisy = clean + spec.noise_std * rng.standard_normal(n)
    as_t = lambda a: torch.as_tensor(a, dtype=dtype).reshape(n, -1)  # noqa: E731
    return PHSequence(
        as_t(q3), as_t(noisy), as_t(clean), spec.sample_period, as_t(np.column_stack(q12))
    )


def make_sequences(
    spec: SequenceSpec | None = None, seed: int = 0, dtype: torch.dtype = torch.float32
) -> PHSequences:
    """Seeded training, validation and test sequences (independent excitations and noise; each
    starts at the steady state of the middle of the q3 range)."""
    spec = spec or SequenceSpec()
    spec.validate()
    parts = {
        name: _sequence(spec, getattr(spec, f"n_{name}"), seed, idx, dtype)
        for name, idx in _SPLITS.items()
    }
    log.debug("pH reactor sequences for seed %d: %s", seed, {k: len(v) for k, v in parts.items()})
    return PHSequences(**parts, spec=spec, seed=seed)
