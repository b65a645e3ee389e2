"""Activation modules used by the reference architectures."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..curvature.rules import register_elementwise

__all__ = ["LeCunTanh"]


class LeCunTanh(nn.Module):
    """LeCun's scaled hyperbolic tangent ``f(x) = 1.7159 · tanh(2x/3)`` (so ``f(±1) ≈ ±1``)."""

    amplitude = 1.7159
    slope = 2.0 / 3.0

    def forward(self, x: Tensor) -> Tensor:
        return self.amplitude * torch.tanh(self.slope * x)


def _derivatives(m: LeCunTanh, a: Tensor, y: Tensor, second: bool):
    """f'(a) and f''(a) from y = f(a): f' = A·S·(1 − t²), f'' = −2·S·t·f' with t = y/A."""
    t = y / m.amplitude
    f1 = m.amplitude * m.slope * (1 - t * t)
    return f1, (-2 * m.slope * t * f1 if second else None)


register_elementwise(LeCunTanh, _derivatives)
