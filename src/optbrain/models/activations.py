"""Activation modules used by the reference architectures."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["LeCunTanh"]


class LeCunTanh(nn.Module):
    """LeCun's scaled hyperbolic tangent ``f(x) = 1.7159 · tanh(2x/3)`` (so ``f(±1) ≈ ±1``)."""

    amplitude = 1.7159
    slope = 2.0 / 3.0

    def forward(self, x: Tensor) -> Tensor:
        return self.amplitude * torch.tanh(self.slope * x)
