"""optbrain: second-order ("Optimal Brain") pruning for PyTorch.

Public API::

    import optbrain as ob
    problem = ob.Problem(model, torch.nn.CrossEntropyLoss(), loader)
    h = ob.curvature.GGNDiagonal().diagonal(problem)       # dict: parameter name -> diagonal
"""

from . import curvature, errors, paramdict
from .problem import Problem

__version__ = "0.1.0"

__all__ = ["Problem", "curvature", "errors", "paramdict", "__version__"]
