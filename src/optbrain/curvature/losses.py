"""Per-sample derivatives of the loss with respect to the model output.

For the per-sample loss ℓ_n(f) (see :class:`~optbrain.problem.Problem`) these helpers return, for a
batch of outputs ``out`` (N × …):

* ``output_grads``: ∂ℓ_n/∂f, shape N × …;
* ``hessian_factor``: columns S (K × N × …) and optional signs σ (K × N) with
  H_n = Σ_k σ_kn S_kn S_knᵀ, the per-sample loss Hessian ∂²ℓ_n/∂f²;
* ``hessian_diagonal``: diag H_n, shape N × …;
* ``mc_factor``: K sampled columns with E[Σ_k S_kn S_knᵀ] = H_n (the Monte-Carlo Fisher).

Closed forms for ``MSELoss`` and ``CrossEntropyLoss`` on (N, C) logits; any other loss falls back to
``torch.func.hessian`` of the per-sample loss and an eigen-decomposition (exact, costs O(d³) per
sample for d output components).
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn
from torch.func import hessian, vmap

from ..problem import Problem

log = logging.getLogger(__name__)

Factor = tuple[Tensor, Tensor | None]


def _mse_scale(problem: Problem, out: Tensor) -> float | None:
    fn = problem.loss_fn
    if type(fn) is not nn.MSELoss:
        return None
    d = out[0].numel()
    return 2.0 / d if fn.reduction == "mean" else 2.0


def _is_plain_ce(problem: Problem, out: Tensor, y: Tensor) -> bool:
    """Cross-entropy on class indices without weights or ignored entries: (N, C) logits, or
    (N, C, d₁, …) for a class at every position (a sequence model's tokens)."""
    fn = problem.loss_fn
    return (
        type(fn) is nn.CrossEntropyLoss
        and fn.weight is None
        and fn.label_smoothing == 0.0
        and out.dim() >= 2
        and y.dim() == out.dim() - 1
        and not torch.is_floating_point(y)
        and not bool((y == fn.ignore_index).any())
    )


def _ce_scale(problem: Problem, out: Tensor) -> float:
    """ℓ_n = c Σ_positions CE: c = 1/positions for ``reduction="mean"``, 1 for ``"sum"``."""
    positions = out[0, 0].numel()
    return 1.0 / positions if problem.loss_fn.reduction == "mean" else 1.0


def _positions_last(p: Tensor) -> Tensor:
    """(N, C, d₁, …) → (N·d₁·…, C)."""
    return p.movedim(1, -1).reshape(-1, p.shape[1])


def _probabilities(out: Tensor) -> Tensor:
    """softmax over the class axis (1) of N × C (× positions) logits.

    On CPU with few classes torch's softmax kernel, which vectorises along the class axis, is 3–5×
    slower than a max-shifted exp and a row sum (1,797 × 10 at 2 threads: ~160 µs against ~55 µs;
    the two agree to 1 ulp); from a few dozen classes on it is the faster one.
    """
    out = out.detach()
    if out.dim() > 2:
        return torch.softmax(out, dim=1)
    if out.device.type == "cpu" and out.shape[1] <= 16:
        e = (out - out.amax(1, keepdim=True)).exp_()
        return e.div_(e.sum(1, keepdim=True))
    return torch.softmax(out, dim=1)


def _ce_factor(p: Tensor) -> Tensor:
    """C − 1 columns R with R Rᵀ = diag(p) − ppᵀ for every sample (p: N × C probabilities).

    S = diag(√p) − p√pᵀ is a square root with S√p = 0, so S·Q for an orthonormal basis Q of
    √p^⊥ is one with a column fewer: the cross-entropy Hessian has rank C − 1. Q is the first C − 1
    columns of the Householder reflection that maps √p to a multiple of e_C. Returns C−1 × N × C.
    """
    n, c = p.shape
    sq = p.sqrt()
    eye = torch.eye(c, dtype=p.dtype, device=p.device)
    s = torch.diag_embed(sq) - p[:, :, None] * sq[:, None, :]  # N × C × C, columns = square root
    if c == 1:
        return s.permute(2, 0, 1)
    u = sq.clone()
    u[:, -1] += torch.where(sq[:, -1] >= 0, 1.0, -1.0)  # u = √p + sign(√p_C) e_C, never 0
    h = eye - 2 * u[:, :, None] * u[:, None, :] / (u * u).sum(1)[:, None, None]
    r = s @ h[:, :, : c - 1]  # N × C × (C−1)
    return r.permute(2, 0, 1)


def _sequence_ce_factor(p: Tensor, c: float) -> Tensor:
    """Columns of the block-diagonal per-sample Hessian c·Σ_positions (diag(p) − ppᵀ) for
    (N, C, d₁, …) probabilities: C − 1 columns per position, zero at the other positions:
    (positions·(C−1)) × N × C × d₁ × …"""
    n, k = p.shape[0], p.shape[1]
    pos = p[0, 0].numel()
    r = _ce_factor(_positions_last(p)) * c**0.5  # C−1 × (N·pos) × C
    r = r.reshape(k - 1, n, pos, k)
    cols = p.new_zeros(pos, k - 1, n, k, pos)
    idx = torch.arange(pos, device=p.device)
    cols[idx, :, :, :, idx] = r.permute(2, 0, 1, 3)
    return cols.reshape(pos * (k - 1), n, k, *p.shape[2:])


def output_grads(problem: Problem, out: Tensor, y: Tensor) -> Tensor:
    """∂ℓ_n/∂f for every sample of the batch (N × …)."""
    out = out.detach().requires_grad_(True)
    with torch.enable_grad():
        total = problem.loss_fn(out, y)
        if problem.reduction == "mean":
            total = total * out.shape[0]
        (g,) = torch.autograd.grad(total, out)
    return g


def _per_sample_hessians(problem: Problem, out: Tensor, y: Tensor) -> Tensor:
    """Dense per-sample loss Hessians, N × d × d (d = numel of one output)."""
    shape = out.shape[1:]

    def loss_flat(o: Tensor, t: Tensor) -> Tensor:
        return problem.sample_loss(o.reshape(shape), t)

    return vmap(hessian(loss_flat))(out.detach().reshape(out.shape[0], -1), y)


def hessian_factor(problem: Problem, out: Tensor, y: Tensor) -> Factor:
    """Square-root factor (S, σ) of the per-sample loss Hessians; σ is None when all signs are +."""
    n = out.shape[0]
    c = _mse_scale(problem, out)
    if c is not None:
        d = out[0].numel()
        eye = torch.eye(d, dtype=out.dtype, device=out.device) * c**0.5
        s = eye[:, None, :].expand(d, n, d).reshape(d, *out.shape)
        return s, None
    if _is_plain_ce(problem, out, y):
        p = _probabilities(out)
        if out.dim() == 2:
            return _ce_factor(p), None
        return _sequence_ce_factor(p, _ce_scale(problem, out)), None
    h = _per_sample_hessians(problem, out, y)
    lam, u = torch.linalg.eigh(h)  # N × d, N × d × d (columns are eigenvectors)
    s = (u * lam.abs().sqrt()[:, None, :]).permute(2, 0, 1).reshape(-1, *out.shape)
    sign = torch.sign(lam).T.contiguous()
    return s, (None if bool((sign >= 0).all()) else sign)


def hessian_diagonal(problem: Problem, out: Tensor, y: Tensor) -> Tensor:
    """diag ∂²ℓ_n/∂f², N × … (LeCun's output boundary)."""
    c = _mse_scale(problem, out)
    if c is not None:
        return torch.full_like(out.detach(), c)
    if _is_plain_ce(problem, out, y):
        p = _probabilities(out)
        return p * (1 - p) * _ce_scale(problem, out)
    h = _per_sample_hessians(problem, out, y)
    return torch.diagonal(h, dim1=1, dim2=2).reshape(out.shape)


def mc_factor(
    problem: Problem, out: Tensor, y: Tensor, samples: int, gen: torch.Generator
) -> Tensor:
    """``samples`` random columns S with E[Σ_k S_k S_kᵀ] = H_n (each scaled by 1/√samples).

    Cross-entropy draws labels from the model's predictive distribution (ŷ ~ softmax(f)) and uses
    ∂ℓ(f, ŷ)/∂f = p − e_ŷ; other losses use S·ε with ε ~ N(0, I) for the Hessian's square root S
    (negative eigenvalues of a non-convex loss are clipped to 0).
    """
    scale = samples**-0.5
    if _is_plain_ce(problem, out, y):
        p = _probabilities(out)
        flat = _positions_last(p)  # one label drawn per sample and position
        idx = _draw(flat, samples, gen)
        onehot = torch.nn.functional.one_hot(idx.T, p.shape[1]).to(p)  # samples × (N·pos) × C
        if out.dim() > 2:
            shape = (samples, p.shape[0], *p.shape[2:], p.shape[1])
            onehot = onehot.reshape(shape).movedim(-1, 2)
            return (p[None] - onehot) * (scale * _ce_scale(problem, out) ** 0.5)
        return (p[None] - onehot) * scale
    s, sign = hessian_factor(problem, out, y)
    if sign is not None:
        log.warning("loss Hessian is indefinite; MC Fisher clips its negative eigenvalues to 0")
        s = s * (sign > 0).to(s)[(...,) + (None,) * (s.dim() - 2)]
    k = s.shape[0]
    eps = torch.randn(samples, k, out.shape[0], generator=gen, dtype=torch.float64)
    eps = eps.to(device=s.device, dtype=s.dtype)
    return torch.einsum("jkn,kn...->jn...", eps, s) * scale


def _draw(probs: Tensor, samples: int, gen: torch.Generator) -> Tensor:
    """``samples`` labels per row of ``probs`` (rows × classes), drawn by inverting each row's
    cumulative distribution at uniform numbers from ``gen`` (float64, on the CPU): index j
    with P(j) = p_j. One cumsum and one binary search, where ``torch.multinomial`` costs a
    quarter of a gradient pass on 2048 rows."""
    cdf = probs.detach().double().cpu().cumsum(-1)
    u = torch.rand(cdf.shape[0], samples, dtype=torch.float64, generator=gen) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_max(cdf.shape[1] - 1)
