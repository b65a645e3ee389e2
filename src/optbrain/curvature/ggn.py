"""The exact diagonal of the generalised Gauss–Newton matrix."""

from __future__ import annotations

from ..paramdict import ParamDict
from ..problem import Problem
from . import backprop, generic, losses
from .base import DiagonalEstimator, in_dtype, structured_applies

_METHODS = ("auto", "backprop", "func")


def check_method(method: str, allowed: tuple[str, ...]) -> str:
    if method not in allowed:
        raise ValueError(f"method must be one of {allowed}, not {method!r}")
    return method


class GGNDiagonal(DiagonalEstimator):
    """diag G with G = (1/N) Σ_n J_nᵀ H_n J_n, J_n = ∂f(x_n)/∂θ, H_n = ∂²ℓ_n/∂f² (exact).

    ``method="backprop"`` back-propagates the loss Hessian's square root (C columns for C output
    components) through a chain of registry layers; ``"func"`` computes per-sample Jacobian-vector
    products with ``torch.func`` for any module (tied weights included); ``"auto"`` picks the
    first when it applies. Always ≥ 0 for convex losses (MSE, cross-entropy).
    """

    def __init__(self, method: str = "auto", **kwargs):
        super().__init__(**kwargs)
        self.method = check_method(method, _METHODS)

    def diagonal(self, problem: Problem) -> ParamDict:
        work = in_dtype(problem, self.dtype)
        name = type(self).__name__
        if self.method == "backprop" or (self.method == "auto" and structured_applies(work, name)):
            out = backprop.run(work, "ggn", estimator=name, tick=self.progress)
        else:
            out = generic.per_sample_squares(
                work, lambda o, y: losses.hessian_factor(work, o, y), self.progress
            )
        return self._finish(problem, out)
