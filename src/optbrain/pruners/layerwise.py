"""Layer-wise OBS: prune each Linear/Conv layer to reconstruct its own calibration outputs.

Every output row w of a layer is an independent quadratic problem with the layer's calibration
Hessian H = 2XXᵀ/n (:mod:`optbrain.curvature.calibration`): deleting weights and moving the others
by δ costs ½ δᵀHδ = (1/n)‖δX‖², the row's mean squared output change on the calibration rows.
Two solvers (PAPERS.md §11.1):

* :func:`exact_obs` — OBC / ExactOBS (Frantar & Alistarh 2022): greedy, exact OBS per row, all rows
  of a chunk in parallel: score_j = w_j²/(2[H⁻¹]_jj), update w ← w − H⁻¹_{:,j} w_j/[H⁻¹]_jj,
  downdate H⁻¹ ← H⁻¹ − H⁻¹_{:,j}H⁻¹_{j,:}/[H⁻¹]_jj. A first pass records each row's trace of
  losses; the global step sorts them (made non-decreasing per row) to give each row its sparsity
  for the layer's target; a second pass prunes every row to its count. The surviving weights of
  each row end as the least-squares re-fit for the row's mask. Cost ~2·rows·k³: small layers.
* :func:`blocked_obs` — SparseGPT (Frantar & Alistarh 2023): damped H, the upper Cholesky factor U
  of (H + λI)⁻¹, columns in blocks of ``blocksize``; each block's mask is chosen by w²/U_jj²
  (unstructured: the block's share of the target over all rows of the block; N:M: the N smallest
  of every M columns, chosen when the column group is reached), each deleted column's error is
  spread over the later columns of the block at once and over the later blocks lazily (one GEMM
  per block). Columns before a deletion are not revisited, so the result is an approximation of
  the re-fit; cost ~rows·k² + k³/3: large layers.

The column loop with lazy block updates is :func:`column_sweep`, shared with GPTQ
(:mod:`optbrain.quantize.gptq`): a *rule* says what each column becomes (0 where deleted, a grid
point when quantising) and the sweep spreads the error. It never forms U: with Ũ the upper
triangular factor of H = ŨŨᵀ (:func:`upper_factor`, one Cholesky factorisation of H with rows and
columns reversed), U = Ũ⁻¹, and the lazy update of a block B after the blocks P before it is
``W_B + [(W − Q)_P Ũ_PB] U_BB`` with U_BB = Ũ_BB⁻¹ a small triangular inverse. SparseGPT's and
GPTQ's reference code compute U as cholesky(cholesky_inverse(cholesky(H)), upper=True): three
O(k³) factorisations where one suffices.

:class:`LayerwiseOBS` is a pruner with the interface of :class:`optbrain.pruner.Pruner`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..curvature.base import Progress
from ..curvature.calibration import (
    LayerHessian,
    calibration_hessians,
    layer_columns,
    supported_layers,
)
from ..curvature.linalg import damped_cholesky
from ..errors import (
    CalibrationError,
    ShapeMismatchError,
    TargetUnreachableError,
    UnsupportedModuleError,
)
from ..masking import Mask, current_mask
from ..paramdict import ParamDict, named_parameters, restored_on_error
from ..problem import Problem
from ..prunable import partition
from ..selection import TargetExceededError, check_min_kept, split_target, target_count
from .adaptive import measured_objective
from .base import PruneInfo, PrunerBase

log = logging.getLogger(__name__)

NM = tuple[int, int]

#: ``method="auto"`` uses the exact solver when rows · k³ (its cost in multiply-adds, per pass) is
#: at most this, the blocked solver otherwise.
EXACT_LIMIT = 1e9

#: bytes of per-row inverse Hessians the exact solver holds at once (rows are processed in chunks)
CHUNK_BYTES = 2**28


@dataclass
class Solution:
    """The result of one solver on a ``rows × k`` weight matrix.

    ``weight``: the new weights (deleted entries exactly 0); ``kept``: bool mask; ``losses``: for
    each deleted entry the predicted increase ½δᵀ(H + λI)δ of its own deletion step (0 where
    kept); ``damping``: the absolute λ used. The exact solver also returns ``trace`` (rows × k, the
    per-step losses of the full greedy pass in deletion order) and ``order`` (the column deleted at
    each step).
    """

    weight: Tensor
    kept: Tensor
    losses: Tensor
    damping: float
    trace: Tensor | None = None
    order: Tensor | None = None


# ---------------------------------------------------------------------------- shared pieces
def check_nm(nm: NM | None) -> NM | None:
    """Validate an N:M pattern (N of every M consecutive weights of a row are deleted)."""
    if nm is None:
        return None
    ok = isinstance(nm, (tuple, list)) and len(nm) == 2
    ok = ok and all(isinstance(v, int) and not isinstance(v, bool) for v in nm)
    if not ok or not 1 <= nm[0] < nm[1]:
        raise ValueError(
            f"nm must be a pair (N, M) of ints with 1 <= N < M, e.g. (2, 4); got {nm!r}"
        )
    return int(nm[0]), int(nm[1])


def _check_nm_columns(nm: NM | None, k: int, what: str) -> None:
    if nm is not None and k % nm[1]:
        raise ShapeMismatchError(
            f"{what} has {k} input columns, not a multiple of M = {nm[1]}: an {nm[0]}:{nm[1]} "
            "pattern needs whole groups"
        )


def prepare_layer(
    W: Tensor, H: Tensor, damping: float, dead: Tensor | None = None
) -> tuple[Tensor, Tensor, float]:
    """(W with dead-input columns zeroed, H with H_ii = 1 there and λI added, λ).

    λ = ``damping`` · mean(diag H) (SparseGPT's percdamp)."""
    if damping < 0 or not math.isfinite(damping):
        raise ValueError(f"damping must be a finite number >= 0, not {damping!r}")
    H = H.to(W.dtype, copy=True)
    diag = H.diagonal()
    if dead is None:
        dead = diag <= 0
    diag[dead] = 1.0
    W = W.clone()
    W[:, dead] = 0.0
    lam = float(damping * diag.mean())
    diag += lam
    return W, H, lam


def _cholesky(H: Tensor, lam: float, what: str = "the layer") -> tuple[Tensor, float]:
    """Lower Cholesky factor of H (+ more damping if it fails, as OBC does); (L, total λ).

    The first attempt checks only the factor's diagonal for non-finite values: a NaN or inf
    anywhere in row i of L enters L_ii = √(H_ii − Σ_j L_ij²), so that is enough (and a full scan
    of a k × k factor costs as much as a tenth of the factorisation)."""
    L, info = torch.linalg.cholesky_ex(H)
    if int(info) == 0 and bool(torch.isfinite(L.diagonal()).all()):
        return L, lam
    L, extra, attempts = damped_cholesky(H, start=1e-10, factor=100.0, steps=6)
    if L is None:
        raise CalibrationError(f"{what}: the calibration Hessian cannot be factorised even damped")
    if attempts:
        log.warning("%s: H + λI is not positive definite; added %.3g·I", what, extra)
    return L, lam + extra


def upper_factor(H: Tensor, lam: float = 0.0, what: str = "the layer") -> tuple[Tensor, float]:
    """(Ũ, total λ): Ũ upper triangular with H = ŨŨᵀ, so U = Ũ⁻¹ is the upper Cholesky factor
    of H⁻¹ (UᵀU = H⁻¹) that SparseGPT and GPTQ use.

    With J the reversal permutation, JHJ = L̃L̃ᵀ (lower Cholesky) gives H = (JL̃J)(JL̃J)ᵀ with JL̃J
    upper triangular; its inverse is upper triangular with a positive diagonal and squares to H⁻¹,
    hence is U (the factor is unique). ``H`` must already hold its damping (``lam``, reported)."""
    L, lam = _cholesky(H.flip(0, 1), lam, what)
    return L.flip(0, 1), lam


def damped_inverse(H: Tensor, damping: float, dtype=torch.float64) -> tuple[Tensor, float]:
    """((H + λI)⁻¹ with dead inputs regularised, λ) — the inverse both solvers start from."""
    _, Hd, lam = prepare_layer(torch.zeros(0, len(H), dtype=dtype, device=H.device), H, damping)
    L, lam = _cholesky(Hd, lam)
    return torch.cholesky_inverse(L), lam


def reconstruction_error(delta: Tensor, H: Tensor) -> float:
    """Σ_rows ½ δᵀHδ = (1/n)‖δX‖²_F for H = 2XXᵀ/n (``delta``: rows × k)."""
    d = delta.to(torch.float64)
    return float(0.5 * ((d @ H.to(torch.float64)) * d).sum())


# ---------------------------------------------------------------------------- exact (OBC)
def greedy_rows(
    W: Tensor,
    Hinv: Tensor,
    counts: Tensor,
    kept: Tensor | None = None,
    nm: NM | None = None,
    chunk_bytes: int = CHUNK_BYTES,
) -> Solution:
    """Greedy exact OBS on each row of ``W`` (rows × k) with shared inverse ``Hinv`` (k × k),
    deleting ``counts[r]`` entries of row r (entries not in ``kept`` first: they are deleted
    without being chosen). With ``nm`` a row deletes at most N entries per group of M columns
    (beyond those already deleted). Rows run in parallel in chunks."""
    rows, k = W.shape
    kept = torch.ones_like(W, dtype=torch.bool) if kept is None else kept
    _check_counts(counts, kept, nm)
    W = W.clone()
    trace = torch.full((rows, k), math.inf, dtype=W.dtype, device=W.device)
    order = torch.full((rows, k), -1, dtype=torch.long, device=W.device)
    losses = torch.zeros_like(W)
    step = max(1, int(chunk_bytes // (k * k * W.element_size())))
    for r0 in range(0, rows, step):
        sl = slice(r0, min(r0 + step, rows))
        W[sl], trace[sl], order[sl], losses[sl] = _greedy_chunk(
            W[sl].clone(), Hinv, counts[sl], kept[sl], nm
        )
    return Solution(W, _kept_from(order, kept), losses, 0.0, trace, order)


def _check_counts(counts: Tensor, kept: Tensor, nm: NM | None) -> None:
    """Raise if a row asks for more deletions than it has entries (or than N:M allows)."""
    rows, k = kept.shape
    if nm is None:
        possible = torch.full((rows,), k, device=kept.device)
    else:
        _check_nm_columns(nm, k, "the weight")
        possible = (~kept).reshape(rows, -1, nm[1]).sum(2).clamp_min(nm[0]).sum(1)
    bad = (counts.to(possible.device) > possible).nonzero()
    if len(bad):
        r = int(bad[0])
        rule = f" with at most {nm[0]} of every {nm[1]} columns deleted" if nm else ""
        raise TargetUnreachableError(
            f"row {r} asks for {int(counts[r])} deletions, but only {int(possible[r])} are "
            f"possible{rule}"
        )


def _kept_from(order: Tensor, kept: Tensor) -> Tensor:
    out = kept.clone()
    rows = torch.arange(order.shape[0], device=order.device)[:, None].expand_as(order)
    valid = order >= 0
    out[rows[valid], order[valid]] = False
    return out


def _greedy_chunk(
    W: Tensor, Hinv: Tensor, counts: Tensor, kept: Tensor, nm: NM | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    R, k = W.shape
    H = Hinv.to(W.dtype).expand(R, k, k).clone()
    dev = W.device
    remaining = torch.ones(R, k, dtype=torch.bool, device=dev)
    forced = ~kept
    trace = torch.full((R, k), math.inf, dtype=W.dtype, device=dev)
    order = torch.full((R, k), -1, dtype=torch.long, device=dev)
    losses = torch.zeros_like(W)
    idx = torch.arange(R, device=dev)
    tiny = torch.finfo(W.dtype).tiny
    big = torch.finfo(W.dtype).max
    deleted_per_group = torch.zeros(R, k // nm[1], dtype=torch.long, device=dev) if nm else None
    for t in range(int(counts.max()) if R else 0):
        active = counts > t
        d = H.diagonal(dim1=1, dim2=2).clamp_min(tiny)
        allowed = remaining.clone()
        if deleted_per_group is not None:
            allowed &= (deleted_per_group < nm[0]).repeat_interleave(nm[1], dim=1)
        allowed |= forced & remaining
        # an overflowing score (inf) still ranks before every entry that may not be deleted
        score = torch.where(allowed, (W.square() / d).clamp_max(big), math.inf)
        score = torch.where(forced & remaining, -math.inf, score)
        j = score.argmin(1)
        dj, wj = d[idx, j], W[idx, j]
        coef = torch.where(active, wj / dj, 0.0)
        col = H[idx, :, j]  # R × k (H⁻¹ is symmetric)
        W -= col * coef[:, None]
        u = col * torch.where(active, 1.0 / dj, 0.0)[:, None]
        H.baddbmm_(u[:, :, None], col[:, None, :], alpha=-1.0)
        step_loss = wj.square() / (2 * dj)
        a = idx[active]
        remaining[a, j[active]] = False
        W.masked_fill_(~remaining, 0.0)  # deleted entries stay exactly 0 despite rounding
        trace[a, t] = step_loss[active]
        order[a, t] = j[active]
        losses[a, j[active]] = step_loss[active]
        if deleted_per_group is not None:
            deleted_per_group[a, j[active] // nm[1]] += 1
    return W, trace, order, losses


def global_counts(trace: Tensor, target: int, forced: Tensor | None = None) -> Tensor:
    """OBC's global step: per-row deletion counts with ``target`` in all that minimise the summed
    greedy losses, rows' losses made non-decreasing (cumulative max) so each row takes a prefix
    of its greedy order; the first ``forced[r]`` steps of row r (already deleted) are always
    taken."""
    rows, k = trace.shape
    inc = trace.clone()
    if forced is not None:
        steps = torch.arange(k, device=trace.device)[None, :]
        inc = torch.where(steps < forced[:, None], -math.inf, inc)
    inc = torch.cummax(inc, dim=1).values
    chosen = torch.sort(inc.reshape(-1), stable=True).indices[:target]
    return torch.bincount(chosen // k, minlength=rows)


def exact_obs(
    W: Tensor,
    H: Tensor,
    target: int | None = None,
    *,
    kept: Tensor | None = None,
    nm: NM | None = None,
    damping: float = 0.01,
    dead: Tensor | None = None,
    chunk_bytes: int = CHUNK_BYTES,
) -> Solution:
    """Exact greedy OBS (OBC) of ``W`` (rows × k) under H (k × k): ``target`` deleted entries in
    all (including the entries not in ``kept``), rows' sparsities chosen by the global step; or,
    with ``nm=(N, M)``, N deletions in every group of M columns of every row."""
    nm = check_nm(nm)
    rows, k = W.shape
    kept = torch.ones_like(W, dtype=torch.bool) if kept is None else kept.to(torch.bool)
    _check_nm_columns(nm, k, "the weight")
    W, Hd, lam = prepare_layer(W, H, damping, dead)
    L, lam = _cholesky(Hd, lam)
    Hinv = torch.cholesky_inverse(L)
    forced = (~kept).sum(1)
    trace = order = None
    if nm is not None:
        per_group = (~kept).reshape(rows, -1, nm[1]).sum(2)
        counts = per_group.clamp_min(nm[0]).sum(1)
    else:
        if target is None:
            raise ValueError("exact_obs needs a target count (or nm)")
        if not int(forced.sum()) <= target <= W.numel():
            raise TargetExceededError(
                f"target of {target} deleted entries is outside {int(forced.sum())}..{W.numel()}"
            )
        every = torch.full((rows,), k, device=W.device)
        first = greedy_rows(W, Hinv, every, kept, None, chunk_bytes)
        trace, order = first.trace, first.order
        counts = global_counts(trace, target, forced)
    sol = greedy_rows(W, Hinv, counts, kept, nm, chunk_bytes)
    if trace is None:
        trace, order = sol.trace, sol.order
    return Solution(sol.weight, sol.kept, sol.losses, lam, trace, order)


# ---------------------------------------------------------------------------- blocked (SparseGPT)
class ColumnRule:
    """What :func:`column_sweep` does to each column: subclasses override :meth:`column` (and
    :meth:`block`, called when a block of columns starts)."""

    def block(self, W1: Tensor, i1: int, d: Tensor) -> None:
        """Block of columns ``i1 .. i1 + W1.shape[1]`` starts; ``W1`` holds their current
        (error-updated) weights, ``d`` the diagonal of U over the block."""

    def column(self, W1: Tensor, i: int, j: int) -> Tensor:
        """The new value of column ``i`` of the block (column ``j`` of the matrix), from the
        current weights ``W1`` (columns ``i:`` are up to date)."""
        raise NotImplementedError


def column_sweep(W: Tensor, factor: Tensor, rule: ColumnRule, blocksize: int) -> Tensor:
    """The column loop of SparseGPT and GPTQ on ``W`` (rows × k), in place; returns the error
    matrix E (rows × k) with E_j = (w_j − q_j)/U_jj, so the step loss of entry (r, j) is E_rj²/2.

    Column j gets q_j = ``rule.column(...)`` and the later columns of its block move by
    −E_j U_{j, j:} (U = Ũ⁻¹, ``factor`` = Ũ from :func:`upper_factor`, H = ŨŨᵀ). Later blocks
    are updated lazily: since W − Q = E·U, the weights of block B at its start are
    W_B + [(W − Q)_P Ũ_PB]·U_BB, P the columns before B (PAPERS.md §11.1, §14.5). On return
    ``W`` holds Q.
    """
    rows, k = W.shape
    E = torch.empty_like(W)
    pending = torch.zeros_like(W) if blocksize < k else None  # (W − Q)_P Ũ_P,:
    for i1 in range(0, k, blocksize):
        i2 = min(i1 + blocksize, k)
        fb = factor[i1:i2, i1:i2]
        eye = torch.eye(i2 - i1, dtype=fb.dtype, device=fb.device)
        Ub = torch.linalg.solve_triangular(fb, eye, upper=True)  # U_BB = Ũ_BB⁻¹
        W1 = W[:, i1:i2].clone()
        if i1 > 0:
            W1.addmm_(pending[:, i1:i2], Ub)
        d = Ub.diagonal()
        rule.block(W1, i1, d)
        E1 = E[:, i1:i2]
        dl = d.tolist()
        for i in range(i2 - i1):
            q = rule.column(W1, i, i1 + i)
            e = (W1[:, i] - q) / dl[i]
            W1[:, i + 1 :].addmm_(e[:, None], Ub[i : i + 1, i + 1 :], alpha=-1.0)
            W1[:, i] = q
            E1[:, i] = e
        if pending is not None and i2 < k:
            pending[:, i2:].addmm_(W[:, i1:i2] - W1, factor[i1:i2, i2:])
        W[:, i1:i2] = W1
    return E


class _PruneRule(ColumnRule):
    """SparseGPT's deletions: a mask per block (unstructured: the block's quota of smallest
    w²/U_jj² over all its rows) or per group of M columns (N:M). ``dropped`` collects them."""

    def __init__(self, forced: Tensor, nm: NM | None, quota: list[int] | None, bs: int):
        self.nm, self.quota, self.bs = nm, quota, bs
        self.forced = forced
        self.dropped = forced.clone()

    def block(self, W1: Tensor, i1: int, d: Tensor) -> None:
        self.f1 = self.forced[:, i1 : i1 + W1.shape[1]]
        self.drop = self.dropped[:, i1 : i1 + W1.shape[1]]  # a view: choices land in dropped
        self.d = d
        if self.nm is None:
            score = torch.where(self.f1, -math.inf, W1.square() / d.square())
            pick = torch.sort(score.reshape(-1), stable=True).indices[: self.quota[i1 // self.bs]]
            chosen = torch.zeros_like(self.f1)
            chosen.view(-1)[pick] = True
            self.drop.copy_(chosen)

    def column(self, W1: Tensor, i: int, j: int) -> Tensor:
        nm = self.nm
        if nm is not None and i % nm[1] == 0:
            g = slice(i, i + nm[1])
            score = torch.where(self.f1[:, g], -math.inf, W1[:, g].square() / self.d[g].square())
            smallest = torch.topk(score, nm[0], dim=1, largest=False).indices
            self.drop[:, g] |= torch.zeros_like(self.drop[:, g]).scatter_(1, smallest, True)
        return W1[:, i].masked_fill(self.drop[:, i], 0.0)


def blocked_obs(
    W: Tensor,
    H: Tensor,
    target: int | None = None,
    *,
    kept: Tensor | None = None,
    nm: NM | None = None,
    damping: float = 0.01,
    blocksize: int = 128,
    dead: Tensor | None = None,
) -> Solution:
    """SparseGPT's blocked column solver on ``W`` (rows × k) under H (k × k): ``target`` deleted
    entries in all (split over the column blocks in proportion to their size), or N:M.

    Entries not in ``kept`` are deleted (with compensation of later columns if the current
    weights are not zero there). With N:M the block size is rounded down to a multiple of M.
    """
    nm = check_nm(nm)
    rows, k = W.shape
    if blocksize < 1:
        raise ValueError(f"blocksize must be >= 1, not {blocksize}")
    kept = torch.ones_like(W, dtype=torch.bool) if kept is None else kept.to(torch.bool)
    _check_nm_columns(nm, k, "the weight")
    W, Hd, lam = prepare_layer(W, H, damping, dead)
    factor, lam = upper_factor(Hd, lam)
    del Hd
    forced = ~kept
    bs = max(nm[1], blocksize - blocksize % nm[1]) if nm else blocksize
    quota = None
    if nm is None:
        if target is None:
            raise ValueError("blocked_obs needs a target count (or nm)")
        if not int(forced.sum()) <= target <= W.numel():
            raise TargetExceededError(
                f"target of {target} deleted entries is outside {int(forced.sum())}..{W.numel()}"
            )
        starts = range(0, k, bs)
        sizes = [rows * (min(s + bs, k) - s) for s in starts]
        per_block = [int(forced[:, s : s + bs].sum()) for s in starts]
        quota = split_target(per_block, sizes, target)
    rule = _PruneRule(forced, nm, quota, bs)
    E = column_sweep(W, factor, rule, bs)
    out_kept = ~rule.dropped
    losses = torch.where(out_kept, 0.0, E.square() / 2)  # (w − q)²/(2 d²) at deleted entries
    return Solution(W, out_kept, losses, lam)


def _block_quota(forced: Tensor, bs: int, starts: list[int], target: int | None) -> list[int]:
    """The total ``target`` of deleted entries split over the column blocks by size."""
    rows, k = forced.shape
    if target is None:
        raise ValueError("blocked_obs needs a target count (or nm)")
    if not int(forced.sum()) <= target <= forced.numel():
        raise TargetExceededError(
            f"target of {target} deleted entries is outside {int(forced.sum())}..{forced.numel()}"
        )
    sizes = [rows * (min(s + bs, k) - s) for s in starts]
    per_block = [int(forced[:, s : s + bs].sum()) for s in starts]
    return split_target(per_block, sizes, target)


def _solve_block(W1: Tensor, U1: Tensor, f1: Tensor, quota: int | None, nm: NM | None):
    """One column block: choose the deletions (``quota`` smallest scores, or N:M per row group),
    delete column by column with the lazy OBS update inside the block; returns the block's
    weights, the scaled errors (w − q)/d and the deletions."""
    d = U1.diagonal()
    err1 = torch.zeros_like(W1)
    if nm is None:
        score = torch.where(f1, -math.inf, W1.square() / d.square())
        drop = torch.zeros_like(f1)
        pick = torch.sort(score.reshape(-1), stable=True).indices[:quota]
        drop.view(-1)[pick] = True
    else:
        drop = f1.clone()
    dl = d.tolist()
    for i in range(W1.shape[1]):
        if nm is not None and i % nm[1] == 0:
            g = slice(i, i + nm[1])
            score = torch.where(f1[:, g], -math.inf, W1[:, g].square() / d[g].square())
            smallest = torch.topk(score, nm[0], dim=1, largest=False).indices
            drop[:, g] |= torch.zeros_like(drop[:, g]).scatter_(1, smallest, True)
        gone = drop[:, i]
        e = torch.where(gone, W1[:, i] / dl[i], 0.0)  # (w − q)/d, q = 0 where deleted
        W1[:, i:].addr_(e, U1[i, i:], alpha=-1.0)
        W1[:, i].masked_fill_(gone, 0.0)  # exactly 0 despite rounding
        err1[:, i] = e
    return W1, err1, drop


# ---------------------------------------------------------------------------- the pruner
class LayerwiseOBS(PrunerBase):
    """Layer-wise OBS pruner (OBC / SparseGPT) with the interface of :class:`~optbrain.Pruner`.

    ``pruner(problem, mask=None, sparsity=0.5)`` prunes the Linear/Conv1d/Conv2d (and
    ``transformers`` Conv1D, whose in × out weight is transposed to out × in for the solve) weights
    named in the mask to the total target ``sparsity`` (a float fraction of the mask's entries or an
    int count, honoured exactly, as everywhere in optbrain), using the inputs of ``problem.data`` as
    calibration data (labels are not used). The target is split over the layers in proportion to
    their sizes (:func:`split_target`; a layer that already has more entries pruned than its share
    keeps them and the others take fewer), so every layer gets about the same sparsity. Each layer's
    weights are replaced in place by the solver's reconstruction (deleted entries exactly 0; biases
    untouched) and the new mask is returned, not attached. If anything fails (or is interrupted) the
    weights are restored before the error propagates. With ``sequential=True`` (default, as
    OBC/SparseGPT) layers are pruned in module order and each layer's H is computed on the outputs
    of the layers already pruned; ``False`` computes every H from the unpruned model in one pass.

    ``method``: ``"exact"`` (OBC), ``"blocked"`` (SparseGPT) or ``"auto"`` (exact when rows·k³ ≤
    ``exact_limit``). ``nm=(N, M)`` deletes N of every M consecutive inputs of each row
    (``sparsity`` must then be None or N/M). ``damping`` is relative: λ = damping·mean(diag H).
    ``dtype`` is the precision of the solve (H is always accumulated in float64).

    After a call, ``last_errors[name]`` is the layer's calibration reconstruction error
    (1/n)‖(W − Ŵ)X‖²_F (n calibration rows, undamped H), ``PruneInfo.predicted_increase`` their
    sum, and ``last_layers[name]`` records the method, damping λ, rows n and dead inputs.
    ``measure=True`` records the objective on ``problem`` before and after
    (``PruneInfo.measured_increase``, the change of E the layer errors stand for); ``min_kept``:
    no layer keeps fewer entries (0: no guard; a target that needs more raises
    :class:`~optbrain.errors.EmptyLayerError`).
    """

    methods = ("auto", "exact", "blocked")
    _why_no_scores = "its solvers re-rank after every deletion"

    def __init__(
        self,
        method: str = "auto",
        nm: NM | None = None,
        damping: float = 0.01,
        blocksize: int = 128,
        *,
        sequential: bool = True,
        dtype: torch.dtype = torch.float64,
        exact_limit: float = EXACT_LIMIT,
        progress: Progress | None = None,
        measure: bool = True,
        min_kept: int = 0,
    ):
        if method not in self.methods:
            raise ValueError(f"method must be one of {self.methods}, not {method!r}")
        if damping < 0 or not math.isfinite(damping):
            raise ValueError(f"damping must be a finite number >= 0, not {damping!r}")
        if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
            raise ValueError(f"blocksize must be a positive int, not {blocksize!r}")
        self.method = method
        self.nm = check_nm(nm)
        self.damping = float(damping)
        self.blocksize = blocksize
        self.sequential = bool(sequential)
        self.dtype = dtype
        self.exact_limit = float(exact_limit)
        self.progress = progress
        self.measure = bool(measure)
        self.min_kept = check_min_kept(min_kept)
        self.last_errors: dict[str, float] = {}
        self.last_layers: dict[str, dict] = {}

    # ------------------------------------------------------------------ public interface
    def __call__(
        self,
        problem: Problem,
        mask: Mask | None = None,
        sparsity: float | int | None = None,
        *,
        scores: ParamDict | None = None,
        units: float | int | None = None,
    ) -> tuple[Mask, PruneInfo]:
        """Prune in place. ``scores`` and ``units`` are refused with
        :class:`~optbrain.errors.UnsupportedArgumentError` (the solvers re-rank after every
        deletion; this pruner removes weights, not cells)."""
        self._check_arguments(scores, units)
        model = problem.model
        mask = mask if mask is not None else self.default_mask(model)
        layers = self._layers(model, mask)
        targets = self._targets(mask, sparsity)
        params = named_parameters(model, trainable_only=False)
        for path in layers.values():  # before any weight changes
            _check_nm_columns(self.nm, layer_columns(model.get_submodule(path)), f"layer {path!r}")
        before = problem.objective() if self.measure else None
        with restored_on_error({name: params[name] for name in layers}):
            new, errors, biggest = self._prune_layers(problem, mask, layers, targets, params)
        out = Mask({n: new.get(n, mask[n]) for n in mask.names})
        self.last_errors = errors
        after = measured_objective(problem) if self.measure else None
        measured = {
            "objective_before": before,
            "objective_after": after,
            "measured_increase": None if before is None else after - before,
        }
        info = PruneInfo.step(model, mask, out, sum(errors.values()), biggest, **measured)
        return out, info

    def _prune_layers(
        self, problem: Problem, mask: Mask, layers: dict[str, str], targets: dict, params: dict
    ) -> tuple[dict[str, Tensor], dict[str, float], float]:
        """Solve and write each layer in turn; (new kept masks, errors, largest step loss)."""
        hessians = {} if self.sequential else self._hessians(problem, list(layers.values()))
        new: dict[str, Tensor] = {}
        errors: dict[str, float] = {}
        biggest = 0.0
        self.last_layers = {}
        for i, (name, path) in enumerate(layers.items()):
            h = (self._hessians(problem, [path]) if self.sequential else hessians)[path]
            p = params[name]
            kept_now = mask[name].to(p.device)
            weight, kept, losses, info = self._solve_layer(h, p.detach(), kept_now, targets[name])
            with torch.no_grad():
                p.copy_(weight.to(p.dtype))
            new[name] = kept
            errors[name] = info["error"]
            newly = kept_now & ~kept
            if newly.any():
                biggest = max(biggest, float(losses[newly].max()))
            self.last_layers[name] = info
            if self.progress is not None:
                self.progress(i + 1, len(layers))
        return new, errors, biggest

    def scores(self, problem: Problem, mask: Mask | None = None) -> ParamDict:
        """Per-entry OBS saliency w_j²/(2[(H + λI)⁻¹]_jj) of each masked layer at the current
        weights (the first greedy step's scores; the constraint of entries already deleted is not
        included, so this is a lower bound for them; 0 at deleted entries and dead inputs)."""
        model = problem.model
        mask = mask if mask is not None else self.default_mask(model)
        layers = self._layers(model, mask)
        hs = self._hessians(problem, list(layers.values()))
        params = named_parameters(model, trainable_only=False)
        out: ParamDict = {}
        for name, path in layers.items():
            h = hs[path]
            W = h.weight_matrix(params[name].detach().to(self.dtype))
            parts = []
            for g in range(h.groups):
                Hinv, _ = damped_inverse(h.H[g], self.damping, self.dtype)
                w = torch.where(h.dead[g], 0.0, W[g])
                parts.append(w.square() / (2 * Hinv.diagonal()))
            out[name] = h.weight_from_matrix(torch.stack(parts))
        return out

    def default_mask(self, model: nn.Module) -> Mask:
        """The attached mask, or all Linear/Conv1d/Conv2d weights kept."""
        attached = current_mask(model)
        if len(attached):
            return attached
        names = [f"{p}.weight" if p else "weight" for p in supported_layers(model)]
        left = sorted(set(partition(model).prunable) - set(names))
        if left:
            log.info(
                "layer-wise OBS prunes Linear/Conv weights (a layer Hessian 2XXᵀ/n needs a "
                "product with the layer's input); left out: %s",
                ", ".join(left),
            )
        return Mask.ones(model, names)

    def __repr__(self) -> str:
        return (
            f"LayerwiseOBS(method={self.method!r}, nm={self.nm!r}, damping={self.damping!r}, "
            f"blocksize={self.blocksize!r}, sequential={self.sequential!r})"
        )

    # ------------------------------------------------------------------ internals
    @staticmethod
    def _hessians(problem: Problem, paths: Sequence[str]) -> dict[str, LayerHessian]:
        problem.prepare()
        return calibration_hessians(problem.model, problem.batches(), paths, shards=problem.shards)

    @staticmethod
    def _layers(model: nn.Module, mask: Mask) -> dict[str, str]:
        """Mask name → module path of its layer (module order); others raise."""
        by_weight = {f"{p}.weight" if p else "weight": p for p in supported_layers(model)}
        other = [n for n in mask.names if n not in by_weight]
        if other:
            raise UnsupportedModuleError(
                f"layer-wise OBS prunes only the weights of Linear/Conv1d/Conv2d layers; the mask "
                f"also names {other}: pass a mask over {list(by_weight)}"
            )
        return {w: p for w, p in by_weight.items() if w in mask.names}

    def _targets(self, mask: Mask, sparsity) -> dict[str, int | None]:
        """Deleted entries wanted per layer (None with N:M): the total target split over the
        layers in proportion to their sizes, each layer at least at its already-pruned count."""
        total = mask.total()
        if self.nm is not None:
            if sparsity is not None and target_count(sparsity, total) != round(
                total * self.nm[0] / self.nm[1]
            ):
                raise ValueError(
                    f"with nm={self.nm} the sparsity is N/M = {self.nm[0] / self.nm[1]:g}; pass "
                    f"sparsity=None or that value, not {sparsity!r}"
                )
            return {n: None for n in mask.names}
        names = list(mask.names)
        forced = [int((~mask[n]).sum()) for n in names]
        sizes = [mask[n].numel() for n in names]
        quota = split_target(forced, sizes, target_count(sparsity, total), self.min_kept)
        return dict(zip(names, quota))

    def _choose(self, rows: int, k: int) -> str:
        if self.method != "auto":
            return self.method
        return "exact" if rows * float(k) ** 3 <= self.exact_limit else "blocked"

    def _solve_layer(
        self, h: LayerHessian, weight: Tensor, kept: Tensor, target: int | None
    ) -> tuple[Tensor, Tensor, Tensor, dict]:
        W = h.weight_matrix(weight.to(self.dtype))
        K = h.weight_matrix(kept)
        G, rows, k = W.shape
        _check_nm_columns(self.nm, k, f"layer {h.layer!r}")
        method = self._choose(rows, k)
        quota: list[int | None] = [None] * G
        if target is not None:
            quota = list(split_target((~K).sum((1, 2)).tolist(), [rows * k] * G, target))
        outs, lams, error = [], [], 0.0
        for g in range(G):
            common = dict(kept=K[g], nm=self.nm, damping=self.damping, dead=h.dead[g])
            try:
                if method == "exact":
                    sol = exact_obs(W[g], h.H[g], quota[g], **common)
                else:
                    sol = blocked_obs(W[g], h.H[g], quota[g], blocksize=self.blocksize, **common)
            except CalibrationError as exc:
                raise CalibrationError(f"layer {h.layer!r}: {exc}") from exc
            if not torch.isfinite(sol.weight).all():  # never write NaN weights
                raise CalibrationError(f"layer {h.layer!r}: the solver produced non-finite weights")
            error += reconstruction_error(sol.weight - W[g], h.H[g])
            outs.append(sol)
            lams.append(sol.damping)
        new_w = h.weight_from_matrix(torch.stack([s.weight for s in outs]))
        new_k = h.weight_from_matrix(torch.stack([s.kept for s in outs])) & kept
        losses = h.weight_from_matrix(torch.stack([s.losses for s in outs]))
        info = {
            "method": method,
            "error": error,
            "damping": max(lams),
            "rows": h.n,
            "dead_inputs": int(h.dead.sum()),
        }
        return torch.where(new_k, new_w, 0.0), new_k, losses, info
