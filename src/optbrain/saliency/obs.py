"""Optimal Brain Surgeon saliencies (Hassibi & Stork 1993), optionally weight-decay aware.

Without weight decay the saliency of coordinate q is L_q = w_q² / (2 [H⁻¹]_qq): the increase of E
after deleting w_q *and* moving every other alive coordinate by δw = −(w_q/[H⁻¹]_qq) H⁻¹ e_q, in
the quadratic model around a minimum. With weight decay λ (the network trained to a minimum of
E + (λ/2)‖w‖², every parameter decayed) the inverse is that of H = R + λI (R the Gauss–Newton
matrix of E) and the saliency is the change of the *unregularised* E (NNSYSID ``obsprune``,
PAPERS.md §4): with γ_q = w_q/[H⁻¹]_qq,

    ζ_q = γ_q [H⁻¹(λw)]_q + ½ γ_q² [H⁻¹ R H⁻¹]_qq,   H⁻¹ R H⁻¹ = H⁻¹ − λ H⁻²,

which reduces to OBD's (λ + ½h)w² when H is diagonal.

λ is relative to E, the per-sample *mean* objective of :class:`~optbrain.problem.Problem`,
whatever the loss's reduction. For a loss with ``reduction="mean"`` that is PyTorch's
``weight_decay=λ`` (any batch size). For ``reduction="sum"`` training minimises
Σ_batch ℓ + (λ/2)‖w‖² = b·(E_batch + (λ/(2b))‖w‖²) with b samples per batch: pass λ/b (full
batch: λ/N). The scale is not converted automatically because the training batch size is not
known here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ..curvature.inverse import AutoInverse, InverseHessian
from ..errors import SingularCurvatureError, UnsupportedArgumentError
from ..masking import Mask, current_mask
from ..paramdict import ParamDict
from ..problem import Problem


def check_weight_decay(weight_decay: float) -> float:
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)):
        raise TypeError(f"weight_decay must be a number >= 0, not {weight_decay!r}")
    if not weight_decay >= 0 or math.isinf(weight_decay):
        raise ValueError(f"weight_decay must be a finite number >= 0, not {weight_decay!r}")
    return float(weight_decay)


def resolve_inverse(inverse, weight_decay: float):
    """The inverse estimator to use: ``AutoInverse(alpha=λ or 1e-6)`` by default; a given one must
    add exactly λ·I when ``weight_decay=λ > 0`` (its ``regularizer``)."""
    if inverse is None:
        return AutoInverse(alpha=weight_decay if weight_decay > 0 else 1e-6)
    if not hasattr(inverse, "inverse"):
        raise TypeError(f"inverse must have an .inverse(problem, mask) method, not {inverse!r}")
    if weight_decay > 0 and getattr(inverse, "structured", False):
        raise UnsupportedArgumentError(
            f"weight_decay needs the dense inverse (H⁻¹RH⁻¹ couples every coordinate); "
            f"{inverse!r} is structured: use AutoInverse(alpha={weight_decay}) or weight_decay=0"
        )
    if weight_decay > 0:
        reg = getattr(inverse, "regularizer", None)
        if reg is None or not math.isclose(reg, weight_decay, rel_tol=1e-12, abs_tol=0.0):
            raise ValueError(
                f"weight_decay={weight_decay} needs the inverse of R + {weight_decay}·I, but "
                f"{inverse!r} adds {reg}·I; pass e.g. AutoInverse(alpha={weight_decay}) or "
                "leave inverse=None"
            )
    return inverse


def check_regularizer(inv: InverseHessian, weight_decay: float) -> None:
    """ζ_q needs the inverse of R + λ·I exactly: raise when the estimator had to add more (a
    :func:`~optbrain.curvature.inverse.damped_inverse` fallback), rather than return a
    silently wrong saliency. Inverses whose ``info`` records neither "alpha" nor "damping" are
    trusted (their ``regularizer`` was checked by :func:`resolve_inverse`)."""
    if weight_decay == 0 or not ({"alpha", "damping"} & set(inv.info)):
        return
    added = float(inv.info.get("alpha", 0.0)) + float(inv.info.get("damping", 0.0))
    if not math.isclose(added, weight_decay, rel_tol=1e-9, abs_tol=0.0):
        raise SingularCurvatureError(
            f"weight_decay={weight_decay} needs the inverse of R + {weight_decay}·I, but that "
            f"matrix is not positive definite and the inverse fell back to R + {added:.3g}·I "
            f"(info['fallbacks']): the network is not at a minimum of E + "
            f"({weight_decay}/2)·‖w‖². Train it further, or use weight_decay=0"
        )


def obs_saliencies(inv: InverseHessian, theta: Tensor, weight_decay: float = 0.0) -> Tensor:
    """Single-coordinate saliency of every row of ``inv`` (+inf for eliminated rows); a
    structured inverse (block-diagonal, K-FAC) without ``weight_decay`` needs only its
    diagonal."""
    d = inv.diagonal_vector()
    safe = torch.where(inv.alive, d, torch.ones_like(d))
    if weight_decay == 0:
        s = theta.square() / (2 * safe)
    else:
        h = inv.matrix
        gamma = theta / safe
        first = gamma * weight_decay * (h @ theta)
        rhr = d - weight_decay * h.square().sum(1)  # diag(H⁻¹ − λH⁻²), H⁻¹ symmetric
        s = first + 0.5 * gamma.square() * rhr
    return torch.where(inv.alive, s, torch.inf)


def group_step(
    inv: InverseHessian,
    theta: Tensor,
    rows: int | Sequence[int] | Tensor,
    weight_decay: float = 0.0,
) -> tuple[float, Tensor]:
    """(ΔE, δθ) for deleting ``rows`` together; ΔE is the change of the unregularised E when
    ``weight_decay`` > 0 (γ = (H⁻¹_QQ)⁻¹ θ_Q, δθ = −H⁻¹_{:,Q} γ)."""
    loss, delta = inv.step_vector(theta, rows)
    if weight_decay == 0:
        return loss, delta
    idx = torch.as_tensor(rows, dtype=torch.long, device=theta.device).reshape(-1)
    h = inv.matrix
    gamma = inv._block_solve(idx, theta[idx])
    cols = h[:, idx] @ gamma  # H⁻¹_{:,Q} γ = −δθ
    rhr = h[idx][:, idx] - weight_decay * (h[idx] @ h[:, idx])
    change = weight_decay * float(theta @ cols) + 0.5 * float(gamma @ (rhr @ gamma))
    return change, delta


def group_saliency(
    inv: InverseHessian, theta: Tensor, rows: Tensor, weight_decay: float = 0.0
) -> float:
    """ΔE of deleting ``rows`` together, without forming δθ when there is no weight decay."""
    if weight_decay == 0:
        wq = theta[rows]
        return 0.5 * float(wq @ inv._block_solve(rows, wq))
    return group_step(inv, theta, rows, weight_decay)[0]


def alive_inverse(inverse, problem: Problem, weight_decay: float):
    """(H⁻¹ over the problem's parameters left alive by the attached mask, their values θ);
    checks that the inverse's regulariser is the decay's."""
    params = problem.parameters()
    attached = current_mask(problem.model)
    mask = Mask({n: attached[n] for n in attached.names if n in params})
    inv = inverse.inverse(problem, mask)
    check_regularizer(inv, weight_decay)
    return inv, inv.gather(params)


def scatter_alive(inv, s: Tensor, problem: Problem) -> ParamDict:
    """Row saliencies ``s`` as a ParamDict on the parameters' devices (0 where pruned)."""
    params = problem.parameters()
    out = inv.scatter(torch.where(inv.alive, s, torch.zeros_like(s)))
    return {k: out[k].to(device=params[k].device) for k in params}


class OBS:
    """s_q = w_q² / (2 [H⁻¹]_qq) (or ζ_q with ``weight_decay``), one shot, from ``inverse``.

    For ranking and plots: used in a :class:`~optbrain.pruner.Pruner` it deletes without the OBS
    weight update; :class:`~optbrain.surgeon.OBSPruner` (``optbrain.pruner.obs()``) applies the
    update and re-ranks after every deletion. The inverse covers the problem's parameters; entries
    pruned by the mask attached to the model are left out (saliency 0). ``inverse`` defaults to
    ``AutoInverse(alpha=1e-6)`` (``alpha=weight_decay`` when it is > 0). ``weight_decay`` is
    relative to the mean objective E: λ/b for a ``reduction="sum"`` loss trained with PyTorch's
    ``weight_decay=λ`` on batches of b samples (see the module doc).
    """

    def __init__(self, inverse=None, weight_decay: float = 0.0):
        self.weight_decay = check_weight_decay(weight_decay)
        self.inverse = resolve_inverse(inverse, self.weight_decay)

    def __call__(self, problem: Problem) -> ParamDict:
        inv, theta = alive_inverse(self.inverse, problem, self.weight_decay)
        return scatter_alive(inv, obs_saliencies(inv, theta, self.weight_decay), problem)

    def __repr__(self) -> str:
        return f"OBS(inverse={self.inverse!r}, weight_decay={self.weight_decay!r})"
