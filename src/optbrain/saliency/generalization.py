"""Saliencies for generalisation and for networks that are not at a minimum (PAPERS.md §5, §8,
§14.3, §14.4).

All follow :mod:`optbrain.saliency.base` (lowest is pruned first) and are returned in float64
whatever the parameters' dtype (a float32 training part of ~1e-10 would round into a tie once
γOBD's constant ~2E/N is subtracted), with E the per-sample mean
objective of the :class:`~optbrain.problem.Problem` (unregularised), h a diagonal curvature of it
(default: the exact Gauss–Newton diagonal), g = ∂E/∂w and λ the weight decay on OBD's scale:

* :class:`GammaOBD` — Pedersen, Hansen & Larsen's estimated change of the *test* error::

      δE_test,k = (λ_k + ½ h_k) w_k² − (2/N) (h_k/(h_k + λ_k))² E

  the OBD training saliency minus the drop of the FPE penalty when weight k stops counting
  towards N_eff (eq. 6 with the diagonal N_eff; h_k/(h_k + λ_k) := 1 where λ_k = 0, so with no
  decay every saliency is shifted by the same −2E/N and the ranking is OBD's). Between two
  weights of equal training saliency it deletes the one least held by the data (most by decay).
  Negative: deleting k should lower the estimated test error; the γOBD stopping rule stops when
  every saliency is positive (:mod:`optbrain.pruners.generalization`).
* :class:`GammaOBS` — the same for OBS with weight decay (NNSYSID ``obsprune``, §14.4): the
  change ζ_q of the unregularised E after deleting q with the OBS update, minus
  (2/N)(N_eff − N_eff,−q) E, where N_eff,−q = tr(G P G P) with P the inverse of H = G + λI
  reduced by q. With a = [H⁻¹]_qq, b = [H⁻²]_qq, t = [H⁻³]_qq the drop is
  N_eff − N_eff,−q = 1 − 2λb/a + 2λ²t/a − λ²b²/a² (= (h/(h+λ))² for a diagonal H; 1 for λ = 0).
* :class:`ESP` — Tresp, Neuneier & Zimmermann's A + B = ½ h_k w_k² − g_k w_k: the change of E
  when w_k is zeroed in the quadratic model around the *current* point (exact on a quadratic E,
  for nets that are not at a minimum, e.g. early stopped).
* :class:`EBD` — ESP + C with C = ½ g_k²/h_k: the change relative to the value E would reach
  by converging along w_k first, = ½ h_k (w_k − g_k/h_k)² ≥ 0. Where h_k ≤ 0 the revival term
  is undefined and C = 0 (for the Gauss–Newton diagonal h_k = 0 implies g_k = 0: the weight
  does not reach the output).
* :class:`ValidationOBD` — Larsen, Hansen, Svarer & Ohlsson's validation-set saliency
  −w_k ∂E_val/∂w_k + ½ w_k² ∂²E_val/∂w_k²: ESP on the validation data given explicitly (the
  second derivative is the curvature's, GGN by default; pass
  :class:`~optbrain.curvature.ExactHessianDiagonal` for the exact one).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..curvature import GGNDiagonal
from ..curvature.base import DiagonalCurvature
from ..generalization import check_decay, fraction_determined
from ..paramdict import ParamDict
from ..problem import Problem
from .base import detached_params
from .decay import check_decay_names, decay_of
from .gradient_sum import summed_gradient
from .obs import (
    alive_inverse,
    check_weight_decay,
    obs_saliencies,
    resolve_inverse,
    scatter_alive,
)

__all__ = ["EBD", "ESP", "GammaOBD", "GammaOBS", "ValidationOBD", "objective_gradient"]


def objective_gradient(problem: Problem) -> ParamDict:
    """∂E/∂w of the problem's parameters over all its data (model in eval mode), float64."""
    params, acc, n = summed_gradient(problem, None, "the objective's gradient", dtype=torch.float64)
    return {k: a / n for k, a in zip(params, acc)}


def _curvature(curvature: DiagonalCurvature | None) -> DiagonalCurvature:
    return curvature if curvature is not None else GGNDiagonal()


class GammaOBD:
    """δE_test,k = (λ_k + ½h_k)w_k² − (2/N)(h_k/(h_k + λ_k))² E (module doc; Pedersen et al.).

    ``weight_decay``: a number or a dict name → λ, as :class:`~optbrain.saliency.OBD`'s."""

    def __init__(
        self,
        weight_decay: float | Mapping[str, float] = 0.0,
        curvature: DiagonalCurvature | None = None,
    ):
        self.weight_decay = check_decay(weight_decay)
        self.curvature = _curvature(curvature)

    def __call__(self, problem: Problem) -> ParamDict:
        check_decay_names(self.weight_decay, problem.model)
        h = self.curvature.diagonal(problem)
        w = detached_params(problem)
        penalty = 2.0 * problem.objective() / problem.n_samples
        out: dict[str, Tensor] = {}
        for k, h32 in h.items():
            # float64: the training part of a near-dead weight (~1e-10) must survive the
            # subtraction of the penalty (~1e-2), or the ranking turns into index order
            hk = h32.to(torch.float64)
            lam = torch.full_like(hk, decay_of(self.weight_decay, k))
            train = (0.5 * hk + lam) * w[k].to(device=hk.device, dtype=hk.dtype).square()
            out[k] = train - penalty * fraction_determined(hk, lam).square()
        return out

    def __repr__(self) -> str:
        return f"GammaOBD(weight_decay={self.weight_decay!r}, curvature={self.curvature!r})"


