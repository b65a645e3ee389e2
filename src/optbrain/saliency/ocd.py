"""Optimal Cell Damage: saliencies of whole cells (input variables, hidden units, conv channels).

A *cell* (:mod:`optbrain.cells`) is removed by zeroing its **fan-out** weights s (the weights
leaving it): the network then computes exactly what it computes when the cell is gone. Two
estimates of the resulting objective increase are offered:

``method="sum"`` (Cibas, Fogelman Soulié, Gallinari & Raudys 1994/96)
    S_c = Σ_{k ∈ fan-out(c)} ½ h_kk w_k², the sum of the OBD saliencies of the fan-out weights,
    with h from any diagonal curvature estimator (default: the exact GGN diagonal).

``method="gate"`` (the OBD saliency of the cell, estimated jointly)
    Multiply the cell's output by a gate g; g = 1 is the trained network, g = 0 removes the cell.
    Since the gate scales the fan-out weights, E(g) = E(w + (g − 1)s) and
    ∂²E/∂g² = sᵀ H s. OBD's recipe (drop the gradient term, keep the quadratic one, δg = −1)
    gives S_c = ½ sᵀ H s. ``curvature="ggn"`` (the default) uses the Gauss–Newton matrix G
    (sᵀGs = (1/N) Σ_n (J_n s)ᵀ H_n (J_n s) ≥ 0 for convex losses, one forward-mode product per cell
    and sample); ``"hessian"`` uses the exact Hessian of E (the second derivative of E(g),
    by reverse-over-reverse differentiation; may be negative away from a minimum).

The sum is the gate estimate with H replaced by its diagonal: sᵀHs = Σ_k h_kk s_k² +
Σ_{j≠k} h_jk s_j s_k. The cross terms between the weights of one cell are what the sum ignores;
they vanish when the block of H on the cell is diagonal (an input of a linear model under MSE, for
example) and can have either sign otherwise (units whose fan-out weights work together or against
each other).

Both return a :class:`CellSaliencies`: the cells, a float64 tensor of their saliencies, and
:meth:`CellSaliencies.to_params` to broadcast them onto the fan-out weights as a ParamDict.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import jacrev, jvp, vmap

from ..cells import Cell, cell_sums, cells
from ..curvature import ExactHessianDiagonal, GGNDiagonal
from ..curvature.base import DiagonalCurvature, Progress, in_dtype
from ..curvature.generic import _Functional
from ..curvature.losses import hessian_factor
from ..errors import NonFiniteLossError
from ..paramdict import ParamDict
from ..problem import Problem, eval_mode
from .obd import OBD

log = logging.getLogger(__name__)

KINDS = ("input", "unit", "channel")
METHODS = ("sum", "gate")
_BUDGET = 2**22  # elements per stacked tangent / per-cell output tensor


@dataclass(frozen=True)
class CellSaliencies:
    """Saliencies of cells: ``values[i]`` is the estimated increase of E if ``cells[i]`` is removed.

    ``values`` is a float64 CPU tensor. A cell whose fan-out weights are all zero (already
    removed) has saliency 0.
    """

    cells: tuple[Cell, ...]
    values: Tensor
    method: str

    def __len__(self) -> int:
        return len(self.cells)

    def select(self, kind: str | None = None, layer: str | None = None) -> CellSaliencies:
        """The cells of one kind and/or one layer."""
        keep = [
            i
            for i, c in enumerate(self.cells)
            if (kind is None or c.kind == kind) and (layer is None or c.layer == layer)
        ]
        return CellSaliencies(
            tuple(self.cells[i] for i in keep), self.values[keep].clone(), self.method
        )

    def to_params(self, like: Mapping[str, Tensor], fill: float = float("inf")) -> ParamDict:
        """Each cell's saliency written onto its fan-out weights, for the names of ``like``.

        Every weight leaves at most one cell, so this is well defined; entries that leave none of
        these cells (biases, weights of cells of other kinds) get ``fill`` (+inf: never a
        candidate for removal when a weight selector reads the result).
        """
        out = {
            k: torch.full(v.shape, fill, dtype=torch.float64, device=v.device)
            for k, v in like.items()
        }
        for cell, value in zip(self.cells, self.values.tolist()):
            for slab in cell.fan_out:
                if slab.name in out:
                    out[slab.name][slab.index()] = value
        return out

    def from_params(self, scores: Mapping[str, Tensor]) -> CellSaliencies:
        """Inverse of :meth:`to_params`: each cell's value read back from its fan-out entries."""
        values = []
        for cell in self.cells:
            parts = [
                scores[s.name][s.index()].reshape(-1) for s in cell.fan_out if s.name in scores
            ]
            if not parts:
                raise KeyError(f"no scores for the fan-out weights of {describe(cell)}")
            values.append(float(torch.cat(parts).to(torch.float64).min()))
        return CellSaliencies(self.cells, torch.tensor(values, dtype=torch.float64), self.method)


