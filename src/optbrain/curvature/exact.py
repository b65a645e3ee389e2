"""The exact diagonal of the Hessian of the objective."""

from __future__ import annotations

from ..paramdict import ParamDict
from ..problem import Problem
from . import backprop, generic
from .base import DiagonalEstimator, in_dtype, structured_applies
from .ggn import check_method

_METHODS = ("auto", "backprop", "hvp")


class ExactHessianDiagonal(DiagonalEstimator):
    """diag ∇²E, exact (may be negative away from a minimum).

    ``method="backprop"`` propagates the per-sample Hessian at each layer's output as signed
    columns plus a diagonal (the loss Hessian's square root, and every activation's
    f''(a)·∂ℓ/∂x residual): about (C + hidden units) backward columns, for chains of registry
    layers. ``"hvp"`` runs one Hessian-vector product per parameter with ``torch.func`` — any
    module, but only for small models. ``"auto"`` picks the first when it applies.
    """

    def __init__(self, method: str = "auto", **kwargs):
        super().__init__(**kwargs)
        self.method = check_method(method, _METHODS)

    def diagonal(self, problem: Problem) -> ParamDict:
        work = in_dtype(problem, self.dtype)
        name = type(self).__name__
        if self.method == "backprop" or (self.method == "auto" and structured_applies(work, name)):
            out = backprop.run(work, "hessian", estimator=name, tick=self.progress)
        else:
            out = generic.hvp_diagonal(work, self.progress)
        return self._finish(problem, out)
