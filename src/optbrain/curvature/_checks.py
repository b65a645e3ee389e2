"""Finiteness checks shared by the estimators."""

from __future__ import annotations

import math

import torch


def all_finite(values: list[torch.Tensor]) -> bool:
    """Whether every entry of every tensor is finite.

    Fast path: a finite sum proves every entry finite (a NaN or inf entry makes the sum NaN or
    inf); only a non-finite sum, which may also be a mere overflow, needs the entry-wise check.
    """
    sums = [v.sum() for v in values]
    if len({s.device for s in sums}) == 1:
        total = float(torch.stack(sums).sum())
    else:
        total = sum(float(s) for s in sums)
    if math.isfinite(total):
        return True
    return all(bool(torch.isfinite(v).all()) for v in values)
