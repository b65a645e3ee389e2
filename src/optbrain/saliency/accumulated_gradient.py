"""The squared accumulated-gradient score that a course project on LSTM pruning called "OBD"
(PAPERS.md §14.2).

Kyrylo-Shyvam/LSTM-Pruning (``code/pruningMethods.py``, class ``OBD``) back-propagates the summed
loss of ``batches`` training batches into the same ``.grad`` buffers, then scores every weight by
``0.5 * grad**2 * w**2`` and deletes below one global threshold::

    s_k = ½ (Σ_b ∂L_b/∂w_k)² w_k²,   L_b = Σ_{n ∈ b} ℓ_n  (the batch's summed loss)

With every batch, Σ_b L_b = N·E, so s_k = ½ (N ∂E/∂w_k)² w_k². This is **not** OBD (½ h_kk w_k²
with a second derivative, :class:`~optbrain.saliency.OBD`), nor the empirical-Fisher OBD
(½ (1/N) Σ_n (∂ℓ_n/∂w_k)² w_k², :class:`~optbrain.curvature.EmpiricalFisherDiagonal` in OBD):
the gradient is summed over the samples *before* it is squared, so at a minimum of E the score
measures the residual gradient ∂E/∂w_k, which is zero there up to the optimiser's noise. Written
as a saliency so that the study of §14.2 can run it beside the real curvature diagonals; the
factor N² does not change the ranking.
"""

from __future__ import annotations

from ..paramdict import ParamDict
from ..problem import Problem
from .gradient_sum import summed_gradient


class AccumulatedGradient:
    """s_k = ½ (Σ_b ∂L_b/∂w_k)² w_k² with L_b the summed per-sample loss of batch b (module doc).

    ``batches``: the first ``batches`` batches of the problem's data (the course project used
    50 batches of 64); ``None``: all of them. Computed in eval mode, in the parameters' dtype.
    On a distributed problem ``batches`` counts per rank and the gradient is summed over the
    ranks before it is squared (``None``: one process's result on the union of the shards).
    """

    def __init__(self, batches: int | None = None):
        if batches is not None and (isinstance(batches, bool) or int(batches) < 1):
            raise ValueError(f"batches must be >= 1 or None, not {batches!r}")
        self.batches = batches

    def __call__(self, problem: Problem) -> ParamDict:
        params, acc, _ = summed_gradient(problem, self.batches, "the accumulated gradient")
        # the sum over the batches of every rank, before squaring
        return {k: 0.5 * g.square() * p.detach().square() for (k, p), g in zip(params.items(), acc)}

    def __repr__(self) -> str:
        return f"AccumulatedGradient(batches={self.batches})"
