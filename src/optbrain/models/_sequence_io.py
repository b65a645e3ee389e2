"""What the sequence models share: the B × T × 2 input layout and its checks, and the input /
output scaling held in buffers (:mod:`optbrain.models.sysid`, :mod:`optbrain.models.rnn_sysid`)."""

from __future__ import annotations

import math

import torch
import torch.fx
from torch import Tensor, nn

__all__ = ["ScaledSequenceModel", "check_sequence_input", "order_arg"]


def check_sequence_input(x: Tensor, start: int, channels: int = 2) -> None:
    """``x`` must be a floating B × T × ``channels`` tensor with T > ``start``. (Skipped while
    torch.fx traces the model — the curvature's graph engine — where ``x`` is a symbol.)"""
    if isinstance(x, torch.fx.Proxy):
        return
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, not {type(x).__name__}")
    if x.dim() != 3 or x.shape[2] != channels:
        raise ValueError(
            f"x must be batch × time × {channels} (u, measured y); got shape {tuple(x.shape)}"
        )
    if x.shape[1] <= start:
        raise ValueError(
            f"the sequence has {x.shape[1]} samples but the model needs more than {start} (its "
            "orders / warm-up) to predict anything"
        )


def order_arg(name: str, value: int, minimum: int) -> int:
    """``value`` if it is an int >= ``minimum``, else a ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, not {value!r}")
    return value


class ScaledSequenceModel(nn.Module):
    """Base of the sequence models: the affine scaling of input and output, held in buffers.

    z = (v − offset)/scale for the input u and the output y before the network, and back for the
    output after it (``u_offset``, ``u_scale``, ``y_offset``, ``y_scale``: not trained, not
    pruned)."""

    def __init__(self, u_scaling: tuple[float, float], y_scaling: tuple[float, float]):
        super().__init__()
        for name, (off, scale) in (("u", u_scaling), ("y", y_scaling)):
            if not (math.isfinite(off) and math.isfinite(scale) and scale > 0):
                raise ValueError(
                    f"{name}_scaling must be finite (offset, scale > 0), not {(off, scale)}"
                )
            self.register_buffer(f"{name}_offset", torch.tensor(float(off)))
            self.register_buffer(f"{name}_scale", torch.tensor(float(scale)))

    @torch.no_grad()
    def fit_scaling(self, u: Tensor, y: Tensor) -> ScaledSequenceModel:
        """Set offsets and scales to the mean and standard deviation of ``u`` and ``y``."""
        for name, v in (("u", u), ("y", y)):
            v = torch.as_tensor(v, dtype=torch.float64).reshape(-1)
            sd = float(v.std()) if v.numel() > 1 else 0.0
            if not math.isfinite(sd) or sd <= 0:
                raise ValueError(f"cannot scale {name}: its standard deviation is {sd}")
            getattr(self, f"{name}_offset").fill_(float(v.mean()))
            getattr(self, f"{name}_scale").fill_(sd)
        return self

    def _scaled(self, x: Tensor) -> tuple[Tensor, Tensor]:
        u = (x[..., 0] - self.u_offset) / self.u_scale
        y = (x[..., 1] - self.y_offset) / self.y_scale
        return u, y

    def _unscaled(self, ys: Tensor) -> Tensor:
        return (ys * self.y_scale + self.y_offset).unsqueeze(-1)
