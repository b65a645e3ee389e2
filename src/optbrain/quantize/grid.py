"""Uniform quantisation grids: per output row (or per group of columns) min–max with 0 inside.

A grid of ``bits`` b has the 2^b points ``scale · (q − zero)``, q = 0 … maxq, maxq = 2^b − 1
(PAPERS.md §14.5, GPTQ's ``Quantizer``):

* asymmetric (default): with xmin = min(0, min x), xmax = max(0, max x) over the row (or group),
  ``scale = (xmax − xmin)/maxq`` and ``zero = round(−xmin/scale)``;
* symmetric: xmax = max(|xmin|, xmax), xmin = −xmax, ``zero = (maxq + 1)/2`` = 2^(b−1).
  (GPTQ's code keeps xmin = 0 for a row without negative entries, which halves the range such a
  row can use; here every symmetric grid spans [−xmax, xmax].)

A row (group) of zeros gets xmin = −1, xmax = 1. Since ``zero`` is an integer in [0, maxq], 0 is
always a grid point (code ``zero``): pruned weights and dead inputs stay exactly 0 when quantised.
``quantize`` rounds to the nearest point, ``q = clamp(round(x/scale) + zero, 0, maxq)``.

:class:`QuantSpec` holds the options shared by every method (bits, group size, symmetry, column
order, static groups); :func:`dequantize` is the one formula that turns codes back into weights,
used by the in-memory write-back and by the exported layers alike, so both give identical values.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor

__all__ = [
    "MAX_BITS",
    "MIN_BITS",
    "QuantSpec",
    "dequantize",
    "fit_grid",
    "group_count",
    "quantize_codes",
]

MIN_BITS = 2
MAX_BITS = 8


@dataclass(frozen=True)
class QuantSpec:
    """The grid options of a quantiser.

    ``bits``: 2–8. ``group_size``: None = one grid per output row ("per channel"); g = a grid for
    every g consecutive columns of a row (in the order the columns are processed; with
    ``act_order`` that is the permuted order unless ``static_groups``). When g does not divide
    the k columns, the last group holds the k mod g columns left (its own grid); g ≥ k is one
    group per row. ``sym``: symmetric grids. ``act_order``: process columns by decreasing
    diag H (GPTQ; ignored by RTN, which has no H, and by OBQ, whose order is greedy).
    ``static_groups``: fit every group's grid on the weights before any update, groups by the
    natural column order (GPTQ's ``static_groups``; OBQ's grids are always static).
    """

    bits: int = 4
    group_size: int | None = None
    sym: bool = False
    act_order: bool = False
    static_groups: bool = False

    def __post_init__(self) -> None:
        b = self.bits
        if isinstance(b, bool) or not isinstance(b, int) or not MIN_BITS <= b <= MAX_BITS:
            raise ValueError(f"bits must be an int from {MIN_BITS} to {MAX_BITS}, not {b!r}")
        g = self.group_size
        if g is not None and (isinstance(g, bool) or not isinstance(g, int) or g < 1):
            raise ValueError(f"group_size must be a positive int or None (per row), not {g!r}")
        for key in ("sym", "act_order", "static_groups"):
            if not isinstance(getattr(self, key), bool):
                raise TypeError(f"{key} must be a bool, not {getattr(self, key)!r}")

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def groups(self, k: int) -> int:
        """Grids per row for ``k`` columns."""
        return group_count(k, self.group_size)

    def to_dict(self) -> dict:
        return asdict(self)


def group_count(k: int, group_size: int | None) -> int:
    """Number of groups of ``group_size`` columns (the last one possibly smaller) in ``k``."""
    return 1 if group_size is None else max(1, -(-k // group_size))


def fit_grid(x: Tensor, bits: int, sym: bool = False) -> tuple[Tensor, Tensor]:
    """(scale, zero) of the min–max grid of each row of ``x`` (rows × m), both of shape (rows,)
    in ``x``'s dtype; ``zero`` holds integers."""
    maxq = 2**bits - 1
    zeros = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    xmin = torch.minimum(x.amin(1), zeros)
    xmax = torch.maximum(x.amax(1), zeros)
    if sym:
        xmax = torch.maximum(xmax, -xmin)
        xmin = -xmax
    flat = (xmin == 0) & (xmax == 0)
    xmin = torch.where(flat, -1.0, xmin)
    xmax = torch.where(flat, 1.0, xmax)
    scale = (xmax - xmin) / maxq
    if sym:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero = torch.round(-xmin / scale)
    return scale, zero


def quantize_codes(x: Tensor, scale: Tensor, zero: Tensor, maxq: int) -> Tensor:
    """Integer codes (as ``x``'s dtype) of the nearest grid points: clamp(round(x/s) + z)."""
    return torch.clamp(torch.round(x / scale) + zero, 0, maxq)


def dequantize(codes: Tensor, scale: Tensor, zero: Tensor, dtype: torch.dtype) -> Tensor:
    """Grid values ``(codes − zero) · scale`` in ``dtype`` (codes, zero: integers; shapes
    broadcast). The one formula every quantised weight is written with."""
    return (codes.to(dtype) - zero.to(dtype)) * scale.to(dtype)
