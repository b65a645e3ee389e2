"""The exact diagonal of the generalised Gauss–Newton matrix."""

from __future__ import annotations

from ..paramdict import ParamDict
from ..problem import Problem
from . import generic, losses
from .structured import StructuredEstimator


class GGNDiagonal(StructuredEstimator):
    """diag G with G = (1/N) Σ_n J_nᵀ H_n J_n, J_n = ∂f(x_n)/∂θ, H_n = ∂²ℓ_n/∂f² (exact).

    ``method="backprop"`` back-propagates the loss Hessian's square root (C columns for C output
    components) through a chain of registry layers; ``"func"`` computes per-sample Jacobian-vector
    products with ``torch.func`` for any module (tied weights included); ``"auto"`` picks the
    first when it applies. Always ≥ 0 for convex losses (MSE, cross-entropy).
    """

    mode = "ggn"

    def _generic(self, work: Problem) -> ParamDict:
        return generic.per_sample_squares(
            work, lambda o, y: losses.hessian_factor(work, o, y), self.progress
        )
