"""A polynomial NARMAX baseline fitted by sysidentpy (FROLS structure selection), run in
simulation mode on the same sequences as the neural models.

For each (polynomial degree, lag) in a small grid, FROLS (forward regression with orthogonal least
squares, the error-reduction ratio ranking terms, the number of terms chosen by the AIC among the
first ``max_terms``) fits y(k) = Σ θ_i φ_i(y(k−1…k−lag), u(k−1…k−lag)) by least squares on the
training sequence (inputs and outputs scaled to zero mean and unit variance by the training
data); the model is then simulated free-run on the validation and test sequences from their
measured initial conditions. The grid point with the lowest finite validation error is kept. The
optional dependency is ``pip install 'optbrain[sysid]'``.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["available", "fit_narmax"]


def available() -> bool:
    """Whether sysidentpy can be imported."""
    try:
        import sysidentpy  # noqa: F401
    except ImportError:
        return False
    return True


def _mse(pred: np.ndarray, y: np.ndarray, start: int) -> float:
    err = pred[start:, 0] - y[start:, 0]
    with np.errstate(over="ignore", invalid="ignore"):
        value = float(np.mean(err * err))
    return value if math.isfinite(value) else math.inf


def _one(degree: int, lag: int, max_terms: int, train, splits, start: int) -> dict[str, Any]:
    from sysidentpy.basis_function import Polynomial
    from sysidentpy.model_structure_selection import FROLS
    from sysidentpy.parameter_estimation import LeastSquares

    u0, y0 = train.u.double().numpy(), train.y.double().numpy()
    um, us, ym, ys = u0.mean(), u0.std(), y0.mean(), y0.std()
    model = FROLS(
        order_selection=True,
        n_info_values=max_terms,
        ylag=lag,
        xlag=lag,
        info_criteria="aic",
        estimator=LeastSquares(),
        basis_function=Polynomial(degree=degree),
        model_type="NARMAX",
    )
    t0 = time.perf_counter()
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")  # sysidentpy warns about collinear candidate terms
        model.fit(X=(u0 - um) / us, y=(y0 - ym) / ys)
        out: dict[str, Any] = {"degree": degree, "lag": lag, "terms": len(model.final_model)}
        for seq, targets in splits.values():
            u, y = seq.u.double().numpy(), seq.y.double().numpy()
            sim = model.predict(X=(u - um) / us, y=((y - ym) / ys)[: model.max_lag]) * ys + ym
            for key, target in targets.items():
                out[key] = _mse(sim, target.double().numpy(), start)
    out["seconds"] = time.perf_counter() - t0
    return out


def fit_narmax(
    data,
    degrees: Sequence[int] = (2, 3),
    lags: Sequence[int] = (2, 3),
    *,
    start: int = 0,
    max_terms: int = 30,
) -> dict[str, Any]:
    """Fit the grid on ``data`` (a :class:`~optbrain.data.ph_reactor.PHSequences`) and return the
    best point's ``degree``, ``lag``, ``terms``, ``val_loss``, ``test_loss``, ``test_clean_loss``
    (simulation MSE over k ≥ ``start``; ``inf`` where the simulation diverged) and ``grid`` (every
    point's numbers)."""
    splits = {
        "val": (data.val, {"val_loss": data.val.y}),
        "test": (data.test, {"test_loss": data.test.y, "test_clean_loss": data.test.y_clean}),
    }
    grid = [_one(d, lag, max_terms, data.train, splits, start) for d in degrees for lag in lags]
    best = min(grid, key=lambda g: g["val_loss"])
    return {**best, "grid": grid}
