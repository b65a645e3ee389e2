"""Every pruner, side by side.

* :class:`Pruner` composes a saliency, a selector and an update (OBD, magnitude, random, SNIP);
* :class:`OBSPruner` deletes one weight (or unit) at a time with the Optimal Brain Surgeon update;
* :class:`LayerwiseOBS` solves each Linear/Conv layer's reconstruction problem (OBC, SparseGPT);
* :class:`CellPruner` removes whole cells: inputs, hidden units, channels (Optimal Cell Damage).

All honour one call contract (:mod:`optbrain.pruners.base`); :data:`METHODS` names them. Every
step measures the objective it changed (``PruneInfo.measured_increase``); :class:`AdaptiveSteps`
splits a large deletion into sub-steps with re-estimated curvature (:mod:`.adaptive`).
"""

from ..errors import UnsupportedArgumentError
from .adaptive import AdaptiveSteps, SubStep
from .base import PruneInfo, PrunerBase, PrunerProtocol, Stateless, default_mask
from .cell_pruner import CellPruneInfo, CellPruner
from .composed import Pruner, restricted
from .generalization import GAMMA_STOP, all_positive, ebd, esp, gamma_obd, gamma_obs, validation_obd
from .layerwise import LayerwiseOBS
from .presets import (
    METHODS,
    PRESETS,
    RECOMMENDED,
    Method,
    layerwise_obs,
    magnitude,
    make,
    obd,
    obs,
    ocd,
    random,
    recommended,
    snip,
    unit_obs,
)
from .surgeon import OBSPruner

__all__ = [
    "GAMMA_STOP",
    "METHODS",
    "AdaptiveSteps",
    "PRESETS",
    "CellPruneInfo",
    "CellPruner",
    "LayerwiseOBS",
    "Method",
    "OBSPruner",
    "PruneInfo",
    "Pruner",
    "RECOMMENDED",
    "PrunerBase",
    "PrunerProtocol",
    "Stateless",
    "UnsupportedArgumentError",
    "all_positive",
    "SubStep",
    "default_mask",
    "ebd",
    "esp",
    "gamma_obd",
    "gamma_obs",
    "layerwise_obs",
    "magnitude",
    "make",
    "obd",
    "obs",
    "ocd",
    "random",
    "recommended",
    "restricted",
    "snip",
    "unit_obs",
    "validation_obd",
]
