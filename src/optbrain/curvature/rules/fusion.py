"""Opt-in kernel fusion for the structured sweep's forward pass (no derivative math here).

The sweep needs no autograd graph, so where a Linear or Conv2d is followed by ``nn.Tanh`` or
``nn.Sigmoid`` it may run both as one of oneDNN's inference-only fused kernels — the
layer-plus-activation kernels ``torch.compile`` emits on CPU. Results equal the unfused path to
float32 rounding; ``torch.backends.mkldnn.enabled = False`` turns fusion off. The ops are private:
a failure falls back to the stock forward.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from .base import stock_forward

log = logging.getLogger(__name__)


def _onednn_op(name: str):
    """torch's inference-only oneDNN op ``torch.ops.mkldnn.<name>`` (the layer-plus-activation
    kernels that ``torch.compile`` emits on CPU), or None where this build lacks it."""
    try:
        return getattr(torch.ops.mkldnn, name)
    except (AttributeError, RuntimeError):  # pragma: no cover - depends on the torch build
        return None


_LINEAR_POINTWISE = _onednn_op("_linear_pointwise")
_CONV_POINTWISE = _onednn_op("_convolution_pointwise")


def _onednn_usable(x: Tensor, w: Tensor) -> bool:
    """oneDNN's fused kernels: float32 on CPU, input contiguous, oneDNN built and enabled."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and w.dtype == torch.float32
        and x.is_contiguous()
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
    )


def _call_onednn(op, *args) -> Tensor | None:
    """``op(*args)``, or None (the caller falls back to the stock forward) if it fails: these
    ops are private, and a torch release may change their signatures."""
    try:
        return op(*args)
    except (RuntimeError, TypeError) as exc:
        log.debug("oneDNN fused kernel unavailable, using the stock forward: %s", exc)
        return None


def linear_pointwise(m: nn.Module, x: Tensor, activation: str) -> Tensor | None:
    """``activation(m(x))`` for a stock ``nn.Linear`` on 2-D float32 CPU input in one oneDNN
    kernel; None where that does not apply (the caller uses the stock forward)."""
    if _LINEAR_POINTWISE is None or x.dim() != 2 or not stock_forward(m, nn.Linear):
        return None
    w = m.weight
    if not _onednn_usable(x, w):
        return None
    return _call_onednn(_LINEAR_POINTWISE, x, w, m.bias, activation, [], "")


def conv2d_pointwise(m: nn.Module, x: Tensor, activation: str) -> Tensor | None:
    """``activation(m(x))`` for a stock zero-padded ``nn.Conv2d`` on float32 CPU input in one
    oneDNN kernel (NCHW out); None where that does not apply."""
    if (
        _CONV_POINTWISE is None
        or x.dim() != 4
        or not stock_forward(m, nn.Conv2d)
        or m.padding_mode != "zeros"
        or isinstance(m.padding, str)
    ):
        return None
    w = m.weight
    if not _onednn_usable(x, w):
        return None
    args = (list(m.padding), list(m.stride), list(m.dilation), m.groups)
    out = _call_onednn(_CONV_POINTWISE, x, w, m.bias, *args, activation, [], "")
    return None if out is None else out.contiguous()  # NCHW, as the stock forward returns
