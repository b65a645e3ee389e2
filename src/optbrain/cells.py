"""Cells: the input variables, hidden units and conv channels of a feed-forward chain.

A *cell* is something that can be removed as a whole (Optimal Cell Damage, Unit-OBS, physical
removal in :mod:`optbrain.structure`). Each :class:`Cell` lists the parameter slabs that feed it
(``fan_in``: its row of the producing layer's weight, its bias entry and, when a BatchNorm follows,
that channel's BatchNorm weight and bias) and the slabs that leave it (``fan_out``: its column(s) of
the next layer's weight; after a ``Flatten`` a channel owns ``S`` consecutive columns, ``S`` the
spatial size). Input cells have no fan-in; their fan-out is the first layer's columns (Linear) or
input-channel slices (Conv). The last layer's outputs are not cells.

What :func:`layer_chain` can follow: an ``nn.Sequential`` (nested Sequentials are flattened) of
``Linear`` / ``Conv1d`` / ``Conv2d`` / ``Conv3d`` (``groups=1``) layers separated by layers that act
on each unit or channel separately: element-wise activations (those of the curvature registry,
:func:`optbrain.curvature.rules.register_elementwise` adds more), ``Dropout``, ``Identity``,
pooling, ``BatchNorm`` and ``Flatten`` (``start_dim=1``). Before the first layer only element-wise
layers, Dropout and a ``Flatten`` (then input cells are the flattened features of a first Linear)
may come. After the last Linear/Conv anything may follow (softmax, ...). Anything else raises
:class:`~optbrain.errors.UnsupportedModuleError` naming the module.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .errors import UnsupportedModuleError
from .masking import Mask

__all__ = ["Cell", "Layer", "Slab", "cell_mask", "cell_sums", "cells", "layer_chain"]

KINDS = ("input", "unit", "channel")
PARTS = ("fan_in", "fan_out", "both")

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_POOL = (
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.LPPool1d,
    nn.LPPool2d,
)
_PASS = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


@dataclass(frozen=True)
class Slab:
    """``param[name]`` narrowed along ``dim`` to ``[start, stop)``."""

    name: str
    dim: int
    start: int
    stop: int

    def index(self) -> tuple:
        """A tuple of slices: ``tensor[slab.index()]`` is the slab (a view)."""
        return (slice(None),) * self.dim + (slice(self.start, self.stop),)


@dataclass(frozen=True)
class Cell:
    """An input variable (``"input"``), hidden unit of a Linear (``"unit"``) or output channel of a
    Conv (``"channel"``). ``layer`` is the module path of the first layer for inputs, else of the
    layer producing the cell; ``index`` its position there."""

    kind: str
    layer: str
    index: int
    fan_in: tuple[Slab, ...]
    fan_out: tuple[Slab, ...]


@dataclass(frozen=True)
class Layer:
    """One Linear/Conv layer of a chain and the per-unit modules that follow it.

    ``between`` are the ``(path, module)`` pairs after this layer up to the next Linear/Conv (for
    the last layer: the trailing modules). ``span`` is the number of next-layer input columns per
    unit/channel (``S`` after a Flatten, else 1); ``None`` for the last layer.
    """

    path: str
    module: nn.Module
    between: tuple[tuple[str, nn.Module], ...]
    span: int | None
    #: modules before the first layer (element-wise, Dropout, a leading Flatten); () for the others
    before: tuple[tuple[str, nn.Module], ...] = ()

    @property
    def flattens_input(self) -> bool:
        """True when a Flatten precedes this (first) layer: input cells index flattened features."""
        return any(isinstance(m, nn.Flatten) for _, m in self.before)

    @property
    def kind(self) -> str:
        return "unit" if isinstance(self.module, nn.Linear) else "channel"

    @property
    def n_in(self) -> int:
        m = self.module
        return m.in_features if isinstance(m, nn.Linear) else m.in_channels

    @property
    def n_out(self) -> int:
        m = self.module
        return m.out_features if isinstance(m, nn.Linear) else m.out_channels

    def name(self, attr: str) -> str:
        """Clean parameter name of ``attr`` ("weight", "bias") of this layer."""
        return f"{self.path}.{attr}" if self.path else attr

    @property
    def batchnorms(self) -> tuple[tuple[str, nn.Module], ...]:
        return tuple((p, m) for p, m in self.between if isinstance(m, _BATCHNORM))


# --------------------------------------------------------------------------- walking
def _is_elementwise(m: nn.Module) -> bool:
    from .curvature.rules import ElementwiseRule, rule_for

    try:
        return isinstance(rule_for(m), ElementwiseRule)
    except UnsupportedModuleError:
        return False


def _has_own_state(m: nn.Module) -> bool:
    return any(True for _ in m.parameters())


def _leaves(module: nn.Module, prefix: str):
    if isinstance(module, nn.Sequential):
        for name, child in module._modules.items():  # named_children() hides repeated modules
            if child is None:
                continue
            yield from _leaves(child, f"{prefix}.{name}" if prefix else name)
    else:
        yield prefix, module


def _reject_container(path: str, m: nn.Module) -> None:
    children = [name for name, _ in m.named_children()]
    if children == ["parametrizations"] and parametrize.is_parametrized(m):
        return  # a leaf with a mask (or other parametrization) attached
    if children:
        raise UnsupportedModuleError(
            f"{_describe(path, m)} is a container with its own forward (it may branch or reuse "
            "modules), which cells/structure cannot follow; only nn.Sequential nesting is "
            "supported"
        )


def _supported_text() -> str:
    return (
        "supported: nn.Sequential chains of Linear / Conv1d-3d (groups=1) separated by "
        "element-wise activations, Dropout, Identity, pooling, BatchNorm and Flatten(start_dim=1)"
    )


def _describe(path: str, m: nn.Module) -> str:
    return f"{type(m).__name__} at {path!r}" if path else f"{type(m).__name__} (the model itself)"


def layer_chain(model: nn.Module) -> list[Layer]:
    """The Linear/Conv layers of ``model`` in forward order with the modules between them.

    Raises :class:`~optbrain.errors.UnsupportedModuleError` for containers with a custom forward,
    unsupported layers, grouped/transposed convolutions, shared parameters, BatchNorm before the
    first layer, and layer sizes that do not fit together.
    """
    if any(isinstance(m, nn.RNNBase) for m in model.modules()):
        raise UnsupportedModuleError(
            "recurrent layers (nn.RNN/GRU/LSTM) are not supported by cells/structure yet"
        )
    leaves = list(_leaves(model, ""))
    layers: list[tuple[str, nn.Module]] = []
    between: list[list[tuple[str, nn.Module]]] = []
    seen_params: dict[int, str] = {}
    before: list[tuple[str, nn.Module]] = []
    for path, m in leaves:
        if isinstance(m, nn.Linear) or isinstance(m, _CONV):
            _check_layer(path, m, seen_params, first=not layers, before=before)
            layers.append((path, m))
            between.append([])
            continue
        if not layers:  # before the first layer
            _check_before(path, m)
            before.append((path, m))
            continue
        between[-1].append((path, m))
    if not layers:
        raise UnsupportedModuleError(
            f"{_describe('', model)} has no Linear/Conv layer that cells can follow "
            f"(a container with a custom forward cannot be followed; {_supported_text()})"
        )
    out: list[Layer] = []
    for k, ((path, m), mids) in enumerate(zip(layers, between)):
        last = k == len(layers) - 1
        first = tuple(before) if k == 0 else ()
        span = None if last else _check_between(path, m, mids, layers[k + 1])
        out.append(Layer(path, m, tuple(mids), span, first))
    return out


def _check_layer(path: str, m: nn.Module, seen_params: dict, first: bool, before: list) -> None:
    """A Linear/Conv layer cells can follow: groups=1, no shared parameters (recorded in
    ``seen_params``), and a first conv not behind a Flatten."""
    if isinstance(m, _CONV) and m.groups != 1:
        raise UnsupportedModuleError(
            f"{_describe(path, m)} has groups={m.groups}: grouped and depthwise "
            "convolutions are not supported as cells (only groups=1)"
        )
    for p in m.parameters():
        if id(p) in seen_params:
            raise UnsupportedModuleError(
                f"{_describe(path, m)} shares a parameter with {seen_params[id(p)]!r}; "
                "tied weights have no single fan-in/fan-out and are not supported"
            )
        seen_params[id(p)] = path
    if first and isinstance(m, _CONV) and any(isinstance(b, nn.Flatten) for _, b in before):
        raise UnsupportedModuleError(
            f"{_describe(path, m)} follows a Flatten: reshaping inputs into channels is "
            "not supported"
        )


def _check_before(path: str, m: nn.Module) -> None:
    """A module before the first layer must leave the inputs as they are (or flatten them)."""
    _reject_container(path, m)
    if _has_own_state(m) or isinstance(m, _BATCHNORM):
        raise UnsupportedModuleError(
            f"{_describe(path, m)} comes before the first Linear/Conv layer; input cells "
            f"need the first layer to act directly on the inputs ({_supported_text()})"
        )
    if isinstance(m, nn.Flatten):
        _check_flatten(path, m)
    elif not (_is_elementwise(m) or isinstance(m, _PASS)):
        raise UnsupportedModuleError(
            f"{_describe(path, m)} before the first Linear/Conv is not supported; "
            f"{_supported_text()}"
        )


def _check_flatten(path: str, m: nn.Flatten) -> None:
    if m.start_dim != 1 or m.end_dim != -1:
        raise UnsupportedModuleError(
            f"{_describe(path, m)} has start_dim={m.start_dim}, end_dim={m.end_dim}; "
            "only Flatten(start_dim=1, end_dim=-1) keeps channels contiguous"
        )


def _check_between(path: str, m: nn.Module, mids, nxt: tuple[str, nn.Module]) -> int:
    """Check that the modules between two layers act per unit; return columns per unit."""
    n = m.out_features if isinstance(m, nn.Linear) else m.out_channels
    flattened = False
    for p, mid in mids:
        flattened = _check_mid(p, mid, path, m, n, nxt[0], flattened)
    return _span(path, m, n, nxt, flattened)


def _check_mid(p: str, mid: nn.Module, path: str, m: nn.Module, n: int, nxt: str, flat: bool):
    """One module between layer ``path`` (``n`` outputs) and ``nxt`` must act per unit; returns
    whether the outputs are flattened after it."""
    _reject_container(p, mid)
    if isinstance(mid, nn.Flatten):
        _check_flatten(p, mid)
        return True
    if isinstance(mid, _BATCHNORM):
        if mid.num_features != n:
            raise UnsupportedModuleError(
                f"{_describe(p, mid)} has {mid.num_features} features but follows a layer "
                f"with {n} outputs"
            )
        return flat
    if flat and not _is_elementwise(mid) and not isinstance(mid, _PASS):
        raise UnsupportedModuleError(
            f"{_describe(p, mid)} after a Flatten is not supported; {_supported_text()}"
        )
    if isinstance(mid, _POOL) and isinstance(m, nn.Linear):
        raise UnsupportedModuleError(
            f"{_describe(p, mid)} pools the outputs of Linear {path!r}: pooling across "
            "units mixes cells and is not supported"
        )
    if _has_own_state(mid) or not (
        _is_elementwise(mid) or isinstance(mid, _PASS) or isinstance(mid, _POOL)
    ):
        raise UnsupportedModuleError(
            f"{_describe(p, mid)} between {path!r} and {nxt!r} is not supported; "
            f"{_supported_text()}"
        )
    return flat


def _span(path: str, m: nn.Module, n: int, nxt: tuple[str, nn.Module], flattened: bool) -> int:
    """Columns of the next layer per unit of layer ``path`` (1 for a conv after a conv)."""
    npath, nm = nxt
    if isinstance(nm, _CONV):
        if isinstance(m, nn.Linear) or flattened:
            raise UnsupportedModuleError(
                f"{_describe(npath, nm)} follows a Linear/Flatten: reshaping units into channels "
                "is not supported"
            )
        if nm.in_channels != n:
            raise UnsupportedModuleError(
                f"{_describe(npath, nm)} expects {nm.in_channels} channels, {path!r} gives {n}"
            )
        return 1
    if isinstance(m, _CONV) and not flattened:
        raise UnsupportedModuleError(
            f"Linear {npath!r} acts on the last axis of conv {path!r}'s output without a Flatten; "
            "put an nn.Flatten() between them"
        )
    if nm.in_features % n:
        raise UnsupportedModuleError(
            f"{_describe(npath, nm)} has {nm.in_features} inputs, not a multiple of the {n} "
            f"outputs of {path!r}"
        )
    span = nm.in_features // n
    if isinstance(m, nn.Linear) and span != 1:
        raise UnsupportedModuleError(
            f"{_describe(npath, nm)} has {nm.in_features} inputs but {path!r} gives {n}"
        )
    return span


# --------------------------------------------------------------------------- cells
def _row_slabs(layer: Layer, j: int) -> tuple[Slab, ...]:
    slabs = [Slab(layer.name("weight"), 0, j, j + 1)]
    if layer.module.bias is not None:
        slabs.append(Slab(layer.name("bias"), 0, j, j + 1))
    for p, bn in layer.batchnorms:
        for attr in ("weight", "bias"):
            if getattr(bn, attr, None) is not None:
                slabs.append(Slab(f"{p}.{attr}" if p else attr, 0, j, j + 1))
    return tuple(slabs)


def cells(model: nn.Module, kinds: Iterable[str] = KINDS) -> list[Cell]:
    """The cells of ``model`` of the given kinds: inputs first, then each layer's units/channels.

    ``kinds`` is any of ``"input"``, ``"unit"``, ``"channel"``. See :func:`layer_chain` for what
    can be followed.
    """
    kinds = tuple(kinds)
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ValueError(f"unknown cell kind(s) {bad}; choose from {KINDS}")
    chain = layer_chain(model)
    out: list[Cell] = []
    if "input" in kinds:
        first = chain[0]
        w = first.name("weight")
        out.extend(
            Cell("input", first.path, i, (), (Slab(w, 1, i, i + 1),)) for i in range(first.n_in)
        )
    for layer, nxt in zip(chain[:-1], chain[1:]):
        if layer.kind not in kinds:
            continue
        s = layer.span
        w = nxt.name("weight")
        out.extend(
            Cell(layer.kind, layer.path, j, _row_slabs(layer, j), (Slab(w, 1, j * s, (j + 1) * s),))
            for j in range(layer.n_out)
        )
    return out


def _slabs(cell: Cell, part: str) -> tuple[Slab, ...]:
    if part == "fan_in":
        return cell.fan_in
    if part == "fan_out":
        return cell.fan_out
    if part == "both":
        return cell.fan_in + cell.fan_out
    raise ValueError(f"part must be one of {PARTS}, got {part!r}")


def cell_sums(values: Mapping[str, Tensor], cells: list[Cell], part: str = "fan_out") -> Tensor:
    """Per-cell sums of a ParamDict over the cells' ``fan_out`` / ``fan_in`` / ``"both"`` slabs.

    Names missing from ``values`` contribute nothing (e.g. saliencies of weights only). Returns a
    1-D tensor of ``len(cells)`` in the dtype and device of ``values``.
    """
    ref = next(iter(values.values()), None)
    dtype = ref.dtype if ref is not None else torch.float32
    device = ref.device if ref is not None else None
    out = torch.zeros(len(cells), dtype=dtype, device=device)
    for i, cell in enumerate(cells):
        total = out.new_zeros(())
        for slab in _slabs(cell, part):
            if slab.name in values:
                total = total + values[slab.name][slab.index()].sum()
        out[i] = total
    return out


def cell_mask(mask: Mask | Mapping[str, Tensor], cells: list[Cell], part: str = "both") -> Mask:
    """``mask`` with the weights of ``cells`` (their ``part`` slabs) pruned.

    Only names present in ``mask`` are changed; use ``Mask.ones(model)`` as a start to prune
    parameters that carry no mask yet.
    """
    tensors = (mask if isinstance(mask, Mask) else Mask(mask)).to_dict()
    for cell in cells:
        for slab in _slabs(cell, part):
            if slab.name in tensors:
                tensors[slab.name][slab.index()] = False
    return Mask(tensors)
