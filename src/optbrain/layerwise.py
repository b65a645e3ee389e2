"""Deprecated alias (importing it warns): this module moved to
:mod:`optbrain.pruners.layerwise`."""

from ._deprecated import moved

globals().update(moved(__name__, "optbrain.pruners.layerwise"))
