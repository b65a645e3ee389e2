"""K-FAC inverse curvature for OBS on large networks: per layer, G ≈ B ⊗ A.

For a Linear or convolution layer (row-major layout E = [W | b], :mod:`.layer_factors`) the
Gauss–Newton block of E = (1/N) Σ_n ℓ_n is approximated by a Kronecker product of

    A = (1/N) Σ_n Σ_t ã_nt ã_ntᵀ            (L' × L', layer inputs with a 1 for the bias)
    B = (1/N) Σ_n (1/T) Σ_t Σ_k g_nkt g_nktᵀ  (out × out, g the loss-Hessian columns at the output)

(Martens & Grosse 2015; for convolutions over T positions the KFC form of Grosse & Martens 2016,
spatially uncorrelated derivatives). The columns g are those of optbrain's GGN
(:func:`~optbrain.curvature.losses.hessian_factor`), so for a one-layer model under MSE, where Σ_k
g gᵀ is the constant loss Hessian, B ⊗ A *is* the Gauss–Newton matrix. Layers are independent
(block-diagonal by layer).

The damping is exact: with A = U_A Λ U_Aᵀ and B = U_B M U_Bᵀ, (B ⊗ A + αI)⁻¹ = (U_B ⊗ U_A)
diag(1/(μ_j λ_i + α)) (U_B ⊗ U_A)ᵀ, the α of the dense inverses (no π-split damping). Its
diagonal (the OBS saliencies w_q²/(2[H⁻¹]_qq)) and columns (the single-weight OBS update) cost
O(out²·L' + out·L'²) per layer.

**Entries already pruned** by the mask at construction are held at zero in every update (the
constrained quadratic), but the saliencies use the diagonal of the unconstrained Kronecker
inverse, which over-estimates [(H_FF)⁻¹]_qq (a principal block of an inverse dominates the
inverse of the principal block): exact for a dense layer, an approximation once it is pruned.
Entries deleted after construction (:meth:`KroneckerInverseHessian.eliminate`) are exact
(low-rank corrections).

**The bulk step** (:meth:`KroneckerInverseHessian.prune`): the ``count`` least saliencies are
deleted together and the remaining alive weights of each layer move by the exact group-OBS
update of the damped Kronecker quadratic, min ½δᵀ(B⊗A + αI)δ with δ = −w on the deleted and 0 on
the pruned entries, solved by conjugate gradients preconditioned by the Kronecker inverse
(each product B·V·A costs O(out·L'·(out + L'))).

**Memory and time.** Σ_layers (L'² + out²) numbers for the factors and their eigenvectors
(a 1024 × 1024 layer: 2·1025² instead of 1025² × 1024² for its dense block); accumulating
them costs O(N·T·(L'² + K·out²)), the eigendecompositions O(L'³ + out³), a bulk step a few
tens of Kronecker products per layer.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..masking import Mask
from ..paramdict import ParamDict
from ..problem import Problem
from .base import Progress, in_dtype
from .coordinate_views import CoordinateViews
from .inverse import Coordinates
from .layer_factors import LayerSlot, layer_factors, layer_slots

log = logging.getLogger(__name__)


@dataclass
class KroneckerLayer:
    """One layer's factors and their eigendecompositions; ``rows``: out × L' coordinate rows
    (−1 pruned); ``U``/``S``: the low-rank correction of the deletions after construction."""

    slot: LayerSlot
    A: Tensor
    B: Tensor
    alpha: float
    rows: Tensor
    qa: Tensor = field(init=False)
    qb: Tensor = field(init=False)
    d: Tensor = field(init=False)
    U: Tensor | None = None
    S: Tensor | None = None

    def __post_init__(self) -> None:
        lam, self.qa = torch.linalg.eigh(self.A)
        mu, self.qb = torch.linalg.eigh(self.B)
        lam, mu = lam.clamp_min(0), mu.clamp_min(0)  # PSD up to rounding
        self.d = 1.0 / (mu[:, None] * lam[None, :] + self.alpha)

    def h(self, v: Tensor) -> Tensor:
        """(B ⊗ A + αI)·v for v of the layer's shape out × L'."""
        return self.B @ v @ self.A + self.alpha * v

    def kinv(self, v: Tensor) -> Tensor:
        """(B ⊗ A + αI)⁻¹·v (out × L')."""
        return self.qb @ (self.d * (self.qb.T @ v @ self.qa)) @ self.qa.T

    def kdiag(self) -> Tensor:
        """diag (B ⊗ A + αI)⁻¹ as out × L'."""
        return self.qb.square() @ self.d @ self.qa.square().T

    def kcols(self, flat: Tensor) -> Tensor:
        """Columns of (B ⊗ A + αI)⁻¹ at flat layer positions: p_l × m."""
        width = self.A.shape[0]
        j, i = flat // width, flat % width
        core = self.d[None] * (self.qb[j][:, :, None] * self.qa[i][:, None, :])  # m × out × L'
        cols = torch.einsum("jb,mba,ia->mji", self.qb, core, self.qa)
        return cols.reshape(flat.numel(), -1).T


class KFACInverse:
    """(B ⊗ A + αI)⁻¹ per layer (see the module doc): an inverse estimator for
    :class:`~optbrain.pruners.OBSPruner` and :class:`~optbrain.saliency.OBS`
    (``inverse(problem, mask) -> KroneckerInverseHessian``).

    ``alpha`` > 0 as the dense inverses' α; ``cg_tol`` and ``cg_iters``: the conjugate-gradient
    solve of the bulk step's update (relative residual, most iterations). The problem's
    parameters must be weights and biases of Linear, Conv1d or Conv2d layers (``groups=1``),
    each called once per forward pass. On a distributed problem the factors are summed over the
    ranks.
    """

    structured = True

    def __init__(
        self,
        alpha: float = 1e-6,
        *,
        dtype: torch.dtype = torch.float64,
        cg_tol: float = 1e-10,
        cg_iters: int = 500,
        progress: Progress | None = None,
    ):
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, not {alpha!r}")
        if not cg_tol > 0 or cg_iters < 1:
            raise ValueError("cg_tol must be > 0 and cg_iters >= 1")
        self.alpha = float(alpha)
        self.dtype = dtype
        self.cg_tol, self.cg_iters = float(cg_tol), int(cg_iters)
        self.progress = progress

    @property
    def regularizer(self) -> float:
        return self.alpha

    def __repr__(self) -> str:
        return f"KFACInverse(alpha={self.alpha!r})"

    def factors(self, work: Problem, coords: Coordinates) -> list[tuple[LayerSlot, Tensor, Tensor]]:
        """(slot, A, B) of every layer, summed over the ranks (one pass over the data)."""
        if coords.size == 0:
            raise ValueError("no alive coordinates: every entry is pruned")
        slots = layer_slots(work.model, coords)
        dev = work.device
        mats = []
        for s in slots:
            out, width = s.shape
            mats += [torch.zeros(width, width, dtype=torch.float64, device=dev),
                     torch.zeros(out, out, dtype=torch.float64, device=dev)]  # fmt: skip
        tally = {"samples": 0, "rows": 0, "dropped": 0}
        with work.together("accumulating the Kronecker factors"):
            for chunk in layer_factors(work, slots, tally):
                for i, s in enumerate(slots):
                    a, g = chunk[s.path]
                    mats[2 * i].addmm_(a.reshape(-1, a.shape[-1]).T, a.reshape(-1, a.shape[-1]))
                    gf = g.reshape(-1, g.shape[-1])
                    mats[2 * i + 1].addmm_(gf.T, gf, alpha=1.0 / g.shape[2])
                if self.progress is not None:
                    self.progress(tally["samples"], work.progress_total())
        work.progress_done(self.progress, tally["samples"])
        work.all_reduce_(mats)
        n = work.counted(tally["samples"])
        return [(s, mats[2 * i] / n, mats[2 * i + 1] / n) for i, s in enumerate(slots)]

    def inverse(self, problem: Problem, mask: Mask | None = None) -> KroneckerInverseHessian:
        work = in_dtype(problem, self.dtype)
        coords = Coordinates(work.parameters(), mask)
        layers = [
            KroneckerLayer(s, A, B, self.alpha, s.rows.to(A.device))
            for s, A, B in self.factors(work, coords)
        ]
        info = {"method": "kfac", "alpha": self.alpha, "damping": 0.0, "layers": len(layers)}
        return KroneckerInverseHessian(coords, layers, info, self.cg_tol, self.cg_iters)


class KroneckerInverseHessian(CoordinateViews):
    """K-FAC inverse curvature over the alive coordinates, with the operations of
    :class:`~optbrain.curvature.inverse.InverseHessian` (``diag``, ``column``, ``obs_step``,
    ``step_vector``, ``eliminate``, ``gather``/``scatter``) and the bulk step :meth:`prune`."""

    prunes_in_bulk = True

    def __init__(self, coords, layers: list[KroneckerLayer], info: dict, cg_tol, cg_iters):
        self.coords, self.layers, self.info = coords, layers, info
        self.cg_tol, self.cg_iters = cg_tol, cg_iters
        dev = layers[0].A.device
        self.alive = torch.ones(coords.size, dtype=torch.bool, device=dev)
        self._layer = torch.full((coords.size,), -1, dtype=torch.long, device=dev)
        self._flat = torch.full((coords.size,), -1, dtype=torch.long, device=dev)
        for li, lay in enumerate(layers):
            ok = lay.rows.reshape(-1) >= 0
            rows = lay.rows.reshape(-1)[ok]
            self._layer[rows] = li
            self._flat[rows] = torch.arange(lay.rows.numel(), device=dev)[ok]

    # ------------------------------------------------------------------ views
    def copy(self) -> KroneckerInverseHessian:
        out = KroneckerInverseHessian.__new__(KroneckerInverseHessian)
        out.__dict__.update(self.__dict__)
        out.layers = [
            KroneckerLayer.__new__(KroneckerLayer) for _ in self.layers
        ]  # shallow copies: factors shared, corrections copied on write
        for new, old in zip(out.layers, self.layers):
            new.__dict__.update(old.__dict__)
        out.alive = self.alive.clone()
        return out

    def diagonal_vector(self) -> Tensor:
        """[H⁻¹]_qq of every row (0 for eliminated rows). In a layer with entries pruned before
        this inverse was built it is the Kronecker inverse's own diagonal, which does not hold
        them at zero: an approximation for choosing weights; the steps are exact
        (:meth:`step_vector`, :meth:`prune`)."""
        out = torch.zeros(self.coords.size, dtype=torch.float64, device=self.alive.device)
        for lay in self.layers:
            d = lay.kdiag().reshape(-1)
            if lay.U is not None:
                d = d - ((lay.U @ lay.S) * lay.U).sum(1)
            ok = lay.rows.reshape(-1) >= 0
            out[lay.rows.reshape(-1)[ok]] = d[ok]
        return torch.where(self.alive, out, 0.0)

    # ------------------------------------------------------------------ OBS, one step
    def _cols(self, lay: KroneckerLayer, flat: Tensor) -> Tensor:
        """Columns of the current reduced inverse at flat layer positions (p_l × m)."""
        cols = lay.kcols(flat)
        if lay.U is not None:
            cols = cols - lay.U @ (lay.S @ lay.U[flat].T)
        return cols

    def _by_layer(self, q) -> dict[int, Tensor]:
        idx = self._alive_rows(q)
        return {int(li): idx[self._layer[idx] == li] for li in self._layer[idx].unique()}

    def step_vector(self, theta: Tensor, q) -> tuple[float, Tensor]:
        """(ΔE, δθ) of deleting coordinate(s) ``q`` together (group OBS within each layer)."""
        delta = torch.zeros_like(theta)
        loss = 0.0
        for li, rows in self._by_layer(q).items():
            lay = self.layers[li]
            if self._held(lay):  # entries already at zero: the constrained quadratic
                part, free, step = self._constrained(lay, theta, rows)
                delta[lay.rows[free]] += step[free]
                delta[rows] = -theta[rows]
                loss += part
                continue
            flat = self._flat[rows]
            cols = self._cols(lay, flat)
            z = torch.linalg.solve(cols[flat], theta[rows])
            d = -(cols @ z)
            ok = lay.rows.reshape(-1) >= 0
            delta[lay.rows.reshape(-1)[ok]] += d[ok]
            delta[rows] = -theta[rows]
            loss += 0.5 * float(theta[rows] @ z)
        return loss, delta

    def _held(self, lay: KroneckerLayer) -> bool:
        """Whether some of the layer's entries are held at zero (pruned before this inverse was
        built, or eliminated since): its columns of the Kronecker inverse then do not hold them,
        and a step solves the constrained quadratic instead (conjugate gradients)."""
        ok = lay.rows >= 0
        return not bool(ok.all()) or not bool(self.alive[lay.rows[ok]].all())

    def obs_step(self, weights: Mapping[str, Tensor], q) -> tuple[float, ParamDict]:
        loss, delta = self.step_vector(self.gather(weights), q)
        return loss, self.coords.scatter(delta)

    def eliminate(self, q) -> None:
        """Constrain coordinate(s) ``q`` to zero (a low-rank correction of their layer)."""
        for li, rows in self._by_layer(q).items():
            lay = self.layers[li]
            flat = self._flat[rows]
            cols = self._cols(lay, flat)
            inner = torch.linalg.inv(cols[flat])
            if lay.U is None:
                lay.U, lay.S = cols, inner
            else:
                lay.U = torch.cat([lay.U, cols], 1)
                lay.S = torch.block_diag(lay.S, inner)
            self.alive[rows] = False

    # ------------------------------------------------------------------ OBS, many steps
    def prune(
        self, theta: Tensor, candidates: Tensor, count: int, caps: Sequence[tuple[Tensor, int]] = ()
    ) -> tuple[Tensor, list[float]]:
        """Delete the ``count`` candidates of least saliency w²/(2[H⁻¹]_qq) together (``caps``:
        (rows, most deletions) pairs) and move each layer's other alive weights by the exact
        group-OBS update of the Kronecker quadratic (conjugate gradients, see the module doc); θ
        is updated in place. Returns the deleted rows and their shares of the predicted
        increase (each single saliency, scaled so that a layer's shares add up to its group
        ΔE)."""
        d = self.diagonal_vector()
        sal = torch.where(candidates, theta.square() / (2 * torch.where(candidates, d, 1.0)), 0.0)
        order = torch.argsort(torch.where(candidates, sal, torch.inf), stable=True)
        order = order[candidates[order]]
        order = order[_within_caps(order, caps, self.coords.size)][:count]
        shares = torch.zeros_like(sal)
        for li, rows in self._by_layer(order).items() if order.numel() else ():
            loss = self._group_update(self.layers[li], theta, rows)
            shares[rows] = sal[rows] * (loss / float(sal[rows].sum().clamp_min(1e-300)))
        theta[order] = 0
        self.alive[order] = False
        return order, shares[order].tolist()

    def _group_update(self, lay: KroneckerLayer, theta: Tensor, rows: Tensor) -> float:
        """θ of the layer ← argmin ½δᵀHδ with δ = −θ on ``rows`` and 0 on the entries not alive;
        returns ½δᵀHδ."""
        loss, free, delta = self._constrained(lay, theta, rows)
        theta[lay.rows[free]] += delta[free]
        return loss

    def _constrained(self, lay: KroneckerLayer, theta: Tensor, rows: Tensor):
        """(½δᵀHδ, the free entries, δ) for δ = argmin ½δᵀHδ over the layer with δ = −θ on
        ``rows`` and 0 on every entry not alive (conjugate gradients on the free entries)."""
        full = lay.rows
        ok = full >= 0
        free = ok & self.alive[full.clamp_min(0)]
        free_flat = free.reshape(-1).clone()
        free_flat[self._flat[rows]] = False
        free = free_flat.reshape(full.shape)
        fixed = torch.zeros(full.shape, dtype=torch.float64, device=theta.device)
        fixed.view(-1)[self._flat[rows]] = -theta[rows]
        rhs = -lay.h(fixed) * free
        x = _pcg(lambda v: lay.h(v) * free, rhs, lambda r: lay.kinv(r) * free,
                 self.cg_tol, self.cg_iters)  # fmt: skip
        delta = fixed + x
        return 0.5 * float((delta * lay.h(delta)).sum()), free, delta

    def __repr__(self) -> str:
        return (
            f"KroneckerInverseHessian({self.coords.size} coordinates, "
            f"{int(self.alive.sum())} alive, {len(self.layers)} layers)"
        )


def _within_caps(order: Tensor, caps, size: int) -> Tensor:
    """Which entries of ``order`` stay within their cap group's limit (in that order)."""
    keep = torch.ones(order.numel(), dtype=torch.bool, device=order.device)
    if not caps:
        return keep
    group_of = torch.full((size,), -1, dtype=torch.long, device=order.device)
    limits = torch.tensor([most for _, most in caps], dtype=torch.long, device=order.device)
    for i, (rows, _) in enumerate(caps):
        group_of[rows.to(order.device)] = i
    cap = group_of[order]
    for i in range(len(caps)):
        sel = cap == i
        keep[sel] = torch.arange(int(sel.sum()), device=order.device) < limits[i]
    return keep


def _pcg(apply, rhs: Tensor, precond, tol: float, iters: int) -> Tensor:
    """Preconditioned conjugate gradients for apply(x) = rhs (symmetric positive definite)."""
    x = torch.zeros_like(rhs)
    r = rhs.clone()
    norm = float(rhs.norm())
    if norm == 0:
        return x
    z = precond(r)
    p = z.clone()
    rz = float((r * z).sum())
    for _ in range(iters):
        ap = apply(p)
        step = rz / float((p * ap).sum())
        x += step * p
        r -= step * ap
        if float(r.norm()) <= tol * norm:
            return x
        z = precond(r)
        rz_new = float((r * z).sum())
        p = z + (rz_new / rz) * p
        rz = rz_new
    log.warning("K-FAC update: CG stopped after %d iterations at residual %.2e", iters,
                float(r.norm()) / norm)  # fmt: skip
    return x
