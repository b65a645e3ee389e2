"""LeCun, Denker & Solla's (1989) diagonal second-derivative recursion (OBD paper, §2.1)."""

from __future__ import annotations

from ..errors import UnsupportedModuleError
from ..paramdict import ParamDict
from ..problem import Problem
from . import backprop
from .base import DiagonalEstimator, in_dtype
from .graph import sweep
from .paths import Path, choose
from .rules import GENERIC_ESTIMATORS


class LeCunDiagonal(DiagonalEstimator):
    """The published recursion, generalised from MSE to any loss.

    Per sample, from the output backwards (a = pre-activation, x = f(a), w_li from unit i to l):

    * output boundary: ∂²ℓ/∂f² taken as the *diagonal* of the loss Hessian (MSE: 2/d per output
      component for ``reduction="mean"``, i.e. LeCun's 2 f'² boundary once the output activation is
      applied; cross-entropy: p_c(1 − p_c));
    * through a layer: ∂²ℓ/∂x_i² = Σ_l w_li² ∂²ℓ/∂a_l² (convolutions: the same with squared
      kernels; average pooling: coefficients (1/k)²; max pooling: routed to the argmax);
    * through an activation: ∂²ℓ/∂a_i² = f'(a_i)² ∂²ℓ/∂x_i² + f''(a_i) ∂ℓ/∂x_i; with
      ``gauss_newton=True`` (Levenberg–Marquardt) the f'' term is dropped, which makes every
      estimate ≥ 0;
    * per connection: ∂²ℓ/∂w_ij² = ∂²ℓ/∂a_i² · x_j²; a shared weight (convolution kernel entry,
      or a parameter used by several layers) gets the sum over its connections.

    The recursion drops the cross-unit terms of the back-propagated curvature, so it is **not** the
    exact diagonal of the Hessian (or of the Gauss–Newton matrix) in general. It is exact for the
    last layer when the loss Hessian at the output is diagonal (MSE), and for a one-layer model.
    On a graph (residual additions, concatenations, a custom ``forward``) the diagonals of a node
    used at several places **add** — the diagonal approximation again, consistent with the
    shared-weight rule — and the functions between layers pass it by their squared Jacobian
    entries (:mod:`optbrain.curvature.graph.glue`). Costs about one gradient pass. Models made of
    registry layers (:mod:`optbrain.curvature.rules`), in an ``nn.Sequential`` or any module
    torch.fx can trace, are supported; others raise ``UnsupportedModuleError`` naming why.
    """

    generic = False

    def __init__(self, gauss_newton: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.gauss_newton = gauss_newton

    @property
    def mode(self) -> str:
        return "lecun_gn" if self.gauss_newton else "lecun"

    def path(self, problem: Problem) -> Path:
        """The engine the recursion runs on (``chain`` or ``graph``; ``generic`` means it
        cannot run, and why)."""
        return choose(problem, type(self).__name__, self.mode)

    def diagonal(self, problem: Problem) -> ParamDict:
        work = in_dtype(problem, self.dtype)
        params = problem.parameters()
        name = type(self).__name__
        path = self.path(work)
        wanted = params if work is problem else work.parameters()
        if path.engine == "chain":
            out = backprop.run(
                work, self.mode, estimator=name, tick=self.progress, chain=path.chain,
                wanted=wanted,
            )  # fmt: skip
        elif path.engine == "graph":
            out = sweep.run(
                work, path.graph, self.mode, estimator=name, wanted=wanted,
                tick=self.progress,
            )  # fmt: skip
        else:
            raise UnsupportedModuleError(
                f"{name}: LeCun's recursion is defined on layers and has no torch.func form; "
                f"this model cannot be read as a graph of registry layers ({path.reason}). Use one "
                f"of {', '.join(GENERIC_ESTIMATORS)}"
            )
        return self._finish(problem, out, params)
