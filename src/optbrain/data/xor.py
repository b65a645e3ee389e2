"""The XOR problem: the four patterns of two binary inputs (Hassibi & Stork 1993, §5).

Inputs are 0/1. Targets are ``low`` for the two patterns with equal inputs and ``high`` for the
others. The default ``low=0.1, high=0.9`` is the usual choice for a sigmoid output unit: those
values are reached at *finite* weights, so "trained to zero error" is a real minimum of the
squared error, where the gradient vanishes and the Gauss–Newton matrix equals the Hessian — the
setting in which OBS's quadratic model is derived. ``low=0, high=1`` gives the textbook targets,
which a sigmoid only approaches as the weights grow without bound.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["xor_data", "xor_solved"]


def xor_data(
    low: float = 0.1, high: float = 0.9, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """``(X, Y)``: ``X`` is 4×2 (rows 00, 01, 10, 11), ``Y`` is 4×1 (``low, high, high, low``)."""
    if not low < high:
        raise ValueError(f"need low < high, got low={low!r}, high={high!r}")
    x = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]], dtype=dtype)
    y = torch.tensor([[low], [high], [high], [low]], dtype=dtype)
    return x, y


def xor_solved(outputs: Tensor, targets: Tensor, tolerance: float | None = None) -> bool:
    """Whether ``outputs`` solve XOR: every output on the target's side of the midpoint of the
    two target values (zero classification error); with ``tolerance``, every output also within
    ``tolerance`` of its target."""
    outputs, targets = outputs.reshape(-1), targets.reshape(-1)
    if outputs.shape != targets.shape:
        raise ValueError(
            f"outputs have {outputs.numel()} entries, targets {targets.numel()}; need one each"
        )
    mid = 0.5 * (float(targets.min()) + float(targets.max()))
    ok = bool(((outputs > mid) == (targets > mid)).all())
    if tolerance is not None:
        ok &= bool(((outputs - targets).abs() < tolerance).all())
    return ok
