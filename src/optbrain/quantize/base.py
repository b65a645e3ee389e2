"""The model-level interface every quantiser shares: ``quantizer.apply(model, calibration)``.

:class:`Quantizer` finds the layers (:mod:`optbrain.quantize.layers`), plans the calibration
stages (:mod:`optbrain.quantize.calibrate`), and for each layer of each stage takes the weight
as ``groups × rows × k`` matrices (convolution groups; ``transformers`` Conv1D transposed),
calls the method's :meth:`Quantizer.solve` on each with its calibration Hessian H = 2XXᵀ/n, and
writes the dequantised grid values back into the weight in place. The returned
:class:`~optbrain.quantize.result.QuantReport` lists per layer the bits, grids, the
reconstruction error after the method and with plain rounding (before compensation), and holds
the integer codes for :func:`optbrain.quantize.export.save_quantized`.

Bad input raises before any weight changes (bits, group size, damping, non-finite weights, no
layer to quantise, missing calibration data); an error during quantisation (calibration data
that never reaches a layer, a Hessian that cannot be factorised even damped, an interrupt)
restores every weight before it propagates.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from .. import distributed
from ..curvature.calibration import LayerHessian, weight_from_matrix, weight_matrix
from ..distributed import SINGLE, Shards
from ..errors import OptbrainError
from ..paramdict import restored_on_error
from ..problem import Problem
from .calibrate import SEQUENTIAL, Stage, as_batches, plan_stages, stage_hessians
from .grid import QuantSpec
from .layers import find_layers, layer_kind
from .result import LayerReport, QuantizedLayer, QuantizedMatrix, QuantReport

log = logging.getLogger(__name__)

__all__ = ["QuantizationError", "Quantizer"]

Progress = Callable[[int, int], None]


class QuantizationError(OptbrainError, ValueError):
    """A model cannot be quantised as asked (non-finite weights, no layer, no calibration data)."""


def _shards(calibration: object) -> Shards:
    """The ranks the calibration data is sharded over: a distributed Problem's; raw batches in
    a process group of several ranks are refused (they would give this rank's result only)."""
    if isinstance(calibration, Problem):
        return calibration.prepare().shards
    if calibration is not None:
        distributed.refuse(
            "quantisation calibrated on raw batches",
            "pass the calibration data as an optbrain.Problem (each rank's shard) instead",
        )
    return SINGLE


def refuse_act_order(spec: QuantSpec, who: str, why: str) -> None:
    """Raise ``ValueError`` when ``act_order=True`` was given to a quantiser that has no use for
    it (RTN, OBQ), rather than record an option that did nothing."""
    if spec.act_order:
        raise ValueError(
            f"act_order=True does not apply to {who}: {why}; act_order (columns by decreasing "
            "diag H) is GPTQ's option"
        )


def _error(delta: Tensor, H: Tensor) -> float:
    """Σ_rows ½ δᵀHδ = (1/n)‖δX‖²_F (products in δ's dtype, the sum in float64)."""
    return float(0.5 * ((delta @ H.to(delta.dtype)) * delta).sum(dtype=torch.float64))


class Quantizer:
    """Base of :class:`~optbrain.quantize.RTN`, :class:`~optbrain.quantize.GPTQ`,
    :class:`~optbrain.quantize.OBQ` and :class:`~optbrain.quantize.Joint`.

    Grid options (:class:`~optbrain.quantize.grid.QuantSpec`): ``bits`` (2–8), ``group_size``
    (None: one grid per output row), ``sym``, ``act_order``, ``static_groups``. ``damping``: λ =
    damping · mean(diag H) added to H's diagonal (1 %). Model-level options: ``layers`` (module
    paths or patterns to quantise; default all quantisable layers), ``exclude`` (paths or
    patterns to leave alone), ``sequential`` (``"block"``, ``"layer"`` or ``"none"``,
    :mod:`~optbrain.quantize.calibrate`), ``blocks`` (the block paths; default found
    automatically), ``dtype`` (precision of the solve; H is accumulated with a float64 sum),
    ``progress(done, total)`` called after each layer.
    """

    method = "base"
    needs_calibration = True

    def __init__(
        self,
        bits: int = 4,
        *,
        group_size: int | None = None,
        sym: bool = False,
        act_order: bool = False,
        static_groups: bool = False,
        damping: float = 0.01,
        layers: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        sequential: str = "block",
        blocks: Sequence[str] | None = None,
        dtype: torch.dtype = torch.float32,
        progress: Progress | None = None,
    ):
        self.spec = QuantSpec(bits, group_size, sym, act_order, static_groups)
        if isinstance(damping, bool) or not isinstance(damping, (int, float)):
            raise TypeError(f"damping must be a number, not {damping!r}")
        if not (damping >= 0 and math.isfinite(damping)):
            raise ValueError(f"damping must be a finite number >= 0, not {damping!r}")
        if sequential not in SEQUENTIAL:
            raise ValueError(f"sequential must be one of {SEQUENTIAL}, not {sequential!r}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, not {dtype!r}")
        for key, value in (("layers", layers), ("exclude", exclude), ("blocks", blocks)):
            if isinstance(value, str):
                raise TypeError(f"{key} must be a sequence of module paths, not a string")
        self.damping = float(damping)
        self.layers = None if layers is None else list(layers)
        self.exclude = list(exclude)
        self.sequential = sequential
        self.blocks = None if blocks is None else list(blocks)
        self.dtype = dtype
        self.progress = progress

    @property
    def bits(self) -> int:
        return self.spec.bits

    # ------------------------------------------------------------------ method hooks
    def quantize_matrix(
        self, W: Tensor, H: Tensor | None, dead: Tensor | None, kept: Tensor | None
    ) -> QuantizedMatrix:
        """Quantise one ``rows × k`` matrix (``H``: its k × k Hessian in ``W``'s dtype or None
        without calibration; ``dead``: inputs never active; ``kept``: entries that may stay
        non-zero, None = all)."""
        raise NotImplementedError

    def solve(self, W: Tensor, H: Tensor | None, dead: Tensor | None) -> QuantizedMatrix:
        """What the method does to one matrix (default: :meth:`quantize_matrix` of all)."""
        return self.quantize_matrix(W, H, dead, None)

    def describe(self) -> dict:
        """The settings, for the report."""
        out = {"method": self.method, **self.spec.to_dict(), "damping": self.damping}
        out.update(sequential=self.sequential, dtype=str(self.dtype).replace("torch.", ""))
        for key in ("blocksize", "outliers", "sparsity", "nm", "prune", "quantizer"):
            if hasattr(self, key):
                out[key] = getattr(self, key)
        return out

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.describe().items() if k != "method")
        return f"{type(self).__name__}({args})"

    # ------------------------------------------------------------------ the model
    def apply(self, model: nn.Module, calibration: object = None) -> QuantReport:
        """Quantise ``model``'s layers in place; returns the per-layer report (see the class).

        ``calibration``: input batches (a tensor, an ``(X, Y)`` pair, a Problem, or an iterable
        of tensors / ``(x, y)`` pairs / keyword dicts), re-read by every calibration stage."""
        start = time.perf_counter()
        targets, skipped = find_layers(model, self.layers, self.exclude)
        if not targets:
            why = "; ".join(f"{path or 'the model'} ({reason})" for path, reason in skipped.items())
            raise QuantizationError(
                "the model has no layer to quantise (Linear, Conv1d, Conv2d, transformers "
                f"Conv1D){'; skipped: ' + why if skipped else ''}"
            )
        for path, m in targets.items():
            if not bool(torch.isfinite(m.weight).all()):
                raise QuantizationError(f"layer {path!r} has NaN or infinite weights")
        batches = None if calibration is None else as_batches(calibration)
        shards = _shards(calibration)
        if batches is None and self.needs_calibration:
            raise QuantizationError(
                f"{type(self).__name__} needs calibration data (input batches of the model)"
            )
        if batches is None:
            stages = [Stage("", None, targets)]
        else:
            stages = plan_stages(model, targets, self.sequential, self.blocks)
        report = QuantReport(self.method, self.describe(), skipped=skipped)
        report.stages = [list(s.layers) for s in stages]
        with restored_on_error({p: m.weight for p, m in targets.items()}):
            for stage in stages:
                hs = {} if batches is None else stage_hessians(model, batches, stage, shards)
                for path, module in stage.layers.items():
                    report.layers[path] = self._layer(path, module, hs.get(path))
                    if self.progress is not None:
                        self.progress(len(report.layers), len(targets))
        report.seconds = time.perf_counter() - start
        log.info("%s: %d layers in %.1f s", self.method, len(report.layers), report.seconds)
        return report

    def _layer(self, path: str, module: nn.Module, h: LayerHessian | None) -> LayerReport:
        t0 = time.perf_counter()
        weight = module.weight.detach()
        W = weight_matrix(module, weight).to(self.dtype, copy=True)  # not a view: kept as W₀
        parts = []
        for g in range(W.shape[0]):
            H = None if h is None else h.H[g].to(self.dtype)
            parts.append(self.solve(W[g], H, None if h is None else h.dead[g]))
        quantized = QuantizedLayer.stack(self.bits, parts, weight.dtype)
        new = quantized.matrix(weight.dtype)
        if not bool(torch.isfinite(new).all()):  # never write NaN weights
            raise QuantizationError(f"layer {path!r}: quantising produced non-finite weights")
        with torch.no_grad():
            module.weight.copy_(weight_from_matrix(module, new))
        rows, k = W.shape[1:]
        kept = [p.kept for p in parts if p.kept is not None]
        rep = LayerReport(
            layer=path,
            kind=layer_kind(module),
            shape=tuple(weight.shape),
            rows=rows * W.shape[0],
            columns=k,
            method=self.method,
            bits=self.bits,
            group_size=self.spec.group_size,
            groups=self.spec.groups(k),
            last_group=k - (self.spec.groups(k) - 1) * (self.spec.group_size or k),
            sym=self.spec.sym,
            act_order=self.spec.act_order,
            static_groups=self.spec.static_groups,
            damping=max(p.damping for p in parts),
            sparsity=float(sum(int((~m).sum()) for m in kept)) / weight.numel() if kept else 0.0,
            quantized=quantized,
        )
        if h is not None:
            self._errors(rep, W, new.to(self.dtype), h)
        rep.seconds = time.perf_counter() - t0
        return rep

    def _errors(self, rep: LayerReport, W: Tensor, new: Tensor, h: LayerHessian) -> None:
        from .rounding import rtn

        err = err_rtn = energy = 0.0
        for g in range(W.shape[0]):
            H = h.H[g]
            err += _error(new[g] - W[g], H)
            err_rtn += _error(rtn(W[g], self.spec).weight(self.dtype) - W[g], H)
            energy += _error(W[g], H)
        rep.error, rep.error_rtn, rep.output_energy = err, err_rtn, energy
        rep.calibration_rows, rep.dead_inputs = h.n, int(h.dead.sum())
