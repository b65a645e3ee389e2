"""What quantising produces: integer codes with their grids, per matrix and per layer, and the
per-layer report that :meth:`optbrain.quantize.Quantizer.apply` returns."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .grid import dequantize

__all__ = ["LayerReport", "QuantReport", "QuantizedLayer", "QuantizedMatrix"]


@dataclass
class QuantizedMatrix:
    """A quantised ``rows × k`` matrix.

    ``codes`` (rows × k, uint8 in [0, 2^bits − 1]); ``scale`` (rows × groups, the solve's float
    dtype) and ``zero`` (rows × groups, uint8) are the grids; ``g_idx`` (k, long) says which grid
    each column uses. ``damping`` is the absolute λ the solver added to H (0 for RTN);
    ``kept`` the entries that may be non-zero (None: all).
    """

    codes: Tensor
    scale: Tensor
    zero: Tensor
    g_idx: Tensor
    damping: float = 0.0
    kept: Tensor | None = None

    def weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """The grid values (codes − zero)·scale, in ``dtype`` (default: the scale's)."""
        dtype = dtype or self.scale.dtype
        idx = self.g_idx
        return dequantize(self.codes, self.scale[:, idx], self.zero[:, idx], dtype)


@dataclass
class QuantizedLayer:
    """The codes and grids of one layer, stacked over its weight groups (convolution groups;
    1 for Linear): ``codes`` G × rows × k, ``scale``/``zero`` G × rows × groups, ``g_idx`` G × k.
    The dequantised weight matrix is ``(codes − zero[g_idx]) · scale[g_idx]``."""

    bits: int
    codes: Tensor
    scale: Tensor
    zero: Tensor
    g_idx: Tensor

    @classmethod
    def stack(cls, bits: int, parts: list[QuantizedMatrix], dtype: torch.dtype) -> QuantizedLayer:
        """Stack the matrices of a layer's groups; scales are stored in ``dtype`` (the weight's)."""
        return cls(
            bits,
            torch.stack([p.codes for p in parts]),
            torch.stack([p.scale.to(dtype) for p in parts]),
            torch.stack([p.zero for p in parts]),
            torch.stack([p.g_idx for p in parts]),
        )

    def matrix(self, dtype: torch.dtype | None = None) -> Tensor:
        """The dequantised weight as G × rows × k."""
        dtype = dtype or self.scale.dtype
        idx = self.g_idx[:, None, :].expand_as(self.codes)
        scale = torch.gather(self.scale, 2, idx)
        zero = torch.gather(self.zero, 2, idx)
        return dequantize(self.codes, scale, zero, dtype)


@dataclass
class LayerReport:
    """What was done to one layer.

    ``error`` is the calibration reconstruction error (1/n)‖(W − Ŵ)X‖²_F after the method,
    ``error_rtn`` that of rounding every weight to the nearest point of the same kind of grid
    (the error "before" compensation), ``output_energy`` (1/n)‖WX‖²_F (so ``error /
    output_energy`` is a relative error); all NaN without calibration data. ``groups`` is the
    number of grids per row (per weight group), ``last_group`` the columns of the last one.
    """

    layer: str
    kind: str
    shape: tuple[int, ...]
    rows: int
    columns: int
    method: str
    bits: int
    group_size: int | None
    groups: int
    last_group: int
    sym: bool
    act_order: bool
    static_groups: bool
    error: float = math.nan
    error_rtn: float = math.nan
    output_energy: float = math.nan
    calibration_rows: int = 0
    dead_inputs: int = 0
    damping: float = 0.0
    sparsity: float = 0.0
    seconds: float = 0.0
    quantized: QuantizedLayer | None = field(default=None, repr=False)

    @property
    def relative_error(self) -> float:
        e = self.output_energy
        return self.error / e if e and math.isfinite(e) else math.nan

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "quantized"}
        out["shape"] = list(self.shape)
        out["relative_error"] = self.relative_error
        return out


@dataclass
class QuantReport:
    """Per-layer reports of one :meth:`~optbrain.quantize.Quantizer.apply`, in the order the
    layers were quantised, and the layers left alone with the reason (``skipped``)."""

    method: str
    spec: dict[str, Any]
    layers: dict[str, LayerReport] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    stages: list[list[str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def error(self) -> float:
        """Sum of the layers' reconstruction errors."""
        return float(sum(r.error for r in self.layers.values()))

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "spec": dict(self.spec),
            "layers": {k: r.to_dict() for k, r in self.layers.items()},
            "skipped": dict(self.skipped),
            "stages": [list(s) for s in self.stages],
            "seconds": self.seconds,
        }

    def table(self) -> str:
        """A markdown table: one row per layer."""
        head = (
            "| layer | kind | rows × cols | bits | grids/row | error | RTN error | relative | "
            "sparsity | s |"
        )
        lines = [head, "|---|---|---|---|---|---|---|---|---|---|"]
        for r in self.layers.values():
            lines.append(
                f"| {r.layer} | {r.kind} | {r.rows} × {r.columns} | {r.bits} | {r.groups} | "
                f"{r.error:.4g} | {r.error_rtn:.4g} | {r.relative_error:.3g} | "
                f"{r.sparsity:.2f} | {r.seconds:.2f} |"
            )
        for name, why in self.skipped.items():
            lines.append(f"| {name} | skipped: {why} | | | | | | | | |")
        return "\n".join(lines)
