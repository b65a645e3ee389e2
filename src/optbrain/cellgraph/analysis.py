"""The unit graph of a model: which entries must be removed together, and which cannot go.

:func:`unit_graph` reads the model with the graph reader (:mod:`optbrain.curvature.graph`,
the one model reader: chains are graphs too), runs it on a small example batch and follows
every entry's *atom* (:mod:`.atoms`) through the layers (:mod:`.layers`, :mod:`.recurrent`) and
functions (:mod:`.glue`). The result lists the **groups**: a hidden unit or channel together with
everything joined to it element by element (a residual addition joins the units it adds, a
concatenation places them side by side, a gate multiplies them), the input variables, and per
group its fan-in and fan-out parameter entries and, where it cannot be removed, the node and
reason that **block** it (it reaches the model output; a LayerNorm, softmax, matmul or unknown
function mixes it with other units; a grouped convolution; ...).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.fx.node import map_arg

from ..curvature.graph.reader import GraphReadError, ModelGraph, read_graph
from ..errors import ShapeMismatchError
from ..problem import eval_mode
from . import example as _example
from . import glue, layers
from .atoms import Block
from .base import AxisRec, CellGraphError, FreeRec, Producer, Records
from .call import Call, is_float

log = logging.getLogger(__name__)

OUTPUT_REASON = "the units reach the model output"


@dataclass
class Group:
    """The entries removed together (see the module docstring). ``members``: (producer key,
    index) of the layer units in it, in forward order; ``inputs``: input positions;
    ``fan_in``/``fan_out``/``state``: (axis record, positions) pairs; ``free``: (free tensor,
    axis, positions); ``block``: why it cannot be removed (None if it can)."""

    root: int
    members: list[tuple[str, int]] = field(default_factory=list)
    inputs: list[int] = field(default_factory=list)
    fan_in: list[tuple[AxisRec, list[int]]] = field(default_factory=list)
    fan_out: list[tuple[AxisRec, list[int]]] = field(default_factory=list)
    state: list[tuple[AxisRec, list[int]]] = field(default_factory=list)
    free: list[tuple[FreeRec, int, list[int]]] = field(default_factory=list)
    block: Block | None = None

    @property
    def removable(self) -> bool:
        return self.block is None and bool(self.members or self.inputs)


class UnitGraph:
    """The groups of one model for one input shape (see the module docstring)."""

    def __init__(self, model, graph, example, given, rec, atoms, real):
        self.model: nn.Module = model
        self.graph: ModelGraph = graph
        self.example: Tensor = example
        self.example_given: bool = given
        self.rec: Records = rec
        self.atoms: dict[str, Any] = atoms
        self.real: dict[str, Any] = real
        self.order = {gn.name: i for i, gn in enumerate(graph.nodes)}
        self.roots = rec.uf.roots()
        self.producers: list[Producer] = sorted(
            rec.producers.values(), key=lambda p: (p.order, p.recurrent or (0, 0))
        )
        self.groups: dict[int, Group] = {}
        self.input_axis: int | None = None
        self.flattens_input = False
        self._build()

    # ------------------------------------------------------------------ lookups
    def group(self, root: int) -> Group:
        got = self.groups.get(root)
        if got is None:
            got = self.groups[root] = Group(root)
        return got

    def roots_of(self, value):
        """``value`` (atom ids, nested) in group space."""
        if isinstance(value, Tensor) and value.dtype == torch.long:
            return self.roots[value]
        if isinstance(value, (tuple, list)):
            return type(value)(self.roots_of(v) for v in value)
        return value

    def unit_group(self, key: str, index: int) -> Group:
        for p in self.producers:
            if p.key == key:
                return self.groups[int(self.roots[p.ids[index]])]
        raise KeyError(key)

    def input_group(self, index: int) -> Group:
        ids = self.input_ids.reshape(-1) if self.flattens_input else self._input_line()
        return self.groups[int(self.roots[ids[index]])]

    @property
    def input_ids(self) -> Tensor:
        return self.rec.input_ids

    def _input_line(self) -> Tensor:
        if self.input_axis is None:
            raise CellGraphError("the input variables cannot be told apart as cells")
        return _line(self.input_ids, self.input_axis)

    # ------------------------------------------------------------------ building
    def _build(self) -> None:
        for p in self.producers:
            for j, r in enumerate(self.roots[p.ids].tolist()):
                self.group(r).members.append((p.key, j))
        self._inputs()
        for rec in self.rec.axes.values():
            for r, pos in _positions(self.roots[rec.ids]).items():
                getattr(self.group(r), rec.role).append((rec, pos))
        for free in self.rec.free:
            if free.node not in self.rec.consumed:
                self._free(free)
        for atom, blk in self.rec.uf.blocks.items():
            g = self.group(int(self.roots[atom]))
            if g.block is None or self.order.get(blk.node, 0) < self.order.get(g.block.node, 0):
                g.block = blk

    def _inputs(self) -> None:
        """Input cells: the variables along one axis of a sample (features of a Linear,
        channels of a Conv), or the entries of a sample that a flatten turns into features."""
        ids = self.rec.input_ids
        if ids is None or ids.dim() == 0:
            return
        r = self.roots[ids]
        self.flattens_input = self.rec.flattens_input
        if self.flattens_input and r.dim() > 1:
            if torch.unique(r).numel() != r.numel():
                log.info("the flattened input's entries are coupled: no input cells")
                return
            for i, root in enumerate(r.reshape(-1).tolist()):
                self.group(root).inputs.append(i)
            return
        axis = _line_axis(r)
        if axis is None:
            log.info("the input entries do not form variables along one axis: no input cells")
            return
        self.input_axis = axis
        for i, root in enumerate(_line(r, axis).tolist()):
            self.group(root).inputs.append(i)

    def _free(self, free: FreeRec) -> None:
        r = self.roots[free.ids]
        if r.dim() == 0:
            return
        axis = _line_axis(r)
        if axis is not None:
            for root, pos in _positions(_line(r, axis)).items():
                self.group(root).free.append((free, axis, pos))
            return
        for root in torch.unique(r).tolist():
            self.rec.uf.blocks.setdefault(
                int(root),
                Block(free.node, f"{free.name!r} is read in a pattern that mixes units"),
            )


def _line_axis(r: Tensor) -> int | None:
    """The axis along which the groups of ``r`` are laid out (constant along the others): the
    one with the most groups, the first on a tie; None if there is none."""
    best = None
    for axis in range(r.dim()):
        other = tuple(d for d in range(r.dim()) if d != axis)
        if other and not bool((r.amax(other) == r.amin(other)).all()):
            continue
        n = torch.unique(_line(r, axis)).numel()
        if best is None or n > best[1]:
            best = (axis, n)
    return None if best is None else best[0]


def _line(r: Tensor, axis: int) -> Tensor:
    """The group of each position along ``axis`` (taken at the first position of the others)."""
    return r.movedim(axis, 0).reshape(r.shape[axis], -1)[:, 0]


def _positions(line: Tensor) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for i, r in enumerate(line.tolist()):
        if r:
            out.setdefault(r, []).append(i)
    return out


# --------------------------------------------------------------------------- the walk
def unit_graph(model: nn.Module, example: Tensor | None = None, input_shape=None) -> UnitGraph:
    """Read ``model``'s units.

    ``example``: an input batch (the first two samples are used) or ``input_shape``: one
    sample's shape; without either the shape is guessed (:mod:`.example`). Raises
    :class:`~optbrain.curvature.graph.GraphReadError` (naming the node) when the model cannot
    be traced or its traced graph computes something else than the model. Not cached: the
    result holds the model, and reading a small model costs milliseconds (OCD and the cell
    pruner read it once per step)."""
    graph = read_graph(model, layers.EXTRA_LEAVES)
    x, given = _example.make(model, graph, example, input_shape)
    with torch.no_grad(), eval_mode(model):
        ug = _walk(model, graph, x, given)
        _check_traced(model, ug, x)
    return ug


def _check_traced(model: nn.Module, ug: UnitGraph, x: Tensor) -> None:
    """The traced graph must compute what the model computes on the example (a ``forward``
    whose Python branches depend on types or values is traced along one branch only)."""
    out = next(gn for gn in ug.graph.nodes if gn.kind == "output")
    traced = map_arg(out.node.args[0], lambda n: ug.real[n.name])
    if not _close(traced, model(x)):
        raise GraphReadError(
            "the traced graph does not compute the model's output (a branch of forward that "
            "depends on types or values, e.g. isinstance() of a layer's output?)",
            out.name,
        )


def _close(a, b) -> bool:
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if not a.is_floating_point():
            return bool(torch.equal(a, b))
        scale = 1.0 + float(b.abs().max()) if b.numel() else 1.0
        return bool(torch.allclose(a, b, rtol=1e-4, atol=1e-5 * scale, equal_nan=True))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_close(u, v) for u, v in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    return type(a) is type(b)


def _walk(model: nn.Module, graph: ModelGraph, x: Tensor, given: bool) -> UnitGraph:
    rec = Records()
    rec.graph, rec.model = graph, model
    atoms: dict[str, Any] = {}
    real: dict[str, Any] = {}
    for order, gn in enumerate(graph.nodes):
        node = gn.node
        if gn.kind == "input":
            real[gn.name] = x
            atoms[gn.name] = _input_atoms(rec, x)
            rec.flattens_input = _flattened_before_reader(graph, gn)
        elif gn.kind in ("const", "param"):
            real[gn.name], atoms[gn.name] = _attr(rec, model, gn)
        elif gn.kind == "output":
            out = map_arg(node.args[0], lambda n: atoms[n.name])
            rec.uf.block(out, gn.name, OUTPUT_REASON)
        else:
            real[gn.name], atoms[gn.name] = _call(rec, gn, order, real, atoms, x)
    return UnitGraph(model, graph, x, given, rec, atoms, real)


def _input_atoms(rec: Records, x: Tensor):
    if not is_float(x):
        rec.input_ids = None
        return x
    ids = rec.uf.fresh(x.shape[1:])
    rec.input_ids = ids
    return ids.unsqueeze(0).expand(x.shape)


def _flattened_before_reader(graph: ModelGraph, gn) -> bool:
    """A flatten lies between the input and the layers that read it."""
    frontier = [gn.node]
    while frontier:
        node = frontier.pop()
        for user in node.users:
            g = graph.by_name.get(user.name)
            if g is None:
                continue
            if g.kind == "leaf" and isinstance(g.module, nn.Flatten):
                return True
            if g.kind == "glue" and g.glue.name in ("flatten", "view", "reshape"):
                return True
            if g.kind == "glue" or (g.kind == "leaf" and layers.kind(g.module) == "identity"):
                frontier.append(user)
    return False


def _attr(rec: Records, model: nn.Module, gn):
    node = gn.node
    if gn.kind == "param":
        value = gn.param[1].detach()
        name = gn.param[0]
    elif node.op == "get_attr":
        value, name = gn.value, node.target
    else:  # a further placeholder with a default
        value = node.args[0] if node.args else None
        return value, value
    if not is_float(value):
        return value, value
    ids = rec.uf.fresh(value.shape)
    owner_path, _, attr = node.target.rpartition(".")
    try:
        owner = model.get_submodule(owner_path)
    except AttributeError:
        owner = None
    if owner is not None:
        rec.free.append(FreeRec(name, owner, attr, ids, gn.name, gn.kind == "param"))
    else:
        rec.uf.block(ids, gn.name, "a tensor outside the model's modules")
    return value, ids


def _call(rec: Records, gn, order: int, real: dict, atoms: dict, x: Tensor):
    node = gn.node
    rargs = map_arg(node.args, lambda n: real[n.name])
    rkwargs = map_arg(node.kwargs, lambda n: real[n.name])
    try:
        if gn.kind == "leaf":
            out = gn.module(*rargs, **rkwargs)
        else:
            out = gn.glue.call(rargs, rkwargs)
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        raise ShapeMismatchError(
            f"the model cannot run on inputs of shape {tuple(x.shape[1:])} (node "
            f"{gn.name!r}): {exc}"
        ) from exc
    aargs = map_arg(node.args, lambda n: atoms[n.name])
    akwargs = map_arg(node.kwargs, lambda n: atoms[n.name])
    call = Call(gn, order, tuple(aargs), dict(akwargs), tuple(rargs), dict(rkwargs), out)
    try:
        got = layers.walk(rec, call) if gn.kind == "leaf" else glue.walk(rec, call)
    except (RuntimeError, TypeError, ValueError, IndexError) as exc:
        raise CellGraphError(f"cannot follow units through this call ({exc})", gn.name) from exc
    return out, got
