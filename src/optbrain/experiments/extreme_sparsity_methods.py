"""The pruning methods of the extreme-sparsity study (PAPERS.md §14.2), each one optbrain pruner,
and where the pruned weights sit.

=======================  ==========================================================================
``obd``                  OBD, ½ h w² with LeCun's diagonal through time (its Gauss–Newton form) and
                         optbrain's adaptive sub-steps (re-estimated where the measured objective
                         departs from the prediction), global, no layer emptied
``course_obd``           the course project's "OBD": ½ (accumulated gradient)² w²
                         (:class:`~optbrain.saliency.AccumulatedGradient`), one global threshold
``snip``                 SNIP |w ∂E/∂w| at initialisation, one global threshold, then trained
``magnitude_blind``      class-blind magnitude: one global threshold on |w|
``magnitude_uniform``    class-uniform: the same fraction of every weight class
``magnitude_distribution`` class-distribution: delete |w| < λσ_c, σ_c the class's weight std
``random``               uniform random deletion (a control)
=======================  ==========================================================================

Every pruner keeps at least one entry of every weight matrix (``min_kept=1``, the presets'
guard), so 99.5 % never empties a layer outright.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from ..curvature import LeCunDiagonal
from ..masking import Mask
from ..pruners import AdaptiveSteps, Pruner
from ..pruners import presets as _presets
from ..saliency import AccumulatedGradient, Magnitude
from ..selection import ClassDistributionSelector, ClassUniformSelector, GlobalSelector

__all__ = ["AT_INIT", "LABELS", "METHODS", "make_pruner", "where_pruned"]

LABELS = {
    "obd": "OBD (LeCun diagonal, adaptive)",
    "course_obd": 'course "OBD" (½ g_acc² w²)',
    "snip": "SNIP (at init, then trained)",
    "magnitude_blind": "magnitude, class-blind",
    "magnitude_uniform": "magnitude, class-uniform",
    "magnitude_distribution": "magnitude, class-distribution",
    "random": "random",
}
METHODS = tuple(LABELS)
AT_INIT = frozenset({"snip"})
"""Methods that prune the untrained network (trained afterwards with the full budget)."""


def make_pruner(
    method: str,
    *,
    classes: Mapping[str, str],
    dense: Mapping[str, Tensor],
    seed: int,
    obd_estimates: int,
) -> Pruner:
    """The pruner of ``method`` (module doc). ``classes``: parameter name → weight class;
    ``dense``: the trained weights the class-distribution σ_c are taken from; ``seed``: the
    random method's; ``obd_estimates``: the cap on OBD's curvature estimates per call."""
    if method == "obd":
        steps = AdaptiveSteps(max_re_estimates=obd_estimates)
        return _presets.obd(LeCunDiagonal(), steps=steps)
    if method == "course_obd":
        return Pruner(AccumulatedGradient(), GlobalSelector(min_kept=1))
    if method == "snip":
        return _presets.snip(batches=None)
    if method == "magnitude_blind":
        return _presets.magnitude()
    if method == "magnitude_uniform":
        return Pruner(Magnitude(), ClassUniformSelector(classes, min_kept=1))
    if method == "magnitude_distribution":
        return Pruner(Magnitude(), ClassDistributionSelector.for_magnitude(dense, classes, 1))
    if method == "random":
        return _presets.random(seed)
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def where_pruned(mask: Mask, classes: Mapping[str, str], order: tuple[str, ...]) -> dict:
    """Per weight class: the fraction of its prunable entries pruned (``"pruned"``) and its
    share of all pruned entries (``"share"``)."""
    size = dict.fromkeys(order, 0)
    gone = dict.fromkeys(order, 0)
    for n in mask.names:
        c = classes[n]
        size[c] += mask[n].numel()
        gone[c] += int((~mask[n]).sum())
    total = max(sum(gone.values()), 1)
    return {
        c: {"pruned": gone[c] / size[c] if size[c] else float("nan"), "share": gone[c] / total}
        for c in order
    }


def dense_weights(model: torch.nn.Module) -> dict[str, Tensor]:
    """The model's parameters by clean name, detached copies (the σ_c of class-distribution)."""
    from ..paramdict import named_parameters

    return {k: p.detach().clone() for k, p in named_parameters(model).items()}
