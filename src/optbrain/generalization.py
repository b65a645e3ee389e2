"""Estimated generalisation error: NNSYSID's FPE and Pedersen et al.'s effective parameters.

Conventions (those of :class:`~optbrain.problem.Problem` and :class:`~optbrain.saliency.OBD`):
E = (1/N) Σ_n ℓ_n is the per-sample mean of the user's loss on the N training samples, *without*
the weight-decay term; the network is assumed trained to a minimum of E + ½ Σ_k λ_k w_k²
(``weight_decay`` = λ, a number or a dict parameter name → λ, on the same scale as OBD's and OBS's
``weight_decay``: PyTorch's ``weight_decay`` for a ``reduction="mean"`` loss). G is the
Gauss–Newton matrix of E, G = (1/N) Σ_n J_nᵀ (∂²ℓ_n/∂f²) J_n, H = G + Λ with Λ = diag(λ_k), and p
is the number of alive coordinates: every entry of the problem's parameters except those the mask
prunes (biases the mask does not cover count). Then (PAPERS.md §4, §5, §14.4)::

    γ1 = tr(G H⁻¹ G H⁻¹)  (= N_eff, Pedersen, Hansen & Larsen's effective number of parameters)
    γ2 = tr(G H⁻¹)
    no weight decay:   FPE = (N + p)/(N − p) · E                    (Akaike; γ1 = γ2 = p)
    full form:         FPE = (N + γ1)/(N + γ1 − 2γ2) · E            O(p²) memory, O(p³) time
    diagonal form:     γ1 = Σ_k (h_k/(h_k + λ_k))²,  FPE = (N + γ1)/(N − γ1) · E       O(p)

with h = diag G (NNSYSID ``obdprune``'s cheap form, which also puts γ2 ≈ γ1 in the denominator;
``gamma2`` is reported as Σ_k h_k/(h_k + λ_k)). An entry with λ_k = 0 counts fully
(h_k/(h_k + λ_k) := 1, also where h_k = 0), so both forms give p without decay.

**From NNSYSID's convention.** NNSYSID (one output, squared error) writes PI = SSE/(2N), trains
to a minimum of (SSE + θᵀDθ)/(2N), and uses R = ΨΨᵀ (Ψ the per-sample output derivatives) and
H = R + D. For ``nn.MSELoss()`` with one output, E = SSE/N = 2·PI and the Gauss–Newton matrix of
E is G = (2/N)·R; matching minimisers, E + ½λ‖θ‖² = 2·(SSE + θᵀDθ)/(2N) gives D = Nλ/2, so
H_NNSYSID = (N/2)·(G + Λ). Therefore R H_NNSYSID⁻¹ = G (G + Λ)⁻¹: γ1, γ2 and the factor
(N + γ1)/(N + γ1 − 2γ2) are the same numbers in both conventions, and since FPE is that factor
times the training error, our ``fpe`` (in units of E) is NNSYSID's FPE times 2 (in general: times
E/PI). N is the number of samples, as in NNSYSID, also when the model has several outputs.

The formulas are derived for squared error with Gaussian noise around a (regularised) minimum;
for other losses (cross-entropy) they are a heuristic. With ``form="full"`` a G + Λ that is not
positive definite (per-parameter decay leaving singular directions undamped) is damped by the
smallest d of :func:`~optbrain.curvature.linalg.damped_cholesky`'s ladder that factorises it, and
d is reported (``damping``). Directions that neither the data nor the decay determine (a dead
input without decay) add nothing to γ1 or γ2 whatever d is; when the result does depend on d
(the FPE factor moves by more than 1 % with 10·d: the undecayed parameters almost interpolate the
data and N + γ1 − 2γ2 ≈ 0), :func:`fpe` raises :class:`FPEUndefinedError` rather than return a
number made by the damping.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .curvature import DirectInverse, GGNDiagonal
from .curvature.base import DiagonalCurvature
from .curvature.inverse import Coordinates
from .curvature.linalg import damped_cholesky
from .errors import OptbrainError, SingularCurvatureError
from .masking import Mask, current_mask
from .paramdict import named_parameters
from .problem import Problem

log = logging.getLogger(__name__)

__all__ = [
    "DAMPING_RTOL",
    "FORMS",
    "FPEEstimate",
    "FPEUndefinedError",
    "effective_parameters",
    "fpe",
    "weight_decay_vector",
]

FORMS = ("diagonal", "full")

WeightDecay = float | Mapping[str, float]


class FPEUndefinedError(OptbrainError, ValueError):
    """FPE's denominator is not positive: too few samples for the (effective) parameters."""