def problem_example(problem: Problem) -> torch.Tensor | None:
    """A small input batch of the problem (its first two samples): the shape the model's cells
    are read at."""
    for x, _ in problem.batches():
        return x[:2] if isinstance(x, torch.Tensor) else None
    return None


def describe(cell: Cell) -> str:
    """``"input 3 of layer '0'"``: a cell as error messages and logs name it."""
    return f"{cell.kind} {cell.index} of layer {cell.layer!r}"


class OCD:
    """Cell saliencies (see the module docstring): ``OCD(...)(problem) -> CellSaliencies``.

    ``curvature``: for ``method="sum"`` any diagonal estimator (or ``"ggn"`` / ``"hessian"``;
    default exact GGN diagonal); for ``method="gate"`` ``"ggn"`` (default) or ``"hessian"``, or a
    ``GGNDiagonal`` / ``ExactHessianDiagonal`` instance meaning the same matrix. ``kinds``: which
    cells (``"input"``, ``"unit"``, ``"channel"``). ``dtype``: precision of the gate computation
    (and of the estimator built from a string); ``progress(done, total)`` is called per chunk of
    cells by the gate computation.
    """

    def __init__(
        self,
        curvature: DiagonalCurvature | str | None = None,
        kinds: Sequence[str] = KINDS,
        method: str = "sum",
        *,
        dtype: torch.dtype | None = None,
        progress: Progress | None = None,
    ):
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, not {method!r}")
        kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
        bad = [k for k in kinds if k not in KINDS]
        if bad or not kinds:
            raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {kinds!r}")
        self.method = method
        self.kinds = kinds
        self.dtype = dtype
        self.progress = progress
        if method == "sum":
            self.curvature = _diagonal_estimator(curvature, dtype)
            self.matrix = None
        else:
            self.curvature = curvature
            self.matrix = _gate_matrix(curvature)

    def cells(self, model: torch.nn.Module, example: torch.Tensor | None = None) -> list[Cell]:
        """The cells of ``model`` this saliency scores (``example``: an input batch, where the
        model's input shape cannot be guessed from its first layer)."""
        return cells(model, self.kinds, example=example)

    def __call__(self, problem: Problem, cell_list: Sequence[Cell] | None = None) -> CellSaliencies:
        if cell_list is None:
            cell_list = self.cells(problem.model, problem_example(problem))
        found = list(cell_list)
        if not found:
            raise ValueError(f"the model has no cells of kinds {self.kinds}")
        names = list(dict.fromkeys(s.name for c in found for s in c.fan_out))
        sub = problem.restrict(names)
        if self.method == "sum":
            obd = OBD(self.curvature)(sub)
            values = cell_sums(obd, found, "fan_out")
        else:
            dtype = self.dtype or getattr(self.curvature, "dtype", None)
            values = 0.5 * gate_curvature(sub, found, self.matrix, dtype, self.progress)
        values = values.detach().to("cpu", torch.float64)
        return CellSaliencies(tuple(found), values, self.method)

    def __repr__(self) -> str:
        curv = self.matrix if self.method == "gate" else self.curvature
        return f"OCD(curvature={curv!r}, kinds={self.kinds!r}, method={self.method!r})"


def _diagonal_estimator(curvature, dtype) -> DiagonalCurvature:
    if curvature is None or curvature == "ggn":
        return GGNDiagonal(dtype=dtype)
    if curvature == "hessian":
        return ExactHessianDiagonal(dtype=dtype)
    if isinstance(curvature, str) or not hasattr(curvature, "diagonal"):
        raise TypeError(
            "OCD(method='sum') needs a diagonal curvature estimator (an object with "
            f".diagonal(problem)) or 'ggn' / 'hessian', not {curvature!r}"
        )
    return curvature


def _gate_matrix(curvature) -> str:
    if curvature is None or curvature == "ggn" or type(curvature) is GGNDiagonal:
        return "ggn"
    if curvature == "hessian" or type(curvature) is ExactHessianDiagonal:
        return "hessian"
    raise ValueError(
        "OCD(method='gate') computes sᵀGs (curvature='ggn' or a GGNDiagonal) or sᵀHs "
        f"(curvature='hessian' or an ExactHessianDiagonal); it cannot use {curvature!r}"
    )


