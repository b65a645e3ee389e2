"""Deprecated alias (importing it warns): this module moved to
:mod:`optbrain.pruners.cell_pruner`."""

from ._deprecated import moved

globals().update(moved(__name__, "optbrain.pruners.cell_pruner"))
