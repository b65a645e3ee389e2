"""optbrain: second-order ("Optimal Brain") pruning for PyTorch.

The public API is :data:`__all__`; everything else is private or lives in a named submodule
(:mod:`optbrain.curvature`, :mod:`optbrain.saliency`, :mod:`optbrain.pruners`, ...)::

    import optbrain as ob
    problem = ob.Problem(model, torch.nn.CrossEntropyLoss(), loader)
    mask, info = ob.obd()(problem, sparsity=0.5)   # OBD, sub-stepped where its prediction fails
    info.predicted_increase, info.measured_increase, info.re_estimates
    ob.attach(model, mask)
    history = ob.iterative_prune(model, ob.obd(), ob.schedule.geometric(0.3), rounds=8,
                                 make_problem=lambda m: ob.Problem(m, loss_fn, loader))
    result = ob.prune(model, loss_fn, loader, method="obd", sparsity=0.9)   # train-prune-retrain
    ob.fpe(problem, weight_decay=1e-3)      # NNSYSID's FPE: estimated test error, N_eff
"""

from . import cells, curvature, errors, masking, paramdict, pruners, saliency, schedule, structure
from .generalization import FPEEstimate, FPEUndefinedError, effective_parameters, fpe
from .history import History
from .loop import iterative_prune
from .masking import Mask, attach, detach, load_pruned, save_pruned
from .problem import Problem
from .pruners import (
    METHODS,
    AdaptiveSteps,
    CellPruner,
    LayerwiseOBS,
    OBSPruner,
    PruneInfo,
    Pruner,
    ebd,
    esp,
    gamma_obd,
    gamma_obs,
    layerwise_obs,
    magnitude,
    obd,
    obs,
    ocd,
    random,
    snip,
    unit_obs,
    validation_obd,
)
from .structure import remove_dead_units
from .tasks import prune_model as prune

__version__ = "0.1.0"

__all__ = [
    "FPEEstimate",
    "FPEUndefinedError",
    "METHODS",
    "AdaptiveSteps",
    "CellPruner",
    "History",
    "LayerwiseOBS",
    "Mask",
    "OBSPruner",
    "Problem",
    "PruneInfo",
    "Pruner",
    "__version__",
    "attach",
    "cells",
    "curvature",
    "detach",
    "ebd",
    "effective_parameters",
    "errors",
    "esp",
    "fpe",
    "gamma_obd",
    "gamma_obs",
    "iterative_prune",
    "layerwise_obs",
    "load_pruned",
    "magnitude",
    "masking",
    "obd",
    "obs",
    "ocd",
    "paramdict",
    "prune",
    "pruners",
    "random",
    "remove_dead_units",
    "saliency",
    "save_pruned",
    "schedule",
    "snip",
    "structure",
    "unit_obs",
    "validation_obd",
]
