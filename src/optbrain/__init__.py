"""optbrain: second-order ("Optimal Brain") pruning for PyTorch.

Public API::

    import optbrain as ob
    problem = ob.Problem(model, torch.nn.CrossEntropyLoss(), loader)
    h = ob.curvature.GGNDiagonal().diagonal(problem)       # dict: parameter name -> diagonal
    ob.attach(model, ob.Mask.ones(model).with_pruned({"0.weight": [0, 5]}))
"""

from . import cells, curvature, errors, masking, paramdict, structure
from .layerwise import LayerwiseOBS
from .masking import Mask, attach, detach
from .problem import Problem

__version__ = "0.1.0"

__all__ = [
    "LayerwiseOBS",
    "Mask",
    "Problem",
    "__version__",
    "attach",
    "cells",
    "curvature",
    "detach",
    "errors",
    "masking",
    "paramdict",
    "structure",
]