@dataclass(frozen=True)
class FPEEstimate:
    """One FPE estimate (see the module doc for the formulas).

    ``fpe``: estimated test error in units of E; ``train_error``: E; ``n_eff``: γ1;
    ``n_params``: p (alive coordinates); ``form``: "none" (no weight decay), "diagonal" or "full";
    ``damping``: what was added to G + Λ to factorise it (full form; 0 otherwise).
    """

    fpe: float
    n_eff: float
    train_error: float
    n_samples: int
    n_params: int
    gamma1: float
    gamma2: float
    weight_decay: float | dict[str, float]
    form: str
    damping: float = 0.0

    @property
    def factor(self) -> float:
        """FPE / E."""
        return self.fpe / self.train_error if self.train_error else math.nan

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------- inputs
def check_decay(weight_decay: WeightDecay) -> WeightDecay:
    """A number ≥ 0 or a mapping name → number ≥ 0 (finite); raises TypeError/ValueError."""
    items = weight_decay.items() if isinstance(weight_decay, Mapping) else [("", weight_decay)]
    for name, v in items:
        where = f" for {name!r}" if name else ""
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"weight_decay{where} must be a number >= 0, not {v!r}")
        if not (v >= 0 and math.isfinite(v)):
            raise ValueError(f"weight_decay{where} must be a finite number >= 0, not {v!r}")
    if isinstance(weight_decay, Mapping):
        return {str(k): float(v) for k, v in weight_decay.items()}
    return float(weight_decay)


def _alive_mask(problem: Problem, mask: Mask | None) -> Mask:
    """The mask restricted to the problem's parameters: the attached one by default; an explicit
    one must name only the problem's parameters and prune only entries that are zero."""
    params = problem.parameters()
    if mask is None:
        attached = current_mask(problem.model)
        return Mask({n: attached[n] for n in attached.names if n in params})
    unknown = [n for n in mask.names if n not in params]
    if unknown:
        raise KeyError(f"the mask names parameter(s) {unknown} that the problem does not include")
    for n in mask.names:
        w = params[n].detach()
        if bool((w[~mask[n].to(w.device)] != 0).any()):
            raise ValueError(
                f"the mask prunes entries of {n} whose weights are not zero: attach it first "
                "(optbrain.masking.attach), so that the model is the pruned one"
            )
    return mask


def weight_decay_vector(
    coords: Coordinates, weight_decay: WeightDecay, known: Sequence[str] | None = None
) -> Tensor:
    """λ per alive coordinate (float64, in row order) from a number or a name → λ mapping; the
    mapping may name only ``known`` parameters (default: the coordinates' parameters); those
    outside the coordinates are ignored."""
    if isinstance(weight_decay, Mapping):
        allowed = set(coords.names if known is None else known)
        unknown = [k for k in weight_decay if k not in allowed]
        if unknown:
            raise KeyError(f"weight_decay names unknown parameter(s) {unknown}")
    parts = []
    for n in coords.names:
        lam = weight_decay.get(n, 0.0) if isinstance(weight_decay, Mapping) else weight_decay
        parts.append(torch.full((coords.positions[n].numel(),), float(lam), dtype=torch.float64))
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.float64)


# ---------------------------------------------------------------------------- γ1, γ2
def fraction_determined(h: Tensor, lam: Tensor) -> Tensor:
    """h/(h + λ) per coordinate, 1 where λ = 0 (a coordinate without decay counts fully)."""
    safe = torch.where(lam > 0, h + lam, torch.ones_like(h))
    return torch.where(lam > 0, h / safe, torch.ones_like(h))


def _diagonal_gammas(
    problem: Problem, coords: Coordinates, lam: Tensor, curvature: DiagonalCurvature | None
) -> tuple[float, float]:
    est = curvature if curvature is not None else GGNDiagonal(dtype=torch.float64)
    h = coords.gather(est.diagonal(problem)).to(torch.float64)
    if bool((h < 0).any()):
        raise ValueError(
            f"{est!r} gave negative curvature: FPE needs a positive semi-definite curvature "
            "(the Gauss-Newton diagonal, GGNDiagonal)"
        )
    r = fraction_determined(h, lam.to(h.device))
    return float(r.square().sum()), float(r.sum())


