"""Cells: the input variables, hidden units and conv channels of a network, on any traceable model.

A *cell* is something that can be removed as a whole (Optimal Cell Damage, Unit-OBS, physical
removal in :mod:`optbrain.structure`). Each :class:`Cell` lists the parameter slabs that feed it
(``fan_in``: its row of the producing layer's weight, its bias entry, the entries of a BatchNorm
or a per-unit parameter on it; for a recurrent unit its row in every gate block of
``weight_ih``/``weight_hh`` and the biases) and the slabs that leave it (``fan_out``: its
column(s) of every layer that reads it; after a ``Flatten`` a channel owns ``S`` columns, ``S``
the spatial size; for a recurrent unit also its column of ``weight_hh``). Zeroing the fan-out
weights makes the network compute exactly what it computes without the cell.

Cells come from the model's *unit graph* (:mod:`optbrain.cellgraph`), read with the one graph
reader of :mod:`optbrain.curvature.graph` — an ``nn.Sequential`` is a graph too. Units joined
element by element (a residual addition, a gate) or placed side by side and split again form
one cell: the cell is named by its first unit (forward order) and carries the fan-in and fan-out
of all of them. Units that cannot be removed are not cells: the outputs of the last layer (they
reach the model output), units a ``LayerNorm``, softmax, matmul or unknown function mixes, the
units of grouped convolutions; ``optbrain.cellgraph.unit_graph(model).groups`` says why for each.
Input cells are the variables of one sample along one axis (the features a first Linear reads,
the channels of a first Conv), or the entries of a sample a leading flatten turns into features.

The model is run once on a small example batch to learn every value's shape: pass ``example=``
(a batch) or ``input_shape=`` (one sample) where the input shape cannot be guessed from the first
layer (see :mod:`optbrain.cellgraph.example`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .cellgraph import CellGraphError, Group, UnitGraph, unit_graph
from .errors import UnsupportedModuleError
from .masking import Mask

__all__ = [
    "Cell",
    "Layer",
    "Slab",
    "cell_mask",
    "cell_sums",
    "cells",
    "cells_of",
    "layer_chain",
]

KINDS = ("input", "unit", "channel")
PARTS = ("fan_in", "fan_out", "both")


@dataclass(frozen=True)
class Slab:
    """``param[name]`` narrowed along ``dim`` to ``range(start, stop, step)`` (``step`` > 1: one
    row per gate block of a recurrent weight, or a channel's columns after a channels-last
    flatten)."""

    name: str
    dim: int
    start: int
    stop: int
    step: int = 1

    def index(self) -> tuple:
        """A tuple of slices: ``tensor[slab.index()]`` is the slab (a view)."""
        return (slice(None),) * self.dim + (slice(self.start, self.stop, self.step),)


@dataclass(frozen=True)
class Cell:
    """An input variable (``"input"``), hidden unit (``"unit"``: of a Linear, an Embedding's output
    dimension, a recurrent layer's hidden unit) or output channel of a Conv (``"channel"``).
    ``layer`` is the module path of the first layer reading the input for inputs, else the key
    of the layer producing the cell (its module path; ``path.l1`` / ``path.l0_reverse`` for a
    layer and direction of a multi-layer or bidirectional recurrent module); ``index`` its
    position there. A cell of coupled units is named by its first unit."""

    kind: str
    layer: str
    index: int
    fan_in: tuple[Slab, ...]
    fan_out: tuple[Slab, ...]


@dataclass(frozen=True)
class Layer:
    """One Linear/Conv layer of a chain and the per-unit modules that follow it (the chain view
    of :func:`layer_chain`).

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
        return tuple(
            (p, m) for p, m in self.between if isinstance(m, nn.modules.batchnorm._BatchNorm)
        )


# --------------------------------------------------------------------------- cells
def cells(
    model: nn.Module,
    kinds: Iterable[str] = KINDS,
    *,
    example: Tensor | None = None,
    input_shape=None,
) -> list[Cell]:
    """The cells of ``model`` of the given kinds: inputs first, then the units/channels of each
    layer in forward order (``kinds``: any of ``"input"``, ``"unit"``, ``"channel"``).

    ``example`` (an input batch) or ``input_shape`` (one sample's shape) tell the input shape
    where the first layer does not (see the module docstring). Raises
    :class:`~optbrain.errors.UnsupportedModuleError` (a ``GraphReadError`` naming the node) when
    the model cannot be traced."""
    kinds = _check_kinds(kinds)
    return cells_of(unit_graph(model, example, input_shape), kinds)


def _check_kinds(kinds) -> tuple[str, ...]:
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ValueError(f"unknown cell kind(s) {bad}; choose from {KINDS}")
    return kinds


def cells_of(ug: UnitGraph, kinds: Iterable[str] = KINDS) -> list[Cell]:
    """The cells of an already read unit graph (see :func:`cells`)."""
    kinds = _check_kinds(kinds)
    out: list[Cell] = []
    if "input" in kinds:
        layer = _input_layer(ug)
        found = [(g.inputs[0], g) for g in ug.groups.values() if g.removable and g.inputs]
        out.extend(_cell(g, "input", layer, i) for i, g in sorted(found, key=lambda t: t[0]))
    seen: set[int] = set()
    for p in ug.producers:
        if p.kind not in kinds:
            continue
        for j, root in enumerate(ug.roots[p.ids].tolist()):
            g = ug.groups[root]
            if root in seen or not g.removable or g.inputs or g.members[0] != (p.key, j):
                continue
            seen.add(root)
            out.append(_cell(g, p.kind, p.key, j))
    return out


def cell_group(ug: UnitGraph, cell: Cell) -> Group:
    """The unit-graph group a cell stands for."""
    if cell.kind == "input":
        return ug.input_group(cell.index)
    return ug.unit_group(cell.layer, cell.index)


def _input_layer(ug: UnitGraph) -> str:
    """Module path of the first layer (forward order) that reads an input cell."""
    best = None
    for g in ug.groups.values():
        if not g.inputs:
            continue
        for rec, _ in g.fan_out:
            order = ug.order.get(rec.node, 0)
            if best is None or order < best[0]:
                best = (order, rec.layer)
    return best[1] if best else ""


def _cell(g: Group, kind: str, layer: str, index: int) -> Cell:
    fan_in = [s for rec, pos in g.fan_in if rec.is_param for s in _runs(rec.name, rec.axis, pos)]
    fan_in += [s for f, axis, pos in g.free if f.is_param for s in _runs(f.name, axis, pos)]
    fan_out = [s for rec, pos in g.fan_out if rec.is_param for s in _runs(rec.name, rec.axis, pos)]
    return Cell(kind, layer, index, tuple(fan_in), tuple(fan_out))


def _runs(name: str, dim: int, positions: list[int]) -> list[Slab]:
    """Positions as slabs: maximal arithmetic runs (a recurrent unit's gate rows are one)."""
    out: list[Slab] = []
    i = 0
    while i < len(positions):
        start = positions[i]
        if i + 1 == len(positions):
            out.append(Slab(name, dim, start, start + 1))
            break
        step = positions[i + 1] - start
        j = i + 1
        while j + 1 < len(positions) and positions[j + 1] - positions[j] == step:
            j += 1
        out.append(Slab(name, dim, start, positions[j] + 1, step))
        i = j + 1
    return out


# --------------------------------------------------------------------------- the chain view
def layer_chain(model: nn.Module) -> list[Layer]:
    """The Linear/Conv layers of a chain model (an ``nn.Sequential``, nested ones flattened) in
    forward order with the modules between them, read from its graph.

    Raises :class:`~optbrain.errors.UnsupportedModuleError` naming the node where the graph is
    not a chain (a branch, a residual connection, a layer used twice) or a layer's units are
    coupled to another layer's or blocked; :func:`cells` handles those models."""
    ug = unit_graph(model)
    path = _chain_nodes(ug)
    layers: list[tuple[str, nn.Module]] = []
    between: list[list[tuple[str, nn.Module]]] = [[]]
    for gn in path:
        if gn.kind == "leaf" and isinstance(
            gn.module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
        ):
            layers.append((gn.node.target, gn.module))
            between.append([])
            continue
        entry = _module_of(ug, gn)
        if entry is not None and (not between[-1] or between[-1][-1][1] is not entry[1]):
            between[-1].append(entry)
    if not layers:
        raise UnsupportedModuleError("the model has no Linear/Conv layer that cells can follow")
    out = []
    for k, (lpath, m) in enumerate(layers):
        last = k == len(layers) - 1
        span = None if last else _span(ug, lpath, m, layers[k + 1])
        out.append(
            Layer(lpath, m, tuple(between[k + 1]), span, tuple(between[0]) if k == 0 else ())
        )
    return out


def _chain_nodes(ug: UnitGraph):
    """The nodes from input to output, checked to form one path."""
    nodes = [gn for gn in ug.graph.nodes if gn.kind not in ("input", "output", "const", "param")]
    prev = next(gn for gn in ug.graph.nodes if gn.kind == "input").node
    for gn in nodes:
        ins = [
            a
            for a in gn.node.all_input_nodes
            if ug.graph.by_name[a.name].kind not in ("const", "param")
        ]
        if ins != [prev] or len(prev.users) != 1:
            raise CellGraphError("the model is not a chain of layers (use cells())", gn.name)
        prev = gn.node
    return nodes


def _module_of(ug: UnitGraph, gn):
    if gn.kind == "leaf":
        return gn.node.target, gn.module
    stack = gn.node.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return path, ug.model.get_submodule(path)


def _span(ug: UnitGraph, path: str, m: nn.Module, nxt: tuple[str, nn.Module]) -> int:
    """Columns of the next layer per unit of this one; raises if the units are not a chain's."""
    n = m.out_features if isinstance(m, nn.Linear) else m.out_channels
    npath, nm = nxt
    n_in = nm.in_features if isinstance(nm, nn.Linear) else nm.in_channels
    for j in range(n):
        g = ug.unit_group(path, j)
        if g.block is not None or len(g.members) != 1:
            why = g.block or "its units are coupled to another layer's"
            raise CellGraphError(
                f"layer {path!r} is not a chain layer: {why}", g.block.node if g.block else None
            )
    if n_in % n:
        raise CellGraphError(f"{npath!r} reads {n_in} inputs, not a multiple of {n}")
    return n_in // n


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
