"""Optimal Brain Damage saliency (LeCun, Denker & Solla 1989), optionally weight-decay aware."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from ..curvature import GGNDiagonal
from ..curvature.base import DiagonalCurvature
from ..paramdict import ParamDict
from ..problem import Problem
from .base import detached_params
from .decay import check_decay_names, decay_of


class OBD:
    """s_k = ½ h_kk w_k², h from any diagonal curvature estimator (default: exact GGN diagonal).

    With ``weight_decay=λ`` (a float, or a dict name → float for per-layer decay) the network is
    assumed trained to a minimum of E + (λ/2)‖w‖². There ∂E/∂w = −λw, so deleting w_k raises the
    *unregularised* objective by s_k = (λ + ½ h_kk) w_k² — the NNSYSID ``obdprune`` saliency and
    Pedersen, Hansen & Larsen's eq. 9 (PAPERS.md §4).

    λ is relative to E, the per-sample *mean* objective of :class:`~optbrain.problem.Problem`,
    whatever the loss's reduction: PyTorch's ``weight_decay=λ`` for a ``reduction="mean"`` loss,
    but λ/b for a ``reduction="sum"`` loss trained on batches of b samples (full batch: λ/N),
    since Σ_batch ℓ + (λ/2)‖w‖² = b·(E_batch + (λ/(2b))‖w‖²). Not converted automatically: the
    training batch size is not known here.
    """

    def __init__(
        self,
        curvature: DiagonalCurvature | None = None,
        weight_decay: float | Mapping[str, float] = 0.0,
    ):
        self.curvature = curvature if curvature is not None else GGNDiagonal()
        if isinstance(weight_decay, Mapping):
            bad = {k: v for k, v in weight_decay.items() if not v >= 0}
        else:
            bad = {"weight_decay": weight_decay} if not weight_decay >= 0 else {}
        if bad:
            raise ValueError(f"weight decay must be a number >= 0, got {bad}")
        self.weight_decay = weight_decay

    def __call__(self, problem: Problem) -> ParamDict:
        check_decay_names(self.weight_decay, problem.model)
        h = self.curvature.diagonal(problem)
        w = detached_params(problem)
        out: dict[str, Tensor] = {}
        for k, hk in h.items():
            wk = w[k].to(hk.dtype)
            out[k] = (0.5 * hk + decay_of(self.weight_decay, k)) * wk.square()
        return out

    def __repr__(self) -> str:
        return f"OBD(curvature={self.curvature!r}, weight_decay={self.weight_decay!r})"