def _traces(chol: Tensor, g: Tensor) -> tuple[float, float]:
    """(γ1, γ2) from the Cholesky factor L of H = LLᵀ: A = L⁻¹ G L⁻ᵀ is symmetric, γ2 = tr(G H⁻¹)
    = tr A, γ1 = tr(A²) = ‖A‖²_F."""
    left = torch.linalg.solve_triangular(chol, g, upper=False)
    a = torch.linalg.solve_triangular(chol, left.T.contiguous(), upper=False)
    a = 0.5 * (a + a.T)
    return float(a.square().sum()), float(torch.diagonal(a).sum())


def _full_gammas(
    problem: Problem, mask: Mask, lam: Tensor, max_params: int | None
) -> tuple[float, float, float, tuple[float, float] | None]:
    """(γ1, γ2, damping, (γ1, γ2) with 10× the damping, or None when none was needed)."""
    opts = {} if max_params is None else {"max_params": max_params}
    g, _coords = DirectInverse("ggn", **opts).matrix(problem, mask)
    g = 0.5 * (g + g.T)
    h = g + torch.diag(lam.to(g.device))
    chol, damping, _attempts = damped_cholesky(h, 0.0)
    if chol is None:
        raise SingularCurvatureError(
            f"G + weight decay is not positive definite even with damping {damping:.3g}"
        )
    g1, g2 = _traces(chol, g)
    if not damping:
        return g1, g2, 0.0, None
    log.warning("G + weight decay is singular; FPE's full form used damping %.3g", damping)
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    more = torch.linalg.cholesky(h + 10 * damping * eye)
    return g1, g2, float(damping), _traces(more, g)


class _Gammas(NamedTuple):
    gamma1: float
    gamma2: float
    p: int
    form: str  # the form used: "none", "diagonal" or "full"
    damping: float = 0.0
    damped_more: tuple[float, float] | None = None  # (γ1, γ2) with 10× the damping


def _gammas(
    problem: Problem,
    weight_decay: WeightDecay,
    mask: Mask | None,
    form: str,
    curvature: DiagonalCurvature | None,
    max_params: int | None,
) -> _Gammas:
    """γ1, γ2, p, the form used and the damping of the full form."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, not {form!r}")
    weight_decay = check_decay(weight_decay)
    mask = _alive_mask(problem, mask)
    coords = Coordinates(problem.parameters(), mask)
    p = coords.size
    if p == 0:
        raise ValueError("no alive coordinates: every entry is pruned")
    known = named_parameters(problem.model, trainable_only=False)
    lam = weight_decay_vector(coords, weight_decay, list(known))
    if not bool((lam > 0).any()):
        return _Gammas(float(p), float(p), p, "none")
    if form == "diagonal":
        g1, g2 = _diagonal_gammas(problem, coords, lam, curvature)
        return _Gammas(g1, g2, p, form)
    g1, g2, damping, more = _full_gammas(problem, mask, lam, max_params)
    return _Gammas(g1, g2, p, form, damping, more)


DAMPING_RTOL = 0.01
"""How far (relative) the full form's FPE factor may move when its damping is multiplied by 10."""


def _check_damping(gam: _Gammas, n: int, factor: float) -> None:
    """Raise :class:`FPEUndefinedError` when a damped full form's FPE depends on the damping."""
    if gam.damped_more is None:
        return
    g1, g2 = gam.damped_more
    denom = n + g1 - 2 * g2
    other = (n + g1) / denom if denom > 0 else math.inf
    if abs(other - factor) <= DAMPING_RTOL * factor:
        return
    raise FPEUndefinedError(
        f"FPE is undefined: G + weight decay is singular and the full form needed damping "
        f"{gam.damping:.3g}, on which the result depends: N + γ1 - 2γ2 = "
        f"{n + gam.gamma1 - 2 * gam.gamma2:.4g} (N = {n}, γ1 = {gam.gamma1:.4g}, "
        f"γ2 = {gam.gamma2:.4g}) gives FPE/E = {factor:.4g}, and 10x the damping gives "
        f"{other:.4g}: the parameters without decay (almost) interpolate the N samples; put "
        "weight decay on every parameter, or use more data or fewer parameters"
    )


