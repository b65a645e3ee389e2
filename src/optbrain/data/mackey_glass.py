"""The Mackey–Glass series and Pedersen, Hansen & Larsen's prediction task (PAPERS.md §5, §12).

    dz/dt = −b z(t) + a z(t − τ) / (1 + z(t − τ)^10),   a = 0.2, b = 0.1, τ = 17,

with a constant past z(t) = z0 for t ≤ 0, integrated by jitcdde (a maintained delay-differential
solver: an adaptive Bogacki–Shampine method with Hermite interpolation of the past, stepping onto
the derivative discontinuities that the constant past propagates at t = τ, 2τ, …). jitcdde compiles
the right-hand side with the C compiler when one works (``backend="c"``, fast) and otherwise runs it
as Python functions (``backend="python"``, about 60× slower, no compiler needed); ``"auto"`` tries
C first. The series is chaotic: trajectories computed with different backends, tolerances or
machines agree closely for a few hundred time units and then part (their statistics do not).

The task: sample z with Δt = 1 after a transient, input x(k) = [z(k−6), z(k−12), …, z(k−36)]
(6 lags at spacing 6), target y(k) = z(k) (six steps ahead of the newest input); 250 training and
the next 8500 test patterns.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger(__name__)

__all__ = ["BACKENDS", "MackeyGlassData", "load_mackey_glass", "mackey_glass"]

BACKENDS = ("auto", "c", "python")


def _solver(tau: float, a: float, b: float, exponent: float, z0: float, backend: str):
    try:
        from jitcdde import jitcdde, t, y
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the Mackey-Glass series needs jitcdde: pip install 'optbrain[data]'"
        ) from exc
    lagged = y(0, t - tau)
    dde = jitcdde([-b * y(0) + a * lagged / (1 + lagged**exponent)], verbose=False)
    dde.constant_past([z0])
    if backend in ("auto", "c"):
        try:
            dde.compile_C(verbose=False)
            return dde
        except Exception as exc:  # noqa: BLE001 - any compiler failure means: no C backend
            if backend == "c":
                raise RuntimeError(f"jitcdde could not compile the C backend: {exc}") from exc
            log.info("no C backend for jitcdde (%s); using Python functions", exc)
    dde.generate_lambdas()
    return dde


def mackey_glass(
    n_points: int,
    *,
    dt: float = 1.0,
    transient: float = 1000.0,
    tau: float = 17.0,
    a: float = 0.2,
    b: float = 0.1,
    exponent: float = 10.0,
    z0: float = 1.2,
    rtol: float = 1e-8,
    atol: float = 1e-8,
    backend: str = "auto",
) -> np.ndarray:
    """z(transient + k·dt) for k = 0 … n_points − 1 (float64), from the constant past z0.

    ``transient`` must be at least τ (the solver first steps over the discontinuities the
    constant past causes)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, not {backend!r}")
    if not (isinstance(n_points, int) and n_points >= 1):
        raise ValueError(f"n_points must be a positive int, not {n_points!r}")
    if not (dt > 0 and tau > 0 and transient >= tau):
        raise ValueError(f"need dt > 0, tau > 0 and transient >= tau; got {dt}, {tau}, {transient}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # jitcdde's notes on the past and on tolerances
        dde = _solver(tau, a, b, exponent, z0, backend)
        dde.set_integration_parameters(rtol=rtol, atol=atol)
        dde.step_on_discontinuities()
        times = transient + dt * np.arange(n_points)
        out = np.array([dde.integrate(tt)[0] for tt in times], dtype=np.float64)
    if not np.isfinite(out).all():
        raise FloatingPointError("the Mackey-Glass integration gave NaN or inf")
    return out


@dataclass
class MackeyGlassData:
    """Lagged patterns (x: n × lags, newest lag first; y: n × 1) and the sampled ``series``."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    series: Tensor
    z0: float

    @property
    def variance(self) -> float:
        """Variance of the test targets (a normaliser for NMSE)."""
        return float(self.y_test.var(unbiased=False))


def load_mackey_glass(
    n_train: int = 250,
    n_test: int = 8500,
    *,
    lags: int = 6,
    spacing: int = 6,
    horizon: int = 6,
    seed: int | None = None,
    dtype: torch.dtype = torch.float64,
    **series_options,
) -> MackeyGlassData:
    """Pedersen et al.'s task: x(k) = [z(k − horizon − j·spacing), j = 0 … lags − 1], y(k) = z(k).

    ``seed=None`` starts from the usual constant past z0 = 1.2; an int draws z0 uniformly from
    [0.5, 1.5] with its own ``numpy`` Generator (a different trajectory on the attractor).
    ``series_options`` go to :func:`mackey_glass`."""
    for name, v in (("n_train", n_train), ("n_test", n_test), ("lags", lags)):
        if not (isinstance(v, int) and v >= 1):
            raise ValueError(f"{name} must be a positive int, not {v!r}")
    if seed is not None:
        series_options["z0"] = float(np.random.default_rng(seed).uniform(0.5, 1.5))
    span = horizon + spacing * (lags - 1)
    z = mackey_glass(span + n_train + n_test, **series_options)
    k = np.arange(span, span + n_train + n_test)
    offsets = horizon + spacing * np.arange(lags)
    x = torch.tensor(z[k[:, None] - offsets[None, :]], dtype=dtype)
    y = torch.tensor(z[k, None], dtype=dtype)
    return MackeyGlassData(
        x[:n_train],
        y[:n_train],
        x[n_train:],
        y[n_train:],
        torch.tensor(z, dtype=dtype),
        float(series_options.get("z0", 1.2)),
    )
