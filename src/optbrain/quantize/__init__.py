"""Hessian-aware post-training quantisation: RTN, GPTQ, OBQ and joint sparse + quantised
compression on the layer-wise calibration Hessians of :mod:`optbrain.layerwise` (PAPERS.md
§11.1, §14.5).

One interface::

    from optbrain.quantize import GPTQ, save_quantized, load_quantized
    report = GPTQ(bits=4, group_size=128, act_order=True).apply(model, calibration_batches)
    print(report.table())                     # per layer: bits, grids, error before/after
    info = save_quantized(model, report, "model.q4.pt")   # packed codes, scales, zero points
    fresh = load_quantized(build_model(), "model.q4.pt")  # layers dequantise on the fly

Files: ``grid.py`` (grids, :class:`QuantSpec`), ``rtn.py``, ``gptq.py``, ``obq.py``, ``joint.py``
(the methods, each a matrix-level function and a :class:`Quantizer`), ``base.py`` (the
model-level ``apply``), ``layers.py`` (which layers), ``calibrate.py`` (sequential block
calibration), ``result.py`` (codes and reports), ``packing.py``, ``qlayers.py`` (layers that
dequantise on the fly), ``export.py`` (the file), ``task.py`` (``optbrain quantize``).
"""

from .base import QuantizationError, Quantizer
from .export import ExportInfo, load_quantized, save_quantized
from .gptq import GPTQ, gptq
from .grid import QuantSpec, dequantize, fit_grid, quantize_codes
from .joint import Joint
from .obq import OBQ, obq
from .qlayers import QuantConv, QuantLinear
from .result import LayerReport, QuantizedLayer, QuantizedMatrix, QuantReport
from .rtn import RTN, rtn

__all__ = [
    "GPTQ",
    "OBQ",
    "RTN",
    "ExportInfo",
    "Joint",
    "LayerReport",
    "QuantConv",
    "QuantLinear",
    "QuantReport",
    "QuantSpec",
    "QuantizationError",
    "QuantizedLayer",
    "QuantizedMatrix",
    "Quantizer",
    "dequantize",
    "fit_grid",
    "gptq",
    "load_quantized",
    "obq",
    "quantize_codes",
    "rtn",
    "save_quantized",
]