# ---------------------------------------------------------------------------- public
def effective_parameters(
    problem: Problem,
    weight_decay: WeightDecay = 0.0,
    mask: Mask | None = None,
    form: str = "diagonal",
    *,
    curvature: DiagonalCurvature | None = None,
    max_params: int | None = None,
) -> float:
    """N_eff = tr(G H⁻¹ G H⁻¹), H = G + Λ (Pedersen, Hansen & Larsen; PAPERS.md §5): p without
    weight decay, smaller with it, falling as λ grows. ``form="diagonal"`` uses
    Σ_k (h_k/(h_k + λ_k))² (h = diag G from ``curvature``, default the exact GGN diagonal);
    ``"full"`` the dense GGN (at most ``max_params`` coordinates, default that of
    :class:`~optbrain.curvature.DirectInverse`). Arguments as :func:`fpe`."""
    return _gammas(problem, weight_decay, mask, form, curvature, max_params).gamma1


def fpe(
    problem: Problem,
    weight_decay: WeightDecay = 0.0,
    mask: Mask | None = None,
    form: str = "diagonal",
    *,
    curvature: DiagonalCurvature | None = None,
    max_params: int | None = None,
) -> FPEEstimate:
    """NNSYSID's final prediction error of the model on ``problem`` (its *training* data).

    ``weight_decay`` λ ≥ 0 (number or dict name → λ) as in :class:`~optbrain.saliency.OBD`;
    ``mask`` (default: the mask attached to the model) says which entries are pruned: p counts
    the other entries of the problem's parameters. ``form``: "diagonal" (O(p)) or "full"
    (O(p²), dense GGN); without weight decay neither matrix is needed. Formulas and the
    conversion from NNSYSID's PI = SSE/(2N) in the module doc.

    Raises :class:`FPEUndefinedError` when the denominator is not positive (without weight decay:
    N ≤ p; diagonal form: N ≤ N_eff; full form: N + γ1 − 2γ2 ≤ 0) — never a negative FPE — and
    also when the full form needed damping to factorise G + Λ and the FPE depends on it (the
    factor moves by more than :data:`DAMPING_RTOL` when the damping is multiplied by 10: the
    undecayed parameters all but interpolate the data, N + γ1 − 2γ2 ≈ 0, and the value would be
    an artefact of the damping); ``ValueError``/``TypeError`` for a negative or non-numeric
    weight decay or an unknown form.
    """
    gam = _gammas(problem, weight_decay, mask, form, curvature, max_params)
    g1, g2, p, used, damping = gam.gamma1, gam.gamma2, gam.p, gam.form, gam.damping
    n = problem.n_samples
    denom = {"none": n - p, "diagonal": n - g1, "full": n + g1 - 2 * g2}[used]
    if not denom > 0:
        what = {
            "none": f"N = {n} samples <= p = {p} parameters",
            "diagonal": f"N = {n} samples <= N_eff = {g1:.4g}",
            "full": f"N + γ1 - 2γ2 = {denom:.4g} <= 0 (N = {n}, γ1 = {g1:.4g}, γ2 = {g2:.4g})",
        }[used]
        raise FPEUndefinedError(
            f"FPE is undefined: {what}; use more data, fewer parameters or more weight decay"
        )
    factor = (n + g1) / denom
    _check_damping(gam, n, factor)
    err = problem.objective()
    return FPEEstimate(
        fpe=factor * err,
        n_eff=g1,
        train_error=err,
        n_samples=n,
        n_params=p,
        gamma1=g1,
        gamma2=g2,
        weight_decay=check_decay(weight_decay),
        form=used,
        damping=damping,
    )


def fpe_fields(problem: Problem, **options: Any) -> dict[str, float]:
    """:func:`fpe`'s estimate as a round's record fields (``fpe``, ``n_eff``, ``train_error``,
    ``gamma2``, ``n_params``, ``damping``); where FPE is undefined, ``fpe`` NaN beside the
    training error (logged)."""
    try:
        est = fpe(problem, **options)
    except FPEUndefinedError as exc:
        log.warning("no FPE for this round: %s", exc)
        return {"fpe": math.nan, "train_error": problem.objective()}
    return {
        "fpe": est.fpe,
        "n_eff": est.n_eff,
        "train_error": est.train_error,
        "gamma2": est.gamma2,
        "n_params": float(est.n_params),
        "damping": est.damping,
    }
