"""Dense inverse curvature for the Optimal Brain Surgeon family.

Every estimator here returns an :class:`InverseHessian`: the float64 inverse of a curvature matrix
of the objective E(θ) = (1/N) Σ_n ℓ_n(θ) (see :class:`~optbrain.problem.Problem`) over the
problem's *alive coordinates* — every entry of every parameter of the problem, except the entries
that ``mask`` prunes (those are constrained to zero and left out). Parameters of the problem that
the mask does not cover (biases, by default) are alive coordinates too: OBS moves them to
compensate, but never deletes them.

* :class:`RecursiveInverse`: Hassibi & Stork's one pass over the data. With the per-sample rows
  v = J_nᵀ s (J_n = ∂f(x_n)/∂θ, s the columns of a square root of the per-sample loss Hessian
  ∂²ℓ_n/∂f², :func:`~optbrain.curvature.losses.hessian_factor`), the Gauss–Newton matrix is
  G = (1/N) Σ v vᵀ and the matrix-inversion lemma
  ``H⁻¹ ← H⁻¹ − H⁻¹ v vᵀ H⁻¹ / (N + vᵀ H⁻¹ v)`` started from α⁻¹ I ends at (G + αI)⁻¹. For MSE
  the rows are the paper's X^[k] (scaled by the loss's √2 or √(2/d)); for cross-entropy the C − 1
  columns of the softmax Hessian's square root generalise the a_k weighting of the OBS extensions
  paper to many outputs. ``chunk`` rows are folded in per Woodbury block (the same result as the
  row-by-row recursion, ``chunk=1`` is that recursion literally).
* :class:`DirectInverse`: the dense GGN (or the exact Hessian, small nets) plus ``damping``·I,
  inverted by Cholesky. For a loss whose per-sample Hessian is indefinite (some user losses), both
  GGN estimators use the same G₊: the negative eigen-columns of the loss Hessian are left out
  (counted in ``info["negative_rows_dropped"]``), so G₊ is positive semi-definite. A matrix that
  is not positive definite (an exact Hessian away from a minimum, a singular GGN without damping)
  is retried with more damping and every attempt is recorded in ``info["fallbacks"]``.
* :class:`AutoInverse`: the direct GGN inverse when it is cheaper (more rows than p/2), else the
  recursion; both give (G + αI)⁻¹.

α (``alpha``): the recursion starts from H₀ = αI, so the result is (G + αI)⁻¹ — a penalty α‖δw‖²
that keeps the inverse finite where G is singular (more weights than rows, dead units). The OBS
paper reports the method insensitive to α (its printed range is garbled in the scanned text);
NNSYSID's ``obsprune`` uses α = 10⁻⁶, which is the default here. Cost: O(p²) memory and O(N·K·p²)
time for p alive coordinates, N samples and K loss-Hessian columns per sample.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Iterator, Mapping, Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from ..errors import (
    CurvatureTooLargeError,
    NonFiniteLossError,
    ShapeMismatchError,
    SingularCurvatureError,
)
from ..masking import Mask
from ..paramdict import ParamDict, numel
from ..problem import Problem, eval_mode
from . import losses
from .backprop import _chunks
from .base import Progress, in_dtype
from .budget import BUDGET as _BUDGET
from .generic import _Functional, _per_sample_pullbacks
from .linalg import damped_cholesky

log = logging.getLogger(__name__)

MAX_PARAMS = 20_000
"""Default limit on alive coordinates (a 20 000² float64 matrix is 3.2 GB)."""

_FALLBACK_START = 1e-8  # first extra damping, relative to the mean |diagonal|
_FALLBACK_STEPS = 20  # ×10 each: up to 1e11 × the mean |diagonal|


class Coordinates:
    """The alive coordinates of a problem: which entry of which parameter each matrix row is.

    Rows follow the problem's parameter order and, within a parameter, the flat (row-major) order
    of its entries. ``rows[name]`` maps every flat entry to its row, or −1 when the mask prunes it.
    """

    def __init__(self, params: Mapping[str, Tensor], mask: Mask | None = None):
        if mask is not None:
            unknown = [n for n in mask.names if n not in params]
            if unknown:
                raise KeyError(
                    f"the mask names parameter(s) {unknown} that the problem does not include "
                    f"(it has {list(params)})"
                )
            bad = {
                n: (tuple(mask[n].shape), tuple(params[n].shape))
                for n in mask.names
                if tuple(mask[n].shape) != tuple(params[n].shape)
            }
            if bad:
                raise ShapeMismatchError(
                    "mask shape differs from the parameter's shape (mask, parameter): "
                    + ", ".join(f"{n}: {m} vs {p}" for n, (m, p) in bad.items())
                )
        self.names = tuple(params)
        self.shapes = {n: tuple(p.shape) for n, p in params.items()}
        self.positions: dict[str, Tensor] = {}
        self.offsets: dict[str, int] = {}
        self.rows: dict[str, Tensor] = {}
        off = 0
        for n, p in params.items():
            dev = p.device
            if mask is not None and n in mask:
                alive = mask[n].reshape(-1).to(dev)
                pos = alive.nonzero().reshape(-1)
            else:
                pos = torch.arange(p.numel(), device=dev)
            rows = torch.full((p.numel(),), -1, dtype=torch.long, device=dev)
            rows[pos] = torch.arange(off, off + pos.numel(), device=dev)
            self.positions[n], self.offsets[n], self.rows[n] = pos, off, rows
            off += pos.numel()
        self.size = off

    def gather(self, values: Mapping[str, Tensor], dtype=torch.float64) -> Tensor:
        """The alive entries of a ParamDict as one vector (in row order)."""
        parts = [values[n].detach().reshape(-1)[self.positions[n]] for n in self.names]
        return torch.cat(parts).to(dtype) if parts else torch.empty(0, dtype=dtype)

    def scatter(self, vec: Tensor, fill: float = 0.0) -> ParamDict:
        """A ParamDict with ``vec`` at the alive entries and ``fill`` elsewhere."""
        out: ParamDict = {}
        for n in self.names:
            size = 1
            for s in self.shapes[n]:
                size *= s
            flat = torch.full((size,), fill, dtype=vec.dtype, device=vec.device)
            pos, off = self.positions[n], self.offsets[n]
            flat[pos.to(vec.device)] = vec[off : off + pos.numel()]
            out[n] = flat.reshape(self.shapes[n])
        return out

    def row(self, name: str, index: int | Sequence[int]) -> int:
        """Row of entry ``index`` of parameter ``name``: a flat integer (Python, NumPy or a 0-d
        integer tensor) or a multi-index sequence of such integers."""
        if name not in self.rows:
            raise KeyError(f"no parameter {name!r}; the inverse covers {list(self.names)}")
        shape = self.shapes[name]
        try:
            flat = operator.index(index)
        except TypeError:
            flat = None
        if flat is None:
            try:
                idx = tuple(operator.index(i) for i in index)
            except TypeError as exc:
                raise TypeError(
                    f"index must be an integer or a sequence of integers, not {index!r}"
                ) from exc
            if len(idx) != len(shape):
                raise IndexError(f"index {idx} does not fit {name} of shape {shape}")
            flat = 0
            for i, s in zip(idx, shape):
                if not 0 <= i < s:
                    raise IndexError(f"index {idx} out of range for {name} of shape {shape}")
                flat = flat * s + i
        if not 0 <= flat < self.rows[name].numel():
            raise IndexError(f"flat index {flat} out of range for {name} of shape {shape}")
        r = int(self.rows[name][flat])
        if r < 0:
            raise ValueError(f"{name}[{index}] is pruned by the mask: it is not a coordinate")
        return r


class InverseHessian:
    """The inverse of a curvature matrix over the alive coordinates, with OBS operations.

    ``matrix`` is p × p float64 (p = alive coordinates when it was computed). Deleting coordinates
    with :meth:`eliminate` shrinks the inverse in place to that of the reduced matrix
    (H⁻¹ ← H⁻¹_{−q,−q} − H⁻¹_{−q,q} H⁻¹_{q,−q} / H⁻¹_qq): the rows and columns of deleted
    coordinates become exactly zero and :attr:`alive` flags them, so row numbers never change.
    ``info`` says how it was computed (``method``, ``alpha``, ``damping``, ``fallbacks``...).
    """

    def __init__(self, coords: Coordinates, matrix: Tensor, info: dict):
        if matrix.shape != (coords.size, coords.size):
            raise ValueError(f"matrix of shape {tuple(matrix.shape)} for {coords.size} coordinates")
        self.coords = coords
        self.matrix = matrix
        self.info = info
        self.alive = torch.ones(coords.size, dtype=torch.bool, device=matrix.device)

    @property
    def names(self) -> tuple[str, ...]:
        return self.coords.names

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self.coords.shapes)

    def __len__(self) -> int:
        return self.coords.size

    def copy(self) -> InverseHessian:
        """An independent copy (matrix and alive flags; the coordinates are shared)."""
        out = InverseHessian(self.coords, self.matrix.clone(), self.info)
        out.alive = self.alive.clone()
        return out

    # ------------------------------------------------------------------ ParamDict views
    def diagonal_vector(self) -> Tensor:
        """[H⁻¹]_qq of every row (0 for eliminated rows), float64."""
        return torch.diagonal(self.matrix)

    def diag(self) -> ParamDict:
        """[H⁻¹]_qq per parameter entry; +inf for pruned and eliminated entries."""
        d = torch.where(self.alive, torch.diagonal(self.matrix), torch.inf)
        return self.coords.scatter(d, fill=torch.inf)

    def column(self, name: str, index: int | tuple) -> ParamDict:
        """H⁻¹ e_q as a ParamDict (zero at pruned entries) for entry ``index`` of ``name``."""
        return self.coords.scatter(self.matrix[:, self.flat_index(name, index)].clone())

    def flat_index(self, name: str, index: int | tuple) -> int:
        """Row of entry ``index`` (flat int or multi-index) of ``name`` in :attr:`matrix`."""
        return self.coords.row(name, index)

    def gather(self, values: Mapping[str, Tensor]) -> Tensor:
        """The alive entries of a ParamDict as a float64 vector in row order."""
        return self.coords.gather(values).to(self.matrix.device)

    def scatter(self, vec: Tensor) -> ParamDict:
        return self.coords.scatter(vec)

    # ------------------------------------------------------------------ OBS
    def _rows(self, q: int | Sequence[int] | Tensor) -> Tensor:
        idx = torch.as_tensor(q, dtype=torch.long, device=self.matrix.device).reshape(-1)
        if idx.numel() == 0:
            raise ValueError("no coordinate given")
        if bool(((idx < 0) | (idx >= self.coords.size)).any()):
            raise IndexError(f"rows {idx.tolist()} out of range 0..{self.coords.size - 1}")
        if idx.unique().numel() != idx.numel():
            raise ValueError(f"rows {idx.tolist()} repeat a coordinate")
        if not bool(self.alive[idx].all()):
            dead = idx[~self.alive[idx]].tolist()
            raise ValueError(f"coordinate(s) {dead} were already eliminated")
        return idx

    def _block_solve(self, idx: Tensor, rhs: Tensor) -> Tensor:
        """(H⁻¹_QQ)⁻¹ rhs, with a clear error when the block is singular."""
        block = self.matrix[idx][:, idx]
        chol, info = torch.linalg.cholesky_ex(block)
        if int(info) == 0:
            out = torch.cholesky_solve(rhs.reshape(idx.numel(), -1), chol).reshape(rhs.shape)
            if bool(torch.isfinite(out).all()):
                return out
        raise SingularCurvatureError(
            f"the inverse-curvature block of coordinates {idx.tolist()} is not positive definite "
            "(these weights are redundant with each other); add damping or delete them one by one"
        )

    def step_vector(self, theta: Tensor, q: int | Sequence[int] | Tensor) -> tuple[float, Tensor]:
        """OBS for the row vector ``theta``: (ΔE, δθ) deleting coordinate(s) ``q`` together.

        ΔE = ½ θ_Qᵀ (H⁻¹_QQ)⁻¹ θ_Q and δθ = −H⁻¹_{:,Q} (H⁻¹_QQ)⁻¹ θ_Q (Hassibi & Stork eq. 5 for
        one q; Stahlberger & Riedmiller's generalisation for a group); δθ_Q = −θ_Q exactly.
        """
        idx = self._rows(q)
        wq = theta[idx]
        z = self._block_solve(idx, wq)
        delta = -(self.matrix[:, idx] @ z)
        delta[idx] = -wq
        if not bool(torch.isfinite(delta).all()):
            raise SingularCurvatureError(
                f"the OBS update for coordinates {idx.tolist()} is not finite"
            )
        return 0.5 * float(wq @ z), delta

    def obs_step(
        self, weights: Mapping[str, Tensor], q: int | Sequence[int]
    ) -> tuple[float, ParamDict]:
        """(L_q or group ΔE, δw as a ParamDict) for deleting row(s) ``q`` from ``weights``."""
        loss, delta = self.step_vector(self.gather(weights), q)
        return loss, self.coords.scatter(delta)

    def eliminate(self, q: int | Sequence[int] | Tensor) -> None:
        """Constrain coordinate(s) ``q`` to zero: shrink H⁻¹ to the inverse of the reduced matrix
        (rank-one downdate for one q, rank-m with an m × m solve for a group), O(p²) per call."""
        idx = self._rows(q)
        cols = self.matrix[:, idx]
        self.matrix.addmm_(cols, self._block_solve(idx, cols.T.contiguous()), alpha=-1)
        self.matrix[idx, :] = 0
        self.matrix[:, idx] = 0
        self.alive[idx] = False

    def __repr__(self) -> str:
        return (
            f"InverseHessian({self.coords.size} coordinates, {int(self.alive.sum())} alive, "
            f"method={self.info.get('method')!r})"
        )


# ---------------------------------------------------------------------------- estimators
@runtime_checkable
class InverseCurvature(Protocol):
    """What OBS needs from an inverse-curvature estimator (DESIGN.md's ``InverseCurvature``)."""

    def inverse(self, problem: Problem, mask: Mask | None = None) -> InverseHessian: ...


class _InverseEstimator:
    """Shared options: float64 by default, a size limit and a progress callback."""

    def __init__(
        self,
        *,
        dtype: torch.dtype = torch.float64,
        max_params: int = MAX_PARAMS,
        progress: Progress | None = None,
    ):
        if max_params < 1:
            raise ValueError(f"max_params must be >= 1, not {max_params}")
        self.dtype = dtype
        self.max_params = int(max_params)
        self.progress = progress

    @property
    def regularizer(self) -> float:  # pragma: no cover - abstract
        """The multiple of I added to the curvature before inverting (α or the damping)."""
        raise NotImplementedError

    def inverse(self, problem: Problem, mask: Mask | None = None) -> InverseHessian:
        work = in_dtype(problem, self.dtype)
        coords = Coordinates(work.parameters(), mask)
        if coords.size == 0:
            raise ValueError("no alive coordinates: every entry is pruned")
        if coords.size > self.max_params:
            raise CurvatureTooLargeError(
                f"{coords.size} alive coordinates: the dense inverse needs "
                f"{coords.size**2 * 8 / 2**30:.1f} GiB (limit max_params={self.max_params}); "
                "restrict the problem's params, raise max_params, or use a diagonal method "
                "(OBD) or layer-wise OBS"
            )
        matrix, info = self._compute(work, coords)
        if not bool(torch.isfinite(matrix).all()):
            raise SingularCurvatureError(f"{type(self).__name__}: the inverse is not finite")
        return InverseHessian(coords, matrix, info)

    def _compute(self, work: Problem, coords: Coordinates) -> tuple[Tensor, dict]:
        raise NotImplementedError  # pragma: no cover

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if k != "progress")
        return f"{type(self).__name__}({args})"


def _rows(
    problem: Problem, coords: Coordinates, progress: Progress | None, tally: dict[str, int]
) -> Iterator[tuple[Tensor, Tensor | None]]:
    """Chunks of rows v = J_nᵀ s_kn over the alive coordinates (and their signs σ, or None):
    the GGN is (1/N) Σ σ v vᵀ."""
    fn = _Functional(problem.prepare())
    done = 0
    size = numel(fn.wanted)
    with eval_mode(problem.model):
        for x, y in _chunks(problem, None):
            with torch.no_grad():
                out = fn(fn.wanted, x)
            if not bool(torch.isfinite(out).all()):
                raise NonFiniteLossError("the model output contains NaN or inf")
            cols, sign = losses.hessian_factor(problem, out, y)
            k = cols.shape[0]
            step = max(1, _BUDGET // max(1, k * size))
            for i in range(0, x.shape[0], step):
                xc, sc = x[i : i + step], cols[:, i : i + step].transpose(0, 1)
                b = xc.shape[0]
                g = _per_sample_pullbacks(fn, xc, sc)
                rows = torch.cat(
                    [g[n].reshape(b, k, -1)[:, :, coords.positions[n]] for n in coords.names], 2
                ).reshape(b * k, coords.size)
                s = None if sign is None else sign[:, i : i + step].T.reshape(-1)
                yield rows.to(torch.float64), s
            done += x.shape[0]
            tally["samples"] = done
            if progress is not None:
                progress(done, problem.progress_total())
    problem.progress_done(progress, done)


def _positive_rows(
    problem: Problem, coords: Coordinates, progress: Progress | None, tally: dict[str, int]
) -> Iterator[Tensor]:
    """The rows of :func:`_rows` whose sign is +: Σ v vᵀ over them is N·G₊, the Gauss–Newton
    matrix of the loss Hessian's non-negative part (all rows for MSE and cross-entropy). Counts
    the rows kept and dropped in ``tally`` ("rows", "dropped")."""
    for rows, sign in _rows(problem, coords, progress, tally):
        if sign is not None:
            tally["dropped"] += int((sign < 0).sum())
            rows = rows[sign > 0]
        tally["rows"] += rows.shape[0]
        yield rows


def _warn_indefinite(tally: dict[str, int]) -> None:
    if tally["dropped"]:
        log.warning(
            "the loss Hessian is indefinite: the Gauss-Newton matrix uses only its %d "
            "non-negative columns and leaves out %d negative ones",
            tally["rows"],
            tally["dropped"],
        )


class RecursiveInverse(_InverseEstimator):
    """(G + αI)⁻¹ by Hassibi & Stork's one-pass recursion (see the module doc).

    ``alpha`` > 0 is the initial H₀ = αI (default 10⁻⁶, as NNSYSID); ``chunk`` rows are folded in
    per Woodbury block (1 = the literal rank-one recursion; larger is faster, same result). A loss
    whose Hessian is indefinite (some user losses) contributes only its non-negative part, as in
    :class:`DirectInverse` (``info["negative_rows_dropped"]``, and a warning).
    """

    def __init__(self, alpha: float = 1e-6, *, chunk: int = 32, **kwargs):
        super().__init__(**kwargs)
        if not alpha > 0:
            raise ValueError(
                f"alpha must be > 0 (the recursion starts from H0 = alpha*I), not {alpha!r}"
            )
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, not {chunk}")
        self.alpha = float(alpha)
        self.chunk = int(chunk)

    @property
    def regularizer(self) -> float:
        return self.alpha

    def _compute(self, work: Problem, coords: Coordinates) -> tuple[Tensor, dict]:
        p, n = coords.size, work.n_samples
        dev = work.device
        hinv = torch.eye(p, dtype=torch.float64, device=dev) / self.alpha
        tally = {"rows": 0, "dropped": 0, "samples": 0}
        for rows in _shared_rows(work, _positive_rows(work, coords, self.progress, tally)):
            for j in range(0, rows.shape[0], self.chunk):
                v = rows[j : j + self.chunk]
                hv = hinv @ v.T  # p × b
                inner = v @ hv
                inner.diagonal().add_(n)
                hinv.addmm_(hv, torch.linalg.solve(inner, hv.T), alpha=-1)
        _reduce_tally(work, tally)
        _warn_rank(tally["rows"], p, self.alpha)
        _warn_indefinite(tally)
        hinv = 0.5 * (hinv + hinv.T)
        info = {
            "method": "recursive",
            "alpha": self.alpha,
            "damping": 0.0,
            "rows": tally["rows"],
            "negative_rows_dropped": tally["dropped"],
            "fallbacks": [],
        }
        return hinv, info


def _shared_rows(work: Problem, local: Iterator[Tensor]) -> Iterator[Tensor]:
    """The row blocks the recursion folds in: ``local``'s, or on a distributed problem every
    rank's next block in rank order, step by step (all ranks fold the same rows in the same
    order, so their inverses are equal; each rank computes only its own rows)."""
    shards = work.shards
    if not shards.active:
        yield from local
        return
    while True:
        with work.together("computing the rows of the OBS recursion"):
            rows = next(local, None)
        blocks = shards.all_gather_rows(rows)
        if all(b is None for b in blocks):
            return
        for b in blocks:
            if b is not None and b.shape[0]:
                yield b


def _reduce_tally(work: Problem, tally: dict[str, int]) -> None:
    """Rows used and dropped, summed over the ranks."""
    if work.distributed:
        t = torch.tensor([tally["rows"], tally["dropped"]], dtype=torch.int64)
        work.all_reduce_(t)
        tally["rows"], tally["dropped"] = int(t[0]), int(t[1])


class DirectInverse(_InverseEstimator):
    """(C + damping·I)⁻¹ for C the dense GGN (``curvature="ggn"``) or the exact Hessian of E
    (``"hessian"``, by ``torch.func``; small nets), by Cholesky.

    The GGN is that of the loss Hessian's non-negative part, as in :class:`RecursiveInverse`: for
    a loss whose per-sample Hessian is indefinite the negative eigen-columns are left out
    (``info["negative_rows_dropped"]``, and a warning), so ``AutoInverse`` gives the same matrix
    whichever path it takes. The exact Hessian is used as it is.

    When C + damping·I is not positive definite, the damping is raised — first by 10⁻⁸ × the mean
    |diagonal|, then ×10 per attempt, up to 10¹¹ × — every attempt is appended to
    ``info["fallbacks"]`` (``{"damping": d, "ok": bool}``) and a warning is logged; if none
    succeeds :class:`~optbrain.errors.SingularCurvatureError` is raised. NaN is never returned.
    """

    curvatures = ("ggn", "hessian")

    def __init__(self, curvature: str = "ggn", damping: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        if curvature not in self.curvatures:
            raise ValueError(f"curvature must be one of {self.curvatures}, not {curvature!r}")
        if not damping >= 0:
            raise ValueError(f"damping must be >= 0, not {damping!r}")
        self.curvature = curvature
        self.damping = float(damping)

    @property
    def regularizer(self) -> float:
        return self.damping

    def matrix(self, problem: Problem, mask: Mask | None = None) -> tuple[Tensor, Coordinates]:
        """The dense curvature itself (no damping) over the alive coordinates, float64."""
        work = in_dtype(problem, self.dtype)
        coords = Coordinates(work.parameters(), mask)
        return self._curvature(work, coords), coords

    def _curvature(self, work: Problem, coords: Coordinates) -> Tensor:
        return self._curvature_rows(work, coords)[0]

    def _curvature_rows(self, work: Problem, coords: Coordinates) -> tuple[Tensor, dict]:
        """(C, {"rows", "dropped"}: GGN rows used and negative loss-Hessian rows left out)."""
        if self.curvature == "hessian":
            return _exact_hessian(work, coords), {"rows": None, "dropped": 0}
        mat = torch.zeros(coords.size, coords.size, dtype=torch.float64, device=work.device)
        tally = {"rows": 0, "dropped": 0, "samples": 0}
        with work.together("accumulating the Gauss-Newton matrix"):
            for rows in _positive_rows(work, coords, self.progress, tally):
                mat.addmm_(rows.T, rows)
        work.all_reduce_(mat)
        _reduce_tally(work, tally)
        _warn_rank(tally["rows"], coords.size, self.damping)
        _warn_indefinite(tally)
        return mat / work.counted(tally["samples"]), tally

    def _compute(self, work: Problem, coords: Coordinates) -> tuple[Tensor, dict]:
        mat, tally = self._curvature_rows(work, coords)
        inv, damping, fallbacks = damped_inverse(mat, self.damping)
        info = {
            "method": f"direct_{self.curvature}",
            "alpha": 0.0,
            "damping": damping,
            "requested_damping": self.damping,
            "rows": tally["rows"],
            "negative_rows_dropped": tally["dropped"],
            "fallbacks": fallbacks,
        }
        return inv, info


def _warn_rank(rows: int, p: int, reg: float) -> None:
    if rows < p:
        log.warning(
            "the Gauss-Newton matrix has rank <= %d < %d coordinates (more weights than "
            "samples x loss-Hessian columns): OBS updates move weights along its null space, "
            "limited only by the %.3g*I added; predictions are unreliable unless that is large "
            "enough (see docs/guide-obs.md)",
            rows,
            p,
            reg,
        )


def damped_inverse(mat: Tensor, damping: float = 0.0) -> tuple[Tensor, float, list[dict]]:
    """(mat + d·I)⁻¹ by Cholesky for the smallest d ≥ ``damping`` of the fallback ladder that makes
    it positive definite; returns (inverse, d, attempts after the first)."""
    if not bool(torch.isfinite(mat).all()):
        raise NonFiniteLossError("the curvature matrix contains NaN or inf")
    mat = 0.5 * (mat + mat.T)
    scale = float(torch.diagonal(mat).abs().mean()) or 1.0
    chol, d, fallbacks = damped_cholesky(
        mat, damping, start=_FALLBACK_START, factor=10.0, steps=_FALLBACK_STEPS
    )
    inv = torch.cholesky_inverse(chol) if chol is not None else None
    if inv is None or not bool(torch.isfinite(inv).all()):
        raise SingularCurvatureError(
            f"the curvature matrix is not positive definite even with damping {d:.3g} "
            f"({_FALLBACK_STEPS} attempts from {damping:.3g}); its diagonal averages {scale:.3g}"
        )
    if fallbacks:
        log.warning(
            "curvature not positive definite with damping %.3g; inverted with damping "
            "%.3g after %d attempt(s)",
            damping,
            d,
            len(fallbacks),
        )
    return 0.5 * (inv + inv.T), d, fallbacks


def _exact_hessian(work: Problem, coords: Coordinates) -> Tensor:
    """∇²E over the alive coordinates (pruned entries held at their value), float64: the
    Hessians of the batches' loss sums, summed (over the ranks too) and divided by N."""
    fn = _Functional(work.prepare())
    base = dict(fn.wanted)
    vec0 = coords.gather(base, dtype=next(iter(base.values())).dtype)
    mat = torch.zeros(coords.size, coords.size, dtype=torch.float64, device=vec0.device)
    seen = 0
    with work.together("the exact Hessian"), eval_mode(work.model):
        for x, y in work.batches():

            def batch_sum(vec: Tensor, x=x, y=y) -> Tensor:
                params = {}
                for n in coords.names:
                    pos, off = coords.positions[n], coords.offsets[n]
                    flat = base[n].reshape(-1).index_put((pos,), vec[off : off + pos.numel()])
                    params[n] = flat.reshape(base[n].shape)
                return work.batch_sum(fn(params, x), y)

            try:
                h = torch.func.hessian(batch_sum)(vec0)
            except (RuntimeError, NotImplementedError) as exc:
                log.info("torch.func.hessian failed (%s); using Hessian-vector products", exc)
                h = torch.autograd.functional.hessian(batch_sum, vec0)
            mat += h.to(torch.float64)
            seen += x.shape[0]
    work.all_reduce_(mat)
    return mat / work.counted(seen)


class AutoInverse(_InverseEstimator):
    """(G + αI)⁻¹ by whichever is cheaper: :class:`DirectInverse` (GGN, damping α) when the data
    give more rows than half the alive coordinates (N·K > p/2, K loss-Hessian columns per
    sample), else :class:`RecursiveInverse`. ``info["method"]`` says which ran."""

    def __init__(self, alpha: float = 1e-6, *, chunk: int = 32, **kwargs):
        super().__init__(**kwargs)
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, not {alpha!r}")
        self.alpha = float(alpha)
        self.chunk = int(chunk)

    @property
    def regularizer(self) -> float:
        return self.alpha

    def _compute(self, work: Problem, coords: Coordinates) -> tuple[Tensor, dict]:
        rows = work.n_samples * _columns_per_sample(work)
        opts = {"dtype": self.dtype, "max_params": self.max_params, "progress": self.progress}
        if rows > coords.size / 2:
            chosen: _InverseEstimator = DirectInverse("ggn", damping=self.alpha, **opts)
        else:
            chosen = RecursiveInverse(self.alpha, chunk=self.chunk, **opts)
        mat, info = chosen._compute(work, coords)
        info = dict(info, auto={"rows": rows, "coordinates": coords.size})
        return mat, info


def _columns_per_sample(problem: Problem) -> int:
    """K: columns of the per-sample loss-Hessian factor (C for MSE, C − 1 for cross-entropy)."""
    x, y = next(problem.batches())
    with torch.no_grad(), eval_mode(problem.model):
        out = problem.model(x[:1])
    cols, _ = losses.hessian_factor(problem, out, y[:1])
    return cols.shape[0]


INVERSES = {"auto": AutoInverse, "recursive": RecursiveInverse, "direct": DirectInverse}
