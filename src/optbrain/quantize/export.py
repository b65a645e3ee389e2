"""Export a quantised model: packed integer weights, scales and zero points in one file.

The file (written with ``torch.save``, read with ``torch.load(weights_only=True)``: tensors,
numbers, strings, lists and dicts only) holds::

    {"format": "optbrain-quantized", "version": 1,
     "layers": {path: {"kind": "Linear" | "Conv1d" | "Conv2d" | "Conv1D", "bits": b,
                       "grids": grids per row, "shape": [weight shape]}},
     "state": the model's state dict with each quantised layer's float ``weight`` replaced by
              ``qweight`` (uint8, packed codes, b bits each), ``scale`` (G × rows × grids, the
              weight's dtype), ``qzero`` (uint8, packed zero codes) and ``g_idx`` (int32, G × k),
     "report": the QuantReport as a dict (JSON types)}

:func:`load_quantized` replaces those layers of a freshly built model of the same architecture
by :class:`~optbrain.quantize.qlayers.QuantLinear` / ``QuantConv`` modules and loads the state
(strictly): the loaded model computes exactly what the in-memory quantised model computed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .. import safeload
from ..errors import UnsafeFileError
from ..jsonio import atomic_write, to_jsonable
from .layers import layer_kind
from .qlayers import QuantConv, QuantLinear, quantized_module
from .result import QuantReport

__all__ = ["FORMAT", "ExportInfo", "load_quantized", "save_quantized"]

FORMAT = "optbrain-quantized"
VERSION = 1


@dataclass
class ExportInfo:
    """What :func:`save_quantized` wrote: ``bytes`` on disk, ``float_bytes`` of the float
    model's state dict (for comparison), ``quantized_weights`` (entries) and the ``packed_bytes``
    of their codes, scales and zero points (so ``8·packed_bytes/quantized_weights`` bits per
    weight)."""

    path: Path
    bytes: int
    float_bytes: int
    quantized_weights: int
    packed_bytes: int

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.packed_bytes / max(1, self.quantized_weights)

    @property
    def ratio(self) -> float:
        """File size over the float model's state."""
        return self.bytes / max(1, self.float_bytes)

    def to_dict(self) -> dict:
        return {
            "path": str(self.path),
            "bytes": self.bytes,
            "float_bytes": self.float_bytes,
            "quantized_weights": self.quantized_weights,
            "packed_bytes": self.packed_bytes,
            "bits_per_weight": self.bits_per_weight,
            "ratio": self.ratio,
        }


def _prefix(path: str) -> str:
    return f"{path}." if path else ""


def save_quantized(
    model: nn.Module, report: QuantReport, path: str | Path, *, overwrite: bool = False
) -> ExportInfo:
    """Write ``model`` (quantised in memory by ``quantizer.apply``, whose ``report`` holds the
    codes) to ``path`` in the format above; an existing file is replaced only with
    ``overwrite=True``."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    state = model.state_dict()
    float_bytes = sum(t.numel() * t.element_size() for t in state.values())
    layers: dict[str, dict] = {}
    n_weights = packed = 0
    for name, rep in report.layers.items():
        if rep.quantized is None:
            raise ValueError(f"the report holds no codes for layer {name!r}")
        if not name:
            raise ValueError("a bare layer cannot be exported: wrap it, e.g. nn.Sequential(layer)")
        module = model.get_submodule(name)
        q = quantized_module(module, rep.bits, rep.quantized.scale.shape[-1])
        q.set_quantized(rep.quantized)
        if not torch.equal(q.weight, module.weight.detach()):
            raise ValueError(
                f"layer {name!r} no longer holds the weights the report's codes describe "
                "(changed after quantising?)"
            )
        del state[_prefix(name) + "weight"]
        for key, value in q.state_dict().items():
            state[_prefix(name) + key] = value
        layers[name] = {
            "kind": layer_kind(module),
            "bits": rep.bits,
            "grids": int(rep.quantized.scale.shape[-1]),
            "shape": list(module.weight.shape),
        }
        n_weights += module.weight.numel()
        packed += sum(t.numel() * t.element_size() for t in (q.qweight, q.scale, q.qzero))
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "layers": layers,
        "state": state,
        "report": to_jsonable(report.to_dict()),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: torch.save(payload, tmp))
    return ExportInfo(path, os.path.getsize(path), float_bytes, n_weights, packed)


def load_quantized(model: nn.Module, path: str | Path, map_location=None) -> nn.Module:
    """Load a file written by :func:`save_quantized` into ``model`` (a fresh instance of the same
    architecture, float weights): its quantised layers become packed layers that dequantise on
    the fly; returns ``model``. A file holding pickled code or objects raises
    :class:`~optbrain.errors.UnsafeFileError` without running it (as ``load_pruned``)."""
    try:
        payload = safeload.load(path, map_location=map_location or "cpu")
    except UnsafeFileError:
        raise
    except Exception as exc:  # noqa: BLE001 - re-raised with the cause named
        raise ValueError(f"cannot read quantised model {path}: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not an optbrain quantised-model file")
    if payload.get("version") != VERSION:
        raise ValueError(f"{path} has format version {payload.get('version')}, not {VERSION}")
    for name, meta in payload["layers"].items():
        if not name:
            raise ValueError("the file's model is a bare layer: load it into a container module")
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(
                f"the model has no layer {name!r} (saved from another model?)"
            ) from None
        if isinstance(module, (QuantLinear, QuantConv)):
            raise ValueError(f"layer {name!r} is already quantised: load into a fresh model")
        kind = layer_kind(module)
        if kind != meta["kind"] or list(module.weight.shape) != list(meta["shape"]):
            raise ValueError(
                f"layer {name!r} is a {kind} of weight shape {list(module.weight.shape)}, the "
                f"file's a {meta['kind']} of {meta['shape']}"
            )
        model.set_submodule(name, quantized_module(module, int(meta["bits"]), int(meta["grids"])))
    model.load_state_dict(payload["state"], strict=True)
    return model
