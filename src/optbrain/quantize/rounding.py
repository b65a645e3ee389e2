"""Round to nearest on the grids of a weight matrix: the algorithm of :class:`~.rtn.RTN`, and
the reference error every quantiser's report compares with."""

from __future__ import annotations

import torch
from torch import Tensor

from .grid import QuantSpec, fit_grid, group_count, quantize_codes
from .result import QuantizedMatrix

__all__ = ["rtn"]


def rtn(W: Tensor, spec: QuantSpec) -> QuantizedMatrix:
    """Round ``W`` (rows × k) to the nearest grid point, grids per row or per group."""
    rows, k = W.shape
    n_groups = group_count(k, spec.group_size)
    g = k if spec.group_size is None else spec.group_size
    scale = torch.empty(rows, n_groups, dtype=W.dtype, device=W.device)
    zero = torch.empty(rows, n_groups, dtype=torch.uint8, device=W.device)
    codes = torch.empty(rows, k, dtype=torch.uint8, device=W.device)
    for i in range(n_groups):
        cols = slice(i * g, min((i + 1) * g, k))
        s, z = fit_grid(W[:, cols], spec.bits, spec.sym)
        scale[:, i], zero[:, i] = s, z.to(torch.uint8)
        codes[:, cols] = quantize_codes(W[:, cols], s[:, None], z[:, None], spec.maxq).to(
            torch.uint8
        )
    g_idx = torch.arange(k, device=W.device) // g
    return QuantizedMatrix(codes, scale, zero, g_idx)
