"""Pruner presets for the generalisation-based saliencies (PAPERS.md §5, §8, §14.3–14.4).

Each factory returns a :class:`~optbrain.pruners.Pruner` (saliency + selector + zeroing update),
usable wherever ``optbrain.obd()`` is: ``iterative_prune``, the experiments, ``optbrain prune
--method``; they are rows of :data:`optbrain.pruners.METHODS`.

**γOBD's stopping rule** — stop when every saliency is positive, i.e. when each further deletion
would raise the estimated test error — is ``iterative_prune(..., stop_saliency=GAMMA_STOP)``
(the loop stops before deleting when the smallest saliency of a kept entry exceeds it), or
:func:`all_positive` on saliencies a caller computed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..curvature.base import DiagonalCurvature
from ..masking import Mask
from ..paramdict import ParamDict
from ..saliency.generalization import EBD, ESP, GammaOBD, GammaOBS, ValidationOBD
from ..selection import selector_for as _selector
from .composed import Pruner

__all__ = [
    "GAMMA_STOP",
    "all_positive",
    "ebd",
    "esp",
    "gamma_obd",
    "gamma_obs",
    "validation_obd",
]


GAMMA_STOP = 0.0
"""``stop_saliency`` for γOBD/γOBS: stop once the smallest kept saliency is > 0."""


def all_positive(scores: ParamDict, mask: Mask) -> bool:
    """Whether every kept entry of the masked parameters has a saliency > 0 (γOBD's stop)."""
    kept = [scores[k].detach()[mask[k].to(scores[k].device)] for k in mask.names if mask[k].any()]
    if not kept:
        return True
    return bool(torch.cat([v.reshape(-1) for v in kept]).min() > GAMMA_STOP)


def gamma_obd(
    weight_decay: float | Mapping[str, float] = 0.0,
    curvature: DiagonalCurvature | None = None,
    scope: str = "global",
    *,
    min_kept: int = 1,
) -> Pruner:
    """γOBD: delete by the estimated change of the test error (Pedersen et al.). ``min_kept``:
    entries every masked parameter keeps (as for :func:`~optbrain.pruners.obd`)."""
    return Pruner(GammaOBD(weight_decay, curvature), _selector(scope, min_kept))


def gamma_obs(
    weight_decay: float = 0.0, inverse: Any = None, scope: str = "global", *, min_kept: int = 1
) -> Pruner:
    """γOBS ranking (NNSYSID's OBS saliency with weight decay, corrected for generalisation);
    deletes without the OBS weight update: retrain after each round."""
    return Pruner(GammaOBS(weight_decay, inverse), _selector(scope, min_kept))


def esp(
    curvature: DiagonalCurvature | None = None, scope: str = "global", *, min_kept: int = 1
) -> Pruner:
    """ESP: OBD plus the first-order term −g·w, for nets not at a minimum (Tresp et al.)."""
    return Pruner(ESP(curvature), _selector(scope, min_kept))


def ebd(
    curvature: DiagonalCurvature | None = None, scope: str = "global", *, min_kept: int = 1
) -> Pruner:
    """Early Brain Damage: ESP plus ½g²/h (Tresp et al.)."""
    return Pruner(EBD(curvature), _selector(scope, min_kept))


def validation_obd(
    validation: Any = None,
    curvature: DiagonalCurvature | None = None,
    scope: str = "global",
    loss_fn: Any = None,
    *,
    min_kept: int = 1,
) -> Pruner:
    """Validation-set OBD (Larsen et al.): the second-order change of the validation error;
    ``validation`` (an ``(X, Y)`` tuple or a DataLoader) is required."""
    return Pruner(ValidationOBD(validation, curvature, loss_fn), _selector(scope, min_kept))
