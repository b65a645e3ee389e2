"""The unit graph: which entries of a model's values are units, how layers and functions couple
them, and which cannot be removed (see :mod:`.analysis`). Read through the one graph reader of
:mod:`optbrain.curvature.graph`; consumed by :mod:`optbrain.cells` (cells, OCD, Unit-OBS) and
:mod:`optbrain.structure` (physical removal)."""

from .analysis import Group, UnitGraph, unit_graph
from .base import CellGraphError, UnitRemovalError

__all__ = ["CellGraphError", "Group", "UnitGraph", "UnitRemovalError", "unit_graph"]
