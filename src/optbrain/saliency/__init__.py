"""Saliencies: estimated increase of the objective if a parameter is removed (see ``base``)."""

from .base import Saliency
from .obd import OBD
from .obs import OBS
from .ocd import OCD, CellSaliencies
from .simple import SNIP, Magnitude, Random

__all__ = ["CellSaliencies", "OBD", "OBS", "OCD", "SNIP", "Magnitude", "Random", "Saliency"]
