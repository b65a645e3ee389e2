"""How units pass through the layers of the graph (its leaves).

* ``Linear`` (on the last axis, any leading axes), ``Conv1d/2d/3d`` (``groups=1``; channel axis
  1) and ``Embedding``: *producers* — each output unit/channel is a new unit; a ``Linear``/``Conv``
  also *reads* units: its weight column(s) of an input unit are that unit's fan-out. A depthwise
  convolution (``groups = in = out channels``) keeps each channel's unit (its kernel is part of
  the unit's fan-in). Grouped convolutions block their units.
* ``BatchNorm`` and pooling: per channel (axis 1): the unit continues; BatchNorm's affine entries
  are fan-in, its running statistics are sliced with the unit.
* Element-wise activations, ``Dropout`` (eval), ``Identity``, ``Flatten``/``Unflatten``: the
  atoms pass (reshapes are evaluated on the atom maps).
* ``LayerNorm`` mixes the units it normalises (each output depends on every input through the
  mean and variance): those units are **blocked** (never removed; a request names the node).
  Normalising over dimensions that hold one unit each (e.g. the positions of one channel) keeps
  the units.
* Recurrent layers: :mod:`.recurrent`.
* Any other module: its units are blocked, naming the node.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..curvature.rules import ElementwiseRule
from .atoms import UnionFind, merge_along, mix_along
from .base import Records
from .call import Call, Read, along, block_inputs, fresh_blocked, same

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_POOL = (
    nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d,
)  # fmt: skip
_PASS = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
         nn.FeatureAlphaDropout)  # fmt: skip
_RESHAPE = (nn.Flatten, nn.Unflatten)
#: module types the reader keeps as leaves for cells although the curvature engine has no rule
EXTRA_LEAVES = (
    nn.Conv3d, nn.AvgPool3d, nn.MaxPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.LPPool1d, nn.LPPool2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
    nn.BatchNorm3d,
)  # fmt: skip


def kind(m: nn.Module) -> str:
    """The treatment of a leaf module (see the module docstring)."""
    if isinstance(m, nn.Linear):
        return "linear"
    if isinstance(m, _CONV):
        return "conv"
    if isinstance(m, _BN):
        return "batchnorm"
    if isinstance(m, _POOL):
        return "pool"
    if isinstance(m, _PASS):
        return "identity"
    if isinstance(m, _RESHAPE):
        return "reshape"
    if isinstance(m, nn.Embedding):
        return "embedding"
    if isinstance(m, nn.LayerNorm):
        return "layernorm"
    if isinstance(m, nn.RNNBase):
        return "recurrent"
    from ..curvature.rules.base import registered_rule

    if isinstance(registered_rule(m), ElementwiseRule):
        return "identity"
    return "blocked"


def _pname(call: Call, attr: str) -> str:
    binding = call.gn.params.get(attr)
    if binding is not None:
        return binding[0]
    path = call.gn.node.target
    return f"{path}.{attr}" if path else attr


def walk(rec: Records, call: Call):
    """The atoms of the leaf's output; records its parameters' axes and what it reads."""
    m = call.gn.module
    how = kind(m)
    if how == "recurrent":
        from .recurrent import walk as recurrent_walk

        return recurrent_walk(rec, call)
    if how == "identity":
        return call.args[0]
    if how == "reshape":
        return m(call.args[0])
    if not isinstance(call.args[0], Tensor) or not isinstance(call.out, Tensor):
        return _blocked(rec.uf, call, f"{type(m).__name__} with this input is not followed")
    if how == "linear":
        return _linear(rec, call, m)
    if how == "conv":
        return _conv(rec, call, m)
    if how in ("batchnorm", "pool"):
        return _per_channel(rec, call, m, how == "batchnorm")
    if how == "embedding":
        return _embedding(rec, call, m)
    if how == "layernorm":
        dims = tuple(range(-len(m.normalized_shape), 0))
        reason = "LayerNorm normalises over these units (each output depends on all of them)"
        return mix_along(rec.uf, call.args[0], dims, call.name, reason).expand(call.out.shape)
    return _blocked(rec.uf, call, f"module type {type(m).__name__} is not followed by cells")


def _blocked(uf: UnionFind, call: Call, reason: str):
    block_inputs(uf, call, reason)
    return fresh_blocked(uf, call.out, call.name, reason)


def _linear(rec: Records, call: Call, m: nn.Linear):
    path = call.gn.node.target
    x = call.args[0]
    cols = merge_along(rec.uf, x, -1, call.name, f"Linear {path!r}")
    out = rec.producer(m, path, m.out_features, "unit", call.name, call.order)
    rec.axis(_pname(call, "weight"), m, "weight", 0, out, "fan_in", call.name)
    rec.axis(_pname(call, "weight"), m, "weight", 1, cols, "fan_out", call.name)
    rec.axis(_pname(call, "bias"), m, "bias", 0, out, "fan_in", call.name)
    rec.reads.append(Read(call.name, 0, along(cols, x.shape, -1)))
    return along(out, call.out.shape, -1)


def _conv(rec: Records, call: Call, m: nn.Module):
    path = call.gn.node.target
    x = call.args[0]
    if x.dim() != m.weight.dim():
        return _blocked(rec.uf, call, f"{type(m).__name__} on an unbatched input")
    depthwise = m.groups == m.in_channels == m.out_channels
    if m.groups != 1 and not depthwise:
        return _blocked(rec.uf, call, f"grouped convolution (groups={m.groups})")
    cols = merge_along(rec.uf, x, 1, call.name, f"{type(m).__name__} {path!r}")
    rec.reads.append(Read(call.name, 0, along(cols, x.shape, 1)))
    if depthwise:
        out = cols
    else:
        out = rec.producer(m, path, m.out_channels, "channel", call.name, call.order)
        rec.axis(_pname(call, "weight"), m, "weight", 1, cols, "fan_out", call.name)
    rec.axis(_pname(call, "weight"), m, "weight", 0, out, "fan_in", call.name)
    rec.axis(_pname(call, "bias"), m, "bias", 0, out, "fan_in", call.name)
    return along(out, call.out.shape, 1)


def _per_channel(rec: Records, call: Call, m: nn.Module, batchnorm: bool):
    x = call.args[0]
    if x.dim() < 2:
        return _blocked(rec.uf, call, f"{type(m).__name__} on an unbatched input")
    ids = merge_along(rec.uf, x, 1, call.name, type(m).__name__)
    rec.reads.append(Read(call.name, 0, along(ids, x.shape, 1)))
    if batchnorm:
        path = call.gn.node.target
        for attr in ("weight", "bias"):
            rec.axis(_pname(call, attr), m, attr, 0, ids, "fan_in", call.name)
        for attr in ("running_mean", "running_var"):
            name = f"{path}.{attr}" if path else attr
            rec.axis(name, m, attr, 0, ids, "state", call.name, is_param=False)
    return along(ids, call.out.shape, 1)


def _embedding(rec: Records, call: Call, m: nn.Embedding):
    if m.max_norm is not None:
        return _blocked(rec.uf, call, "Embedding(max_norm=...) renormalises rows across units")
    path = call.gn.node.target
    out = rec.producer(m, path, m.embedding_dim, "unit", call.name, call.order)
    rec.axis(_pname(call, "weight"), m, "weight", 1, out, "fan_in", call.name)
    return along(out, call.out.shape, -1)


def check(call: Call, expected) -> str | None:
    """For a removal: route-like leaves must map the smaller input to the smaller output."""
    m = call.gn.module
    how = kind(m)
    if how == "identity":
        return None if same(call.args[0], expected) else "does not pass the smaller value on"
    if how == "reshape":
        try:
            got = m(call.args[0])
        except RuntimeError:
            got = None
        if got is None or not same(got, expected):
            return f"{type(m).__name__} gives another shape on the smaller tensor"
    return None
