"""The exact diagonal of the Hessian of the objective."""

from __future__ import annotations

from ..paramdict import ParamDict
from ..problem import Problem
from . import generic
from .structured import StructuredEstimator


class ExactHessianDiagonal(StructuredEstimator):
    """diag ∇²E, exact (may be negative away from a minimum).

    ``method="backprop"`` propagates the per-sample Hessian at each layer's output as signed
    columns plus a diagonal (the loss Hessian's square root, and every activation's
    f''(a)·∂ℓ/∂x residual): about (C + hidden units) backward columns, for chains of registry
    layers. ``"hvp"`` runs one Hessian-vector product per parameter with ``torch.func`` — any
    module, but only for small models. ``"auto"`` picks the first when it applies.
    """

    mode = "hessian"
    methods = ("auto", "backprop", "hvp")

    def _generic(self, work: Problem) -> ParamDict:
        return generic.hvp_diagonal(work, self.progress)
