"""Saliencies: estimated increase of the objective if a parameter is removed (see ``base``)."""

from .base import Saliency
from .obd import OBD
from .simple import SNIP, Magnitude, Random

__all__ = ["OBD", "SNIP", "Magnitude", "Random", "Saliency"]