# --------------------------------------------------------------------------- gate curvature
def fan_out_tangents(cell_list: Sequence[Cell], wanted: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """For each cell the vector s of its fan-out weights (zero elsewhere): name -> K × shape."""
    out = {k: torch.zeros((len(cell_list), *v.shape), dtype=v.dtype) for k, v in wanted.items()}
    for i, cell in enumerate(cell_list):
        for slab in cell.fan_out:
            idx = slab.index()
            out[slab.name][i][idx] = wanted[slab.name][idx].detach().cpu()
    return out


def gate_curvature(
    problem: Problem,
    cell_list: Sequence[Cell],
    matrix: str = "ggn",
    dtype: torch.dtype | None = None,
    progress: Progress | None = None,
) -> Tensor:
    """∂²E/∂g_c² = s_cᵀ M s_c for every cell c (s_c: its fan-out weights; M = G or H of E).

    ``problem.params`` must cover the fan-out weights of the cells. Returns a float64 tensor.
    """
    if matrix not in ("ggn", "hessian"):
        raise ValueError(f"matrix must be 'ggn' or 'hessian', not {matrix!r}")
    try:
        result = _gate_forms(in_dtype(problem, dtype), cell_list, matrix, progress)
    except NotImplementedError as exc:
        if dtype == torch.float64:
            raise
        # e.g. oneDNN's float32 LSTM kernel has no forward-mode derivative; float64 runs
        # PyTorch's own kernel
        log.info("gate curvature in float64: %s", str(exc).splitlines()[0])
        result = _gate_forms(in_dtype(problem, torch.float64), cell_list, matrix, progress)
    if not torch.isfinite(result).all():
        raise NonFiniteLossError("a cell's gate curvature is NaN or infinite (NaN or inf loss)")
    return result


def _gate_forms(work: Problem, cell_list, matrix: str, progress) -> Tensor:
    fn = _Functional(work.prepare())
    size = sum(v.numel() for v in fn.wanted.values())
    per_chunk = max(1, _BUDGET // max(1, size))
    total = len(cell_list)
    result = torch.zeros(total, dtype=torch.float64)
    with eval_mode(work.model):
        for start in range(0, total, per_chunk):
            chunk = cell_list[start : start + per_chunk]
            dev = work.device
            tangents = {k: t.to(dev) for k, t in fan_out_tangents(chunk, fn.wanted).items()}
            if matrix == "ggn":
                q = _ggn_forms(work, fn, tangents)
            else:
                q = _hessian_forms(work, fn, tangents)
            result[start : start + len(chunk)] = q.detach().to("cpu", torch.float64)
            if progress is not None:
                progress(start + len(chunk), total)
    return result


def _ggn_forms(problem: Problem, fn: _Functional, tangents: dict[str, Tensor]) -> Tensor:
    """(1/N) Σ_n Σ_k σ_kn (S_knᵀ J_n s)² for each stacked tangent s (H_n = Σ_k σ S Sᵀ)."""
    k_cells = next(iter(tangents.values())).shape[0]
    acc = torch.zeros(k_cells, dtype=torch.float64, device=problem.device)
    seen = 0
    with problem.together("OCD's gate curvature"):
        seen = _ggn_pass(problem, fn, tangents, acc)
    problem.all_reduce_(acc)
    return acc / problem.counted(seen)


def _ggn_pass(problem: Problem, fn: _Functional, tangents: dict[str, Tensor], acc: Tensor) -> int:
    """This rank's Σ_n Σ_k σ (S_knᵀ J_n s)² into ``acc``; returns the samples read."""
    seen = 0
    for x, y in problem.batches():
        seen += x.shape[0]
        with torch.no_grad():
            out = fn(fn.wanted, x)
        if not torch.isfinite(out).all():
            raise NonFiniteLossError("the model output contains NaN or inf")
        cols, sign = hessian_factor(problem, out, y)  # F × B × out

        def push(t: dict[str, Tensor], x=x) -> Tensor:
            return jvp(lambda p: fn(p, x), (fn.wanted,), (t,))[1]

        u = _map(push, tangents)  # K × B × out
        proj = torch.einsum("kbo,fbo->kfb", u.flatten(2), cols.flatten(2).to(u))
        sq = proj.square()
        if sign is not None:
            sq = sq * sign.to(sq)[None]
        acc += sq.sum((1, 2)).to(torch.float64)
    return seen


def _hessian_forms(problem: Problem, fn: _Functional, tangents: dict[str, Tensor]) -> Tensor:
    """φ''(0) for φ(t) = E(w + t s), for each stacked tangent s: sᵀ ∇²E s (exact)."""
    k_cells = next(iter(tangents.values())).shape[0]
    acc = torch.zeros(k_cells, dtype=torch.float64, device=problem.device)
    w0 = next(iter(fn.wanted.values()))
    seen = 0
    with problem.together("OCD's gate curvature"):
        for x, y in problem.batches():

            def second(t: dict[str, Tensor], x=x, y=y) -> Tensor:
                def phi(a: Tensor) -> Tensor:
                    moved = {k: w + a * t[k] for k, w in fn.wanted.items()}
                    return problem.batch_sum(fn(moved, x), y)

                return jacrev(jacrev(phi))(torch.zeros((), dtype=w0.dtype, device=w0.device))

            acc += _map(second, tangents).to(torch.float64)
            seen += x.shape[0]
    problem.all_reduce_(acc)
    return acc / problem.counted(seen)


def _map(one, tangents: dict[str, Tensor]) -> Tensor:
    """``one`` over the stacked tangents: vmapped, or looped for layers without a batching rule."""
    try:
        return vmap(one)(tangents)
    except (RuntimeError, NotImplementedError) as exc:
        log.info("vmap over cells failed (%s); looping over cells instead", exc)
    k = next(iter(tangents.values())).shape[0]
    return torch.stack([one({n: t[i] for n, t in tangents.items()}) for i in range(k)])
