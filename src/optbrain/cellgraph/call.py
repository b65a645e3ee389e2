"""One call of the graph as the unit-graph walk sees it, and helpers the op kinds share."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..curvature.graph.reader import GNode
from .atoms import UnionFind, tensors_in


@dataclass
class Read:
    """A layer reads argument ``arg`` (a position in the call's arguments; a pair for an element
    of a tuple argument) along the units given by ``pattern`` (atom ids broadcastable to the
    argument): a removal must delete exactly the entries whose pattern unit goes."""

    node: str
    arg: int | tuple[int, int]
    pattern: Tensor


@dataclass
class Call:
    """A node's call: ``args``/``kwargs`` with every floating tensor replaced by its atom map
    (other values are the real ones), ``real_args``/``real_kwargs`` the real values, ``out`` the
    real result. In a removal check (``check=True``) the atom maps are group maps of the
    smaller model and ``out`` is the real result of the full model."""

    gn: GNode
    order: int
    args: tuple
    kwargs: dict
    real_args: tuple
    real_kwargs: dict
    out: Any
    reads: list[Read] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.gn.name

    def slots(self) -> list[int]:
        """Positions of the arguments whose real value is a floating tensor (carry atoms)."""
        return [i for i, a in enumerate(self.real_args) if is_float(a)]

    def maps(self) -> list[Tensor]:
        return [self.args[i] for i in self.slots()]

    def has_atoms(self) -> bool:
        both = list(self.args) + list(self.kwargs.values())
        reals = list(self.real_args) + list(self.real_kwargs.values())
        for a, r in zip(both, reals):
            if _carries(r) and any(bool((t != 0).any()) for t in tensors_in(a)):
                return True
        return False


def _carries(value) -> bool:
    if is_float(value):
        return True
    if isinstance(value, (tuple, list)):
        return any(_carries(v) for v in value)
    return False


def is_float(x) -> bool:
    return isinstance(x, Tensor) and x.is_floating_point()


def along(ids: Tensor, shape, axis: int) -> Tensor:
    """``ids`` (one per position) laid along ``axis`` of a ``shape`` tensor (a broadcast view)."""
    shape = tuple(shape)
    axis = axis % len(shape)
    view = [1] * len(shape)
    view[axis] = ids.numel()
    return ids.reshape(view).expand(shape)


def zeros_like_value(value):
    """The atom value of a constant: zero maps of the shapes of its floating tensors (other
    values as they are)."""
    if is_float(value):
        return torch.zeros(value.shape, dtype=torch.long)
    if isinstance(value, tuple):
        return tuple(zeros_like_value(v) for v in value)
    if isinstance(value, list):
        return [zeros_like_value(v) for v in value]
    return value


def fresh_blocked(uf: UnionFind, value, node: str, reason: str):
    """New atoms for every floating tensor of ``value``, blocked (a result that mixes units)."""
    if is_float(value):
        t = uf.fresh(value.shape)
        uf.block(t, node, reason)
        return t
    if isinstance(value, (tuple, list)):
        return type(value)(fresh_blocked(uf, v, node, reason) for v in value)
    return value


def block_inputs(uf: UnionFind, call: Call, reason: str) -> None:
    for a, r in zip(list(call.args) + list(call.kwargs.values()),
                    list(call.real_args) + list(call.real_kwargs.values())):  # fmt: skip
        if _carries(r):
            uf.block(a, call.name, reason)


def same(a, b) -> bool:
    """Two atom values are equal (tensors: same shape and entries; tuples element-wise)."""
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return a.shape == b.shape and bool((a == b).all())
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return False
    return True
