"""What the unit-graph walk records: parameter axes, free tensors, producers, and the error."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import UnsupportedModuleError
from .atoms import UnionFind

ROLES = ("fan_in", "fan_out", "state")


class CellGraphError(UnsupportedModuleError):
    """Units cannot be followed or removed at a node of the model's graph; ``node`` names it."""

    def __init__(self, message: str, node: str | None = None):
        where = f" at node {node!r}" if node else ""
        super().__init__(f"{message}{where}")
        self.node = node
        self.reason = message


class UnitRemovalError(CellGraphError, KeyError):
    """A removal request names a unit that is not a cell (it reaches the model output, or a node
    mixes it with other units); ``node`` names the place. Also a ``KeyError``: the unit is not
    among the removable ones."""

    def __str__(self) -> str:
        return Exception.__str__(self)


@dataclass
class AxisRec:
    """Positions along ``axis`` of a parameter or buffer (``owner.attr``; clean ``name``) and the
    atom each position belongs to (0: none). ``role``: ``"fan_in"`` (feeds the unit: a weight
    row, a bias or normalisation entry), ``"fan_out"`` (leaves it: a weight column) or
    ``"state"`` (a buffer sliced with the unit, e.g. BatchNorm's running mean)."""

    name: str
    owner: nn.Module
    attr: str
    axis: int
    ids: Tensor
    role: str
    node: str
    is_param: bool = True
    layer: str = ""  # module path of the layer that holds it


@dataclass
class FreeRec:
    """A parameter or floating buffer read by a ``forward`` (``get_attr``): one atom per entry;
    after the walk, the axis along which it belongs to units is found from the groups."""

    name: str
    owner: nn.Module
    attr: str
    ids: Tensor
    node: str
    is_param: bool


@dataclass
class Producer:
    """A layer (or one layer and direction of a recurrent module) whose outputs are units.

    ``key``: the name cells and removals use (the module path; ``path.l1`` / ``path.l0_reverse``
    for the layers and directions of a multi-layer or bidirectional recurrent module). ``ids``:
    one atom per unit. ``order``: position of its (first) node in the graph."""

    key: str
    node: str
    module: nn.Module
    ids: Tensor
    kind: str
    order: int
    recurrent: tuple[int, int] | None = None  # (layer, direction)


class Records:
    """Everything the walk learns besides the atom maps."""

    def __init__(self) -> None:
        self.uf = UnionFind()
        self.axes: dict[tuple[int, int], AxisRec] = {}
        self.free: list[FreeRec] = []
        self.producers: dict[tuple[int, str], Producer] = {}
        self.reads: list = []  # call.Read: what each layer reads, for removal checks
        self.consumed: set[str] = set()  # parameter nodes a functional layer took as its weight
        self.graph = None  # the ModelGraph and model being walked
        self.model: nn.Module | None = None
        self.input_ids: Tensor | None = None  # one atom per entry of one input sample
        self.flattens_input = False  # a flatten lies between the input and its readers

    def producer(
        self, module: nn.Module, key: str, n: int, kind: str, node: str, order: int, part=None
    ) -> Tensor:
        """The unit atoms of ``module`` (one part of it: a recurrent layer and direction);
        created once, so a module called twice produces the same units."""
        slot = (id(module), key)
        got = self.producers.get(slot)
        if got is None:
            ids = self.uf.fresh((n,), owned=True)
            got = Producer(key, node, module, ids, kind, order, part)
            self.producers[slot] = got
        return got.ids

    def axis(
        self,
        name: str,
        owner: nn.Module,
        attr: str,
        axis: int,
        ids: Tensor,
        role: str,
        node: str,
        is_param: bool = True,
    ) -> None:
        """Record ``owner.attr``'s positions along ``axis``; a tensor recorded twice (a module
        called twice, tied weights) unites the atoms of each position."""
        tensor = _stored(owner, attr)
        if tensor is None:
            return
        key = (id(tensor), axis)
        got = self.axes.get(key)
        if got is None:
            layer = name.rsplit(".", 1)[0] if "." in name else ""
            self.axes[key] = AxisRec(
                name, owner, attr, axis, ids.clone(), role, node, is_param, layer
            )
            return
        self.uf.union_pairs(got.ids, ids)
        got.ids = torch.where(got.ids != 0, got.ids, ids)


def _stored(owner: nn.Module, attr: str) -> Tensor | None:
    """The tensor ``owner`` stores for ``attr``: a parametrized weight's ``original`` (reading
    ``owner.attr`` computes a fresh tensor each time, whose id a later temporary may reuse)."""
    from torch.nn.utils import parametrize

    if parametrize.is_parametrized(owner, attr):
        return owner.parametrizations[attr].original
    return getattr(owner, attr)
