"""Block-diagonal inverse Gauss–Newton matrices for OBS on large networks (WoodFisher's chunks,
PAPERS.md §11.1; per-layer blocks, Hassibi et al. 1994, PAPERS.md §9).

The dense inverse of :mod:`.inverse` needs p² memory for p coordinates. :class:`BlockInverse`
keeps only the diagonal blocks of G + αI (G the Gauss–Newton matrix of E, as for the dense
inverses, over the alive coordinates) and inverts each block: the coordinates of a Linear or
convolution layer, in the row-major layout E = [W | b] of :mod:`.layer_factors`, are grouped

* ``block="layer"``: one block per layer (exact for a one-layer model);
* ``block="row"``: one block per output unit — its fan-in weights and its bias (exact for a
  one-layer model under MSE, whose GGN does not couple output units);
* ``block=c`` (an int): chunks of at most c consecutive entries of each output unit's row
  (WoodFisher's ``fittable-params`` chunks, kept within a row; a row of L' entries is cut into
  ⌈L'/c⌉ chunks of equal size).

Within a block the OBS algebra is exact; across blocks the matrix is taken as zero, so a
deletion moves only the weights of its own block. Pruned entries are not coordinates (their
rows and columns are left out before inverting, as in the dense inverse).

**Memory and time.** With p coordinates in blocks of c: G and its inverse take p·c float64
numbers (8·p·c bytes; the dense inverse 8·p²); accumulating G costs O(N·p·c) for Linear layers
on vectors (a weighted Gram of the inputs per output unit, whatever the number K of loss-Hessian
columns) and O(N·K·T·p·c) otherwise; inverting costs O(p·c²). A bulk OBS step
(:meth:`BlockInverseHessian.prune`) costs O(p·c²) too: the exact greedy order within every
block (all blocks at once, batched), merged across blocks, then the exact group update of every
block. The dense inverse's costs are O(p²) memory and O(N·K·p²) time.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import CurvatureTooLargeError, SingularCurvatureError
from ..masking import Mask
from ..paramdict import ParamDict
from ..problem import Problem
from .base import Progress, in_dtype
from .budget import BUDGET as _BUDGET
from .coordinate_views import CoordinateViews
from .inverse import Coordinates
from .layer_factors import LayerSlot, layer_factors, layer_slots

log = logging.getLogger(__name__)

MAX_ENTRIES = 2**28
"""Default limit on the stored block entries (Σ blocks c², 2 GiB in float64)."""


@dataclass
class BlockGroup:
    """The blocks of one layer, all of size c: ``index`` B × c (coordinate rows, −1 for padding
    and pruned entries) and ``inv`` B × c × c."""

    index: Tensor
    inv: Tensor

    @property
    def valid(self) -> Tensor:
        return self.index >= 0


def block_index(slot: LayerSlot, block: int | str) -> Tensor:
    """B × c coordinate rows of the blocks of ``slot`` (−1: padding or pruned)."""
    rows = slot.rows
    out, width = rows.shape
    if block == "layer":
        return rows.reshape(1, -1)
    if block == "row":
        return rows
    nb = math.ceil(width / block)
    c = math.ceil(width / nb)
    pad = torch.full((out, nb * c - width), -1, dtype=rows.dtype)
    return torch.cat([rows, pad], 1).reshape(out * nb, c)


class BlockInverse:
    """(G_block + αI)⁻¹ per block (see the module doc): an inverse estimator for
    :class:`~optbrain.pruners.OBSPruner` and :class:`~optbrain.saliency.OBS`
    (``inverse(problem, mask) -> BlockInverseHessian``).

    ``block``: ``"layer"``, ``"row"`` or an int c; ``alpha`` > 0 as the dense inverses' α;
    ``max_entries``: refuse (:class:`~optbrain.errors.CurvatureTooLargeError`) a layout storing
    more block entries. The problem's parameters must be weights and biases of Linear, Conv1d or
    Conv2d layers (``groups=1``), each called once per forward pass. Float64 by default; on a
    distributed problem the blocks are summed over the ranks.
    """

    structured = True

    def __init__(
        self,
        block: int | str = 64,
        alpha: float = 1e-6,
        *,
        dtype: torch.dtype = torch.float64,
        max_entries: int = MAX_ENTRIES,
        progress: Progress | None = None,
    ):
        if isinstance(block, bool) or not (
            block in ("layer", "row") or (isinstance(block, int) and block >= 1)
        ):
            raise ValueError(f"block must be 'layer', 'row' or an int >= 1, not {block!r}")
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, not {alpha!r}")
        self.block = block
        self.alpha = float(alpha)
        self.dtype = dtype
        self.max_entries = int(max_entries)
        self.progress = progress

    @property
    def regularizer(self) -> float:
        return self.alpha

    def __repr__(self) -> str:
        return f"BlockInverse(block={self.block!r}, alpha={self.alpha!r})"

    def inverse(self, problem: Problem, mask: Mask | None = None) -> BlockInverseHessian:
        work = in_dtype(problem, self.dtype)
        coords = Coordinates(work.parameters(), mask)
        index, grams, tally = self.blocks(work, coords)
        groups, fallbacks = [], 0
        for idx, gram in zip(index, grams):
            fallbacks += _invert_(gram, idx >= 0, self.alpha)
            groups.append(BlockGroup(idx, gram))
        info = {
            "method": f"blocks_{self.block}",
            "alpha": self.alpha,
            "damping": 0.0,
            "rows": tally["rows"],
            "negative_rows_dropped": tally["dropped"],
            "blocks": sum(g.index.shape[0] for g in groups),
            "entries": sum(g.inv.numel() for g in groups),
            "fallback_blocks": fallbacks,
        }
        return BlockInverseHessian(coords, groups, info)

    def blocks(self, work: Problem, coords: Coordinates) -> tuple[list[Tensor], list[Tensor], dict]:
        """The layout and the blocks of G itself, per layer: (B × c coordinate rows, −1 for
        padding and pruned entries; B × c × c blocks of G, summed over the ranks; the tally)."""
        if coords.size == 0:
            raise ValueError("no alive coordinates: every entry is pruned")
        slots = layer_slots(work.model, coords)
        index = [block_index(s, self.block) for s in slots]
        entries = sum(i.shape[0] * i.shape[1] ** 2 for i in index)
        if entries > self.max_entries:
            raise CurvatureTooLargeError(
                f"block={self.block!r} stores {entries} entries ({entries * 8 / 2**30:.1f} GiB; "
                f"limit max_entries={self.max_entries}): use smaller blocks"
            )
        dev = work.device
        grams = [torch.zeros(i.shape[0], i.shape[1], i.shape[1], dtype=torch.float64, device=dev)
                 for i in index]  # fmt: skip
        tally = {"samples": 0, "rows": 0, "dropped": 0}
        with work.together("accumulating the block-diagonal Gauss-Newton matrix"):
            for chunk in layer_factors(work, slots, tally):
                for s, gram in zip(slots, grams):
                    _accumulate(gram, *chunk[s.path], s, self.block)
                if self.progress is not None:
                    self.progress(tally["samples"], work.progress_total())
        work.progress_done(self.progress, tally["samples"])
        counts = torch.tensor([tally["rows"], tally["dropped"]], dtype=torch.int64)
        work.all_reduce_([*grams, counts])
        tally["rows"], tally["dropped"] = int(counts[0]), int(counts[1])
        n = work.counted(tally["samples"])
        for gram in grams:
            gram.div_(n)
        return [i.to(dev) for i in index], grams, tally


def _accumulate(gram: Tensor, a: Tensor, g: Tensor, slot: LayerSlot, block) -> None:
    """Add this chunk's Σ v vᵀ per block (v the rows of :mod:`.layer_factors`)."""
    out, width = slot.shape
    b, c = gram.shape[0], gram.shape[1]
    if block != "layer" and a.shape[1] == 1:  # one position: v = g ⊗ ã per column
        weights = g[:, :, 0, :].square().sum(0)  # N × out: Σ_k g²
        nb = b // out
        a = a[:, 0, :]
        if nb * c != width:
            a = torch.cat([a, a.new_zeros(a.shape[0], nb * c - width)], 1)
        a = a.reshape(a.shape[0], nb, c)
        step = max(1, _BUDGET // max(1, nb * c * c))
        for i in range(0, a.shape[0], step):
            ai = a[i : i + step]
            outer = (ai[:, :, :, None] * ai[:, :, None, :]).reshape(ai.shape[0], -1)
            gram.view(out, -1).addmm_(weights[i : i + step].T, outer)
        return
    k, n = g.shape[0], g.shape[1]
    step = max(1, _BUDGET // max(1, k * out * width))
    for i in range(0, n, step):
        v = torch.einsum("knto,ntl->nkol", g[:, i : i + step], a[i : i + step])
        v = v.reshape(-1, out, width)
        if block == "layer":
            v = v.reshape(v.shape[0], 1, -1)
        elif b != out:  # chunks: pad each row to nb·c, then cut
            nb = b // out
            v = torch.cat([v, v.new_zeros(v.shape[0], out, nb * c - width)], 2)
            v = v.reshape(v.shape[0], b, c)
        vt = v.transpose(0, 1)  # B × M × c
        gram.baddbmm_(vt.transpose(1, 2), vt)


_LADDER = (1e-8, 1e-6, 1e-4, 1e-2, 1.0)  # extra damping, relative to a block's mean diagonal


def _invert_(gram: Tensor, valid: Tensor, alpha: float) -> int:
    """Replace each block of ``gram`` by the inverse of its valid part plus αI (invalid rows and
    columns zero), in chunks of blocks; returns how many blocks needed extra damping."""
    eye = torch.eye(gram.shape[1], dtype=gram.dtype, device=gram.device)
    fallbacks = 0
    step = max(1, _BUDGET // max(1, gram.shape[1] ** 2))
    for i in range(0, gram.shape[0], step):
        g, ok = gram[i : i + step], valid[i : i + step]
        pair = (ok[:, :, None] & ok[:, None, :]).to(g.dtype)
        g.mul_(pair)
        g.add_(eye * torch.where(ok, alpha, 1.0)[:, None, :])
        chol, info = torch.linalg.cholesky_ex(g)
        bad = info != 0
        if bool(bad.any()):
            fallbacks += int(bad.sum())
            chol[bad] = _damped_chol(g[bad])
        g.copy_(torch.cholesky_inverse(chol))
        g.mul_(pair)
    return fallbacks


def _damped_chol(g: Tensor) -> Tensor:
    scale = g.diagonal(dim1=1, dim2=2).abs().mean(1).clamp_min(1e-300)
    eye = torch.eye(g.shape[1], dtype=g.dtype, device=g.device)
    for extra in _LADDER:
        chol, info = torch.linalg.cholesky_ex(g + eye * (extra * scale)[:, None, None])
        if bool((info == 0).all()):
            log.warning("%d curvature block(s) needed extra damping %.0e", g.shape[0], extra)
            return chol
    raise SingularCurvatureError("a curvature block is not positive definite even with damping")


class BlockInverseHessian(CoordinateViews):
    """A block-diagonal inverse curvature over the alive coordinates, with the operations of
    :class:`~optbrain.curvature.inverse.InverseHessian` (``diag``, ``column``, ``obs_step``,
    ``step_vector``, ``eliminate``, ``gather``/``scatter``) and the bulk step
    :meth:`prune`. ``groups``: one :class:`BlockGroup` per layer."""

    prunes_in_bulk = True

    def __init__(self, coords: Coordinates, groups: list[BlockGroup], info: dict):
        self.coords, self.groups, self.info = coords, groups, info
        dev = groups[0].inv.device if groups else torch.device("cpu")
        self.alive = torch.ones(coords.size, dtype=torch.bool, device=dev)
        self._where = torch.full((coords.size, 3), -1, dtype=torch.long, device=dev)
        for gi, grp in enumerate(groups):
            b, c = grp.index.shape
            pos = grp.index >= 0
            rows = grp.index[pos]
            blk = torch.arange(b, device=dev)[:, None].expand(b, c)[pos]
            slot = torch.arange(c, device=dev)[None, :].expand(b, c)[pos]
            self._where[rows] = torch.stack([torch.full_like(rows, gi), blk, slot], 1)
        if bool((self._where[:, 0] < 0).any()):
            raise ValueError("some coordinates are in no block")

    # ------------------------------------------------------------------ views
    def copy(self) -> BlockInverseHessian:
        groups = [BlockGroup(g.index, g.inv.clone()) for g in self.groups]
        out = BlockInverseHessian.__new__(BlockInverseHessian)
        out.coords, out.groups, out.info = self.coords, groups, self.info
        out.alive, out._where = self.alive.clone(), self._where
        return out

    def diagonal_vector(self) -> Tensor:
        """[H⁻¹]_qq of every row (0 for eliminated rows)."""
        out = torch.zeros(self.coords.size, dtype=torch.float64, device=self.alive.device)
        for g in self.groups:
            ok = g.index >= 0
            out[g.index[ok]] = g.inv.diagonal(dim1=1, dim2=2)[ok]
        return out

    def column(self, name: str, index) -> ParamDict:
        """H⁻¹ e_q as a ParamDict (nonzero only in q's block)."""
        q = self.flat_index(name, index)
        gi, b, s = self._where[q].tolist()
        g = self.groups[gi]
        vec = torch.zeros(self.coords.size, dtype=torch.float64, device=self.alive.device)
        ok = g.index[b] >= 0
        vec[g.index[b][ok]] = g.inv[b, :, s][ok]
        return self.coords.scatter(vec)

    # ------------------------------------------------------------------ OBS, one step
    def _blocks_of(self, q: Tensor) -> dict[tuple[int, int], Tensor]:
        idx = self._alive_rows(q)
        out: dict[tuple[int, int], list[int]] = {}
        for gi, b, s in self._where[idx].tolist():
            out.setdefault((gi, b), []).append(s)
        return {k: torch.tensor(v, device=idx.device) for k, v in out.items()}

    def step_vector(self, theta: Tensor, q) -> tuple[float, Tensor]:
        """(ΔE, δθ) of deleting coordinate(s) ``q`` together (group OBS within each block)."""
        delta = torch.zeros_like(theta)
        loss = 0.0
        for (gi, b), slots in self._blocks_of(q).items():
            g = self.groups[gi]
            rows = g.index[b]
            ok = rows >= 0
            w = torch.where(ok, theta[rows.clamp_min(0)], 0.0)
            block = g.inv[b]
            z = _solve(block[slots][:, slots], w[slots])
            d = -(block[:, slots] @ z)
            d[slots] = -w[slots]
            delta[rows[ok]] += d[ok]
            loss += 0.5 * float(w[slots] @ z)
        return loss, delta

    def obs_step(self, weights: Mapping[str, Tensor], q) -> tuple[float, ParamDict]:
        loss, delta = self.step_vector(self.gather(weights), q)
        return loss, self.coords.scatter(delta)

    def eliminate(self, q) -> None:
        """Constrain coordinate(s) ``q`` to zero: each block shrinks to the inverse of its reduced
        matrix (O(c²) per block touched)."""
        for (gi, b), slots in self._blocks_of(q).items():
            block = self.groups[gi].inv[b]
            cols = block[:, slots]
            block.addmm_(cols, _solve(block[slots][:, slots], cols.T.contiguous()), alpha=-1)
            block[slots, :] = 0
            block[:, slots] = 0
            self.alive[self.groups[gi].index[b, slots]] = False

    # ------------------------------------------------------------------ OBS, many steps
    def prune(
        self, theta: Tensor, candidates: Tensor, count: int, caps: Sequence[tuple[Tensor, int]] = ()
    ) -> tuple[Tensor, list[float]]:
        """Greedy OBS for up to ``count`` deletions among ``candidates`` (bool per row): θ is
        updated in place and the deleted rows eliminated. ``caps``: (rows, most deletions)
        pairs (a parameter's ``min_kept`` guard). Returns the deleted rows and their
        saliencies, in deletion order.

        Exact greedy OBS for this block-diagonal matrix: a deletion changes only its own block's
        saliencies, so every block's greedy sequence is computed on its own (all blocks at once)
        and the global order — always the least current saliency — is the merge of the
        sequences ordered by their running maxima; each block then replays its first k_b
        deletions (weights and inverse)."""
        seqs = [_sequences(g, theta, candidates) for g in self.groups]
        taken, rows, sal = _merge(self, seqs, count, caps)
        for g, (_, slot), k in zip(self.groups, seqs, taken):
            if k.numel() and int(k.max()) > 0:
                _apply(g, theta, slot, k)
        self.alive[rows] = False
        return rows, sal.tolist()

    def __repr__(self) -> str:
        return (
            f"BlockInverseHessian({self.coords.size} coordinates, {int(self.alive.sum())} alive, "
            f"{self.info.get('blocks')} blocks)"
        )


def _solve(block: Tensor, rhs: Tensor) -> Tensor:
    chol, info = torch.linalg.cholesky_ex(block)
    if int(info) == 0:
        out = torch.cholesky_solve(rhs.reshape(block.shape[0], -1), chol).reshape(rhs.shape)
        if bool(torch.isfinite(out).all()):
            return out
    raise SingularCurvatureError(
        "an inverse-curvature block of the deleted coordinates is not positive definite (they "
        "are redundant with each other); delete them one by one"
    )


def _sequences(g: BlockGroup, theta: Tensor, candidates: Tensor) -> tuple[Tensor, Tensor]:
    """Each block's greedy OBS sequence on a copy of its inverse: (saliencies B × c, +inf once
    the block has no candidate left; slots B × c, −1 there)."""
    inv = g.inv.clone()
    ok = g.index >= 0
    rows = g.index.clamp_min(0)
    w = torch.where(ok, theta[rows], 0.0)
    cand = ok & candidates[rows]
    b, c = g.index.shape
    steps = int(cand.sum(1).max()) if cand.numel() else 0
    sal = torch.full((b, c), torch.inf, dtype=torch.float64, device=inv.device)
    slot = torch.full((b, c), -1, dtype=torch.long, device=inv.device)
    ar = torch.arange(b, device=inv.device)
    for t in range(steps):
        d = inv.diagonal(dim1=1, dim2=2)
        s = torch.where(cand, w.square() / (2 * torch.where(cand, d, 1.0)), torch.inf)
        val, q = s.min(1)
        live = torch.isfinite(val)
        sal[:, t], slot[:, t] = val, torch.where(live, q, -1)
        _downdate(inv, w, live, q)
        cand[ar[live], q[live]] = False
    return sal, slot


def _downdate(inv: Tensor, w: Tensor, live: Tensor, q: Tensor) -> None:
    """One OBS deletion of slot q[b] in every block b where ``live[b]`` (the others unchanged):
    w ← w − (w_q/H⁻¹_qq) H⁻¹e_q, w_q = 0, H⁻¹ ← H⁻¹ − H⁻¹e_q e_qᵀH⁻¹/H⁻¹_qq (row and column q
    exactly 0). In place over all blocks at once (a batched rank-one update, no copy of the
    blocks): the column of a block that is not live is taken as zero."""
    if not bool(live.any()):
        return
    ar = torch.arange(inv.shape[0], device=inv.device)
    q = q.clamp_min(0)
    col = inv[ar, :, q] * live[:, None]  # B × c
    dq = torch.where(live, col[ar, q], 1.0)
    w.sub_((w[ar, q] / dq)[:, None] * col)
    inv.baddbmm_(col[:, :, None], (col / dq[:, None])[:, None, :], alpha=-1)
    bl, ql = ar[live], q[live]
    w[bl, ql] = 0
    inv[bl, ql, :] = 0
    inv[bl, :, ql] = 0


def _merge(inv: BlockInverseHessian, seqs, count: int, caps) -> tuple[list[Tensor], Tensor, Tensor]:
    """Which deletions to take: the ``count`` first entries of all sequences ordered by
    (running maximum, block, step) — the order of the greedy that always deletes the least
    current saliency — without the entries past a cap (and what follows them in their block).
    Returns k_b per group, and the rows and saliencies taken in that order."""
    keys, owners, sals = [], [], []
    for gi, (sal, _) in enumerate(seqs):
        run = torch.cummax(sal, 1).values
        live = torch.isfinite(sal)
        b, c = sal.shape
        blk = torch.arange(b, device=sal.device)[:, None].expand(b, c)[live]
        stp = torch.arange(c, device=sal.device)[None, :].expand(b, c)[live]
        keys.append(run[live])
        sals.append(sal[live])
        owners.append(torch.stack([torch.full_like(blk, gi), blk, stp], 1))
    taken = [torch.zeros(s.shape[0], dtype=torch.long, device=s.device) for s, _ in seqs]
    dev = inv.alive.device
    if not keys or count <= 0:
        return taken, torch.empty(0, dtype=torch.long, device=dev), torch.empty(0)
    order = torch.argsort(torch.cat(keys), stable=True)
    own, sal = torch.cat(owners)[order], torch.cat(sals)[order]
    rows = _rows_of(inv, seqs, own)
    keep = _capped(rows, own, caps, inv.coords.size)
    own, rows, sal = own[keep][:count], rows[keep][:count], sal[keep][:count]
    for gi in range(len(seqs)):
        sel = own[own[:, 0] == gi]
        if sel.numel():
            taken[gi].scatter_reduce_(0, sel[:, 1], sel[:, 2] + 1, reduce="amax")
    return taken, rows, sal


def _rows_of(inv: BlockInverseHessian, seqs, own: Tensor) -> Tensor:
    """The coordinate row of every (group, block, step) entry."""
    out = torch.empty(own.shape[0], dtype=torch.long, device=own.device)
    for gi, (_, slot) in enumerate(seqs):
        sel = own[:, 0] == gi
        b, t = own[sel, 1], own[sel, 2]
        out[sel] = inv.groups[gi].index[b, slot[b, t]]
    return out


def _capped(rows: Tensor, own: Tensor, caps, size: int) -> Tensor:
    """Entries kept, in merge order, once every cap (rows, most) is applied: a capped group's
    entries past its limit are dropped, and so is everything after a dropped entry in its
    block (a block's deletions stay a prefix of its sequence)."""
    keep = torch.ones(rows.shape[0], dtype=torch.bool, device=rows.device)
    if not caps:
        return keep
    group_of = torch.full((size,), -1, dtype=torch.long, device=rows.device)
    limits = torch.tensor([limit for _, limit in caps], dtype=torch.long, device=rows.device)
    for i, (crow, _) in enumerate(caps):
        group_of[crow.to(rows.device)] = i
    cap = group_of[rows]
    capped = cap >= 0
    pos = torch.arange(rows.shape[0], device=rows.device)
    # rank of each capped entry within its cap group, in merge order
    by = torch.argsort(cap[capped] * rows.shape[0] + pos[capped])
    c_sorted = cap[capped][by]
    start = torch.searchsorted(c_sorted, c_sorted, right=False)
    rank = torch.empty_like(by)
    rank[by] = torch.arange(by.numel(), device=rows.device) - start
    keep[capped] = rank < limits[cap[capped]]
    # a dropped entry ends its block
    block_id = own[:, 0] * (own[:, 1].max() + 1) + own[:, 1]
    first = torch.full((int(block_id.max()) + 1,), own.shape[0], device=rows.device)
    first.scatter_reduce_(0, block_id[~keep], own[~keep, 2], reduce="amin")
    return keep & (own[:, 2] < first[block_id])


def _apply(g: BlockGroup, theta: Tensor, slot: Tensor, k: Tensor) -> None:
    """Replay each block's first k_b greedy deletions on its inverse and weights (in place)."""
    ok = g.index >= 0
    rows = g.index.clamp_min(0)
    w = torch.where(ok, theta[rows], 0.0)
    for t in range(int(k.max())):
        _downdate(g.inv, w, k > t, slot[:, t])
    theta[g.index[ok]] = w[ok]
