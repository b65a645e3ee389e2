"""The yearly sunspot benchmark as tapped-delay regression data (PAPERS.md §6, §12).

statsmodels ships the series (``statsmodels.datasets.sunspots``: years 1700–2008, no download).
With ``lags`` = 12 the input of year t is the activity of years t−12 … t−1 and the target that of
year t; targets 1712–1920 are the training set (209 patterns), 1921–1955 and 1956–1979 the two
test sets (35 and 24), the convention of Weigend et al., Nowlan & Hinton, Waterhouse & Robinson.
Errors are reported as NMSE: mean squared error over the *population* variance (ddof = 0) of the
whole 1700–1979 record, ≈ 1495.6 (:data:`NMSE_VARIANCE`; whether the original papers used exactly
this series and variance is not verified).

Inputs and targets are scaled by one affine map, (v − offset)/scale, with the mean and standard
deviation of the training years 1700–1920 by default (``standardize=False``: raw values;
``scale=s``: v/s without centring, e.g. :data:`NNSYSID_SCALE` for the series of NNSYSID's sunspot
demo); :meth:`SunspotData.nmse` turns a mean squared error on that scale back into an NMSE.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "NMSE_VARIANCE",
    "NNSYSID_SCALE",
    "SPLITS",
    "SunspotData",
    "load_sunspots",
    "sunspot_series",
]

SPLITS = {"train": (1700, 1920), "test1": (1921, 1955), "test2": (1956, 1979)}
"""Year ranges of the splits (targets; the training range also supplies the first lags)."""

NMSE_VARIANCE = 1495.5937651785714
"""Population variance of the activity over 1700–1979 (statsmodels' series): the NMSE divisor."""

NNSYSID_SCALE = 191.2
"""NNSYSID's ``solplet.asc`` holds the activity divided by this (1957: 190.2 → 0.9947; 1700:
5 → 0.0262): the scale of the data its sunspot pruning demo trains on."""


def sunspot_series() -> tuple[np.ndarray, np.ndarray]:
    """(years, activity) as float64 arrays, 1700–2008, from statsmodels."""
    try:
        from statsmodels.datasets import sunspots
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the sunspot data ship with statsmodels: pip install 'optbrain[data]'"
        ) from exc
    frame = sunspots.load_pandas().data
    return frame["YEAR"].to_numpy(np.float64), frame["SUNACTIVITY"].to_numpy(np.float64)


@dataclass
class SunspotData:
    """Lagged patterns per split (``x``: n × lags, oldest lag first; ``y``: n × 1), scaled;
    ``years`` are the target years of each split."""

    x: dict[str, Tensor]
    y: dict[str, Tensor]
    years: dict[str, Tensor]
    lags: int
    offset: float
    scale: float
    variance: float  # population variance of 1700–1979, raw units

    def nmse(self, mse: float) -> float:
        """NMSE of a mean squared error computed on the scaled targets."""
        return mse * self.scale**2 / self.variance


def load_sunspots(
    lags: int = 12,
    standardize: bool = True,
    dtype: torch.dtype = torch.float64,
    *,
    scale: float | None = None,
) -> SunspotData:
    """The 1700–1920 / 1921–1955 / 1956–1979 splits with ``lags`` previous years as inputs.

    ``scale`` (> 0) divides the activity by it without centring (overrides ``standardize``)."""
    if not isinstance(lags, int) or not 1 <= lags <= 100:
        raise ValueError(f"lags must be an int in 1..100, not {lags!r}")
    if scale is not None and not (isinstance(scale, (int, float)) and scale > 0):
        raise ValueError(f"scale must be a number > 0, not {scale!r}")
    years, act = sunspot_series()
    record = act[(years >= 1700) & (years <= 1979)]
    variance = float(record.var())
    train_years = act[(years >= SPLITS["train"][0]) & (years <= SPLITS["train"][1])]
    if scale is not None:
        offset, scale = 0.0, float(scale)
    elif standardize:
        offset, scale = float(train_years.mean()), float(train_years.std())
    else:
        offset, scale = 0.0, 1.0
    scaled = (act - offset) / scale
    xs, ys, ts = {}, {}, {}
    for name, (lo, hi) in SPLITS.items():
        first = max(lo, int(years[0]) + lags) if name == "train" else lo
        idx = np.nonzero((years >= first) & (years <= hi))[0]
        window = np.stack([scaled[i - lags : i] for i in idx])
        xs[name] = torch.tensor(window, dtype=dtype)
        ys[name] = torch.tensor(scaled[idx, None], dtype=dtype)
        ts[name] = torch.tensor(years[idx], dtype=torch.int64)
    return SunspotData(xs, ys, ts, lags, float(offset), float(scale), variance)
