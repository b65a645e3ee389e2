"""Saliencies: estimated increase of the objective if a parameter is removed (see ``base``)."""

from .accumulated_gradient import AccumulatedGradient
from .base import Saliency
from .generalization import EBD, ESP, GammaOBD, GammaOBS, ValidationOBD
from .obd import OBD
from .obs import OBS
from .ocd import OCD, CellSaliencies
from .simple import SNIP, Magnitude, Random

__all__ = [
    "AccumulatedGradient",
    "EBD",
    "ESP",
    "OBD",
    "OBS",
    "OCD",
    "SNIP",
    "CellSaliencies",
    "GammaOBD",
    "GammaOBS",
    "Magnitude",
    "Random",
    "Saliency",
    "ValidationOBD",
]
