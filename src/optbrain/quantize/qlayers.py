"""Layers that hold packed integer weights and dequantise them on the fly.

:class:`QuantLinear` replaces an ``nn.Linear`` (or a ``transformers`` Conv1D, ``transposed``),
:class:`QuantConv` an ``nn.Conv1d``/``nn.Conv2d``. Their buffers are the packed codes
``qweight`` (:mod:`~optbrain.quantize.packing`, ``bits`` per weight), the grids' ``scale``
(G × rows × grids, the original weight's dtype) and packed ``qzero`` codes, and ``g_idx``
(G × k, each column's grid); the bias stays a float parameter. ``layer.weight`` is computed
from them by :func:`~optbrain.quantize.grid.dequantize` (the formula the in-memory quantiser
writes with), and ``forward`` runs the original module's own computation on it, so a loaded
model's outputs equal the in-memory quantised model's bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..curvature.calibration import is_transposed_linear
from .packing import pack, packed_bytes, unpack
from .result import QuantizedLayer

__all__ = ["QuantConv", "QuantLinear", "quantized_module"]


class _Packed(nn.Module):
    """Buffers of a packed weight matrix ``G × rows × k`` and its dequantisation."""

    def _init_buffers(
        self, bits: int, G: int, rows: int, k: int, n_grids: int, dtype: torch.dtype
    ) -> None:
        self.bits, self.shape_grk, self.n_grids = bits, (G, rows, k), n_grids
        self.register_buffer(
            "qweight", torch.zeros(packed_bytes(G * rows * k, bits), dtype=torch.uint8)
        )
        self.register_buffer("scale", torch.zeros(G, rows, n_grids, dtype=dtype))
        self.register_buffer(
            "qzero", torch.zeros(packed_bytes(G * rows * n_grids, bits), dtype=torch.uint8)
        )
        self.register_buffer("g_idx", torch.zeros(G, k, dtype=torch.int32))

    def set_quantized(self, q: QuantizedLayer) -> None:
        """Fill the buffers from a layer's codes and grids."""
        if tuple(q.codes.shape) != self.shape_grk or q.scale.shape[-1] != self.n_grids:
            raise ValueError(
                f"quantised codes of shape {tuple(q.codes.shape)} with {q.scale.shape[-1]} grids "
                f"do not fit a layer of {self.shape_grk} with {self.n_grids} grids"
            )
        with torch.no_grad():
            self.qweight.copy_(pack(q.codes, self.bits))
            self.scale.copy_(q.scale)
            self.qzero.copy_(pack(q.zero, self.bits))
            self.g_idx.copy_(q.g_idx)

    def quantized(self) -> QuantizedLayer:
        """The codes and grids, unpacked."""
        G, rows, k = self.shape_grk
        codes = unpack(self.qweight, self.bits, G * rows * k).reshape(G, rows, k)
        zero = unpack(self.qzero, self.bits, G * rows * self.n_grids).reshape(G, rows, -1)
        return QuantizedLayer(self.bits, codes, self.scale, zero, self.g_idx.long())

    def weight_matrix(self) -> Tensor:
        return self.quantized().matrix(self.scale.dtype)


class QuantLinear(_Packed):
    """A Linear layer (``transposed``: a ``transformers`` Conv1D) with packed weights."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        n_grids: int = 1,
        bias: bool = True,
        transposed: bool = False,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        self.in_features, self.out_features, self.transposed = in_features, out_features, transposed
        self._init_buffers(bits, 1, out_features, in_features, n_grids, dtype)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None

    @property
    def weight(self) -> Tensor:
        """The dequantised weight, in the original layout (in × out when ``transposed``)."""
        W = self.weight_matrix()[0]
        return W.t().contiguous() if self.transposed else W

    def forward(self, x: Tensor) -> Tensor:
        W = self.weight
        if not self.transposed:
            return F.linear(x, W, self.bias)
        size_out = x.shape[:-1] + (self.out_features,)  # transformers' Conv1D.forward
        x2 = x.view(-1, x.shape[-1])
        y = torch.addmm(self.bias, x2, W) if self.bias is not None else x2 @ W
        return y.view(size_out)

    def extra_repr(self) -> str:
        t = ", transposed" if self.transposed else ""
        sizes = f"in_features={self.in_features}, out_features={self.out_features}"
        return f"{sizes}, bits={self.bits}, grids={self.n_grids}{t}"


class QuantConv(_Packed):
    """A Conv1d / Conv2d layer with packed weights (its other settings copied)."""

    _KEYS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation")

    def __init__(self, conv: nn.Conv1d | nn.Conv2d, bits: int, n_grids: int = 1):
        super().__init__()
        for key in (*self._KEYS, "groups", "padding_mode", "_reversed_padding_repeated_twice"):
            setattr(self, key, getattr(conv, key))
        self._forward = type(conv)._conv_forward
        self.weight_shape = tuple(conv.weight.shape)
        G = conv.groups
        k = conv.weight[0].numel()
        self._init_buffers(bits, G, self.out_channels // G, k, n_grids, conv.weight.dtype)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone())

    @property
    def weight(self) -> Tensor:
        return self.weight_matrix().reshape(self.weight_shape)

    def forward(self, x: Tensor) -> Tensor:
        return self._forward(self, x, self.weight, self.bias)

    def extra_repr(self) -> str:
        conv = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}"
        return f"{conv}, groups={self.groups}, bits={self.bits}, grids={self.n_grids}"


def quantized_module(module: nn.Module, bits: int, n_grids: int) -> QuantLinear | QuantConv:
    """An empty packed twin of ``module`` (weights to be set or loaded)."""
    dtype = module.weight.dtype
    has_bias = getattr(module, "bias", None) is not None
    if is_transposed_linear(module):
        nx, nf = module.weight.shape
        q = QuantLinear(nx, nf, bits, n_grids, has_bias, transposed=True, dtype=dtype)
    elif isinstance(module, nn.Linear):
        q = QuantLinear(
            module.in_features, module.out_features, bits, n_grids, has_bias, dtype=dtype
        )
    elif isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return QuantConv(module, bits, n_grids)
    else:
        raise TypeError(f"cannot quantise a {type(module).__name__}")
    if has_bias:
        with torch.no_grad():
            q.bias.copy_(module.bias)
    return q
