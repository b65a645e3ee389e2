"""Round to nearest (RTN): every weight to the nearest point of its row's (group's) grid.

The baseline of the GPTQ paper (PAPERS.md §14.5): no calibration data, no compensation. Groups
are consecutive columns in their natural order.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Quantizer
from .grid import QuantSpec, fit_grid, group_count, quantize_codes
from .result import QuantizedMatrix

__all__ = ["RTN", "rtn"]


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


class RTN(Quantizer):
    """Round-to-nearest quantiser: ``RTN(bits=4, group_size=None, sym=False).apply(model,
    calibration=None)``. Calibration data is optional: with it the report holds the layers'
    reconstruction errors. ``act_order`` and ``static_groups`` have no effect (no H)."""

    method = "rtn"
    needs_calibration = False

    def quantize_matrix(
        self, W: Tensor, H: Tensor | None, dead: Tensor | None, kept: Tensor | None
    ) -> QuantizedMatrix:
        q = rtn(W, self.spec)
        if kept is not None:  # pruned entries stay exactly 0 (code = zero)
            idx = q.g_idx
            q.codes = torch.where(kept, q.codes, q.zero[:, idx])
            q.kept = kept
        return q
