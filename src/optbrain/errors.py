"""Exceptions raised by optbrain. Every one names its cause; none is an ``assert``."""

from __future__ import annotations


class OptbrainError(Exception):
    """Base class of every error optbrain raises on purpose."""


class UnsupportedModuleError(OptbrainError, TypeError):
    """A module has no rule in the per-layer registry of a structured estimator."""


class ShapeMismatchError(OptbrainError, ValueError):
    """Shapes do not fit: model output vs. loss target, or a mask vs. its parameter."""


class NonFiniteLossError(OptbrainError, FloatingPointError):
    """The loss (or a curvature quantity derived from it) is NaN or infinite."""


class EmptyDataError(OptbrainError, ValueError):
    """The data of a problem yielded no samples."""