def neff_drop(hinv: Tensor, weight_decay: float) -> Tensor:
    """N_eff − N_eff,−q for every row q of H⁻¹ = (G + λI)⁻¹ (module doc); 1 when λ = 0."""
    if weight_decay == 0:
        return torch.ones(hinv.shape[0], dtype=hinv.dtype, device=hinv.device)
    lam = weight_decay
    h2 = hinv @ hinv
    a = torch.diagonal(hinv)
    b = torch.diagonal(h2)
    t = (h2 * hinv).sum(1)  # diag(H⁻³), H⁻¹ symmetric
    safe = torch.where(a > 0, a, torch.ones_like(a))
    return 1 - 2 * lam * b / safe + 2 * lam**2 * t / safe - (lam * b / safe) ** 2


class GammaOBS:
    """ζ_q − (2/N)(N_eff − N_eff,−q)·E: NNSYSID's OBS saliency with weight decay (the change of
    the unregularised E after the OBS deletion of q) corrected for generalisation (module doc).

    ``weight_decay`` λ ≥ 0 (one number); ``inverse`` as :class:`~optbrain.saliency.OBS`'s
    (default ``AutoInverse(alpha=λ or 1e-6)``). Used in a :class:`~optbrain.pruners.Pruner` it ranks
    without applying the OBS weight update (retraining moves the other weights)."""

    def __init__(self, weight_decay: float = 0.0, inverse: Any = None):
        self.weight_decay = check_weight_decay(weight_decay)
        self.inverse = resolve_inverse(inverse, self.weight_decay)

    def __call__(self, problem: Problem) -> ParamDict:
        inv, theta = alive_inverse(self.inverse, problem, self.weight_decay)
        train = obs_saliencies(inv, theta, self.weight_decay)
        penalty = 2.0 * problem.objective() / problem.n_samples
        drop = neff_drop(inv.matrix, self.weight_decay)
        return scatter_alive(inv, train - penalty * drop, problem)

    def __repr__(self) -> str:
        return f"GammaOBS(weight_decay={self.weight_decay!r}, inverse={self.inverse!r})"


class ESP:
    """½ h_k w_k² − g_k w_k: the change of E when w_k is zeroed, at the current (not necessarily
    minimal) point (Tresp et al.'s A + B; exact for a quadratic E with h its Hessian diagonal)."""

    def __init__(self, curvature: DiagonalCurvature | None = None):
        self.curvature = _curvature(curvature)

    def parts(self, problem: Problem) -> tuple[ParamDict, ParamDict, ParamDict]:
        """(h, g, w) in float64."""
        h = self.curvature.diagonal(problem)
        g = objective_gradient(problem)
        w = detached_params(problem)
        f64 = torch.float64
        return (
            {k: v.to(f64) for k, v in h.items()},
            {k: g[k].to(h[k].device) for k in h},
            {k: w[k].to(device=h[k].device, dtype=f64) for k in h},
        )

    def __call__(self, problem: Problem) -> ParamDict:
        h, g, w = self.parts(problem)
        return {k: 0.5 * h[k] * w[k].square() - g[k] * w[k] for k in h}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(curvature={self.curvature!r})"


class EBD(ESP):
    """ESP + ½ g_k²/h_k = ½ h_k (w_k − g_k/h_k)² (Tresp et al.'s A + B + C); C = 0 where
    h_k ≤ 0 (module doc)."""

    def __call__(self, problem: Problem) -> ParamDict:
        h, g, w = self.parts(problem)
        out = {}
        for k in h:
            pos = h[k] > 0
            revival = torch.where(pos, g[k].square() / torch.where(pos, h[k], 1.0), 0.0)
            out[k] = 0.5 * h[k] * w[k].square() - g[k] * w[k] + 0.5 * revival
        return out


class ValidationOBD:
    """−w_k ∂E_val/∂w_k + ½ w_k² ∂²E_val/∂w_k² on ``validation`` data (Larsen et al., §14.3).

    ``validation``: one ``(X, Y)`` tuple of tensors, a ``DataLoader`` or any re-iterable of
    batches, evaluated with the training problem's model, loss (or ``loss_fn``) and parameters.
    Negative where deleting the weight should lower the validation error."""

    def __init__(
        self,
        validation: Any = None,
        curvature: DiagonalCurvature | None = None,
        loss_fn: Any = None,
    ):
        if validation is None:
            raise ValueError(
                "ValidationOBD needs a validation set: ValidationOBD(validation=(X_val, Y_val)) "
                "or a DataLoader of held-out batches"
            )
        self.validation = validation
        self.loss_fn = loss_fn
        self.esp = ESP(curvature)

    def validation_problem(self, problem: Problem) -> Problem:
        params = problem.params if problem.params is not None else list(problem.parameters())
        loss = self.loss_fn if self.loss_fn is not None else problem.loss_fn
        return Problem(problem.model, loss, self.validation, params)

    def __call__(self, problem: Problem) -> ParamDict:
        return self.esp(self.validation_problem(problem))

    def __repr__(self) -> str:
        return f"ValidationOBD(curvature={self.esp.curvature!r})"
