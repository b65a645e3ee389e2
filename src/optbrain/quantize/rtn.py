"""Round to nearest (RTN): every weight to the nearest point of its row's (group's) grid.

The baseline of the GPTQ paper (PAPERS.md §14.5): no calibration data, no compensation. Groups
are consecutive columns in their natural order.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Quantizer, refuse_act_order
from .result import QuantizedMatrix
from .rounding import rtn

__all__ = ["RTN", "rtn"]


class RTN(Quantizer):
    """Round-to-nearest quantiser: ``RTN(bits=4, group_size=None, sym=False).apply(model,
    calibration=None)``. Calibration data is optional: with it the report holds the layers'
    reconstruction errors. ``static_groups`` has no effect (every grid is fitted on the original
    weights); ``act_order=True`` is refused (it orders columns by diag H, and RTN has no H)."""

    method = "rtn"
    needs_calibration = False

    def __init__(self, bits: int = 4, **kwargs):
        super().__init__(bits, **kwargs)
        refuse_act_order(self.spec, "RTN", "it rounds every weight on its own and uses no Hessian")

    def quantize_matrix(
        self, W: Tensor, H: Tensor | None, dead: Tensor | None, kept: Tensor | None
    ) -> QuantizedMatrix:
        q = rtn(W, self.spec)
        if kept is not None:  # pruned entries stay exactly 0 (code = zero)
            idx = q.g_idx
            q.codes = torch.where(kept, q.codes, q.zero[:, idx])
            q.kept = kept
        return q
