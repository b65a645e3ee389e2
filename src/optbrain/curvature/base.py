"""Protocols and the shared base class of curvature estimators.

Every diagonal estimator computes, for the objective E(θ) = (1/N) Σ_n ℓ_n(θ) of a
:class:`~optbrain.problem.Problem`, a ParamDict of the same shapes as the parameters:

==========================  =========================================================
``ExactHessianDiagonal``    diag ∇²E
``GGNDiagonal``             diag (1/N) Σ_n J_nᵀ H_n J_n   (J_n = ∂f(x_n)/∂θ, H_n = ∂²ℓ_n/∂f²)
``EmpiricalFisherDiagonal`` (1/N) Σ_n (∇ℓ_n)²
``MCFisherDiagonal``        unbiased Monte-Carlo estimate of the GGN diagonal
``HutchinsonDiagonal``      unbiased estimate of diag ∇²E from Hessian-vector products
``LeCunDiagonal``           LeCun, Denker & Solla's (1989) recursion, exact only where its docs say
==========================  =========================================================

Curvature is evaluated with the model in eval mode (dropout off, batch-norm running statistics) and
the previous modes are restored afterwards. With a mask attached, derivatives are taken with respect
to the stored (original) weights, so pruned entries get curvature 0.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch

from ..errors import NonFiniteLossError, UnsupportedModuleError
from ..paramdict import ParamDict
from ..problem import Problem
from .chain import build_chain, shared_parameters

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
"""Called as ``progress(done, total)`` after each unit of work (a batch, a probe vector...)."""


@runtime_checkable
class DiagonalCurvature(Protocol):
    def diagonal(self, problem: Problem) -> ParamDict: ...


class DiagonalEstimator:
    """Base class: holds ``dtype`` (accumulation precision) and an optional progress callback.

    ``dtype=None`` accumulates in the parameters' dtype; ``torch.float64`` computes the whole
    estimate in double precision (on a float64 copy of the model's parameters).
    """

    #: estimators that accept any differentiable module (not only registry layers)
    generic: bool = True

    def __init__(self, *, dtype: torch.dtype | None = None, progress: Progress | None = None):
        self.dtype = dtype
        self.progress = progress

    def diagonal(self, problem: Problem) -> ParamDict:  # pragma: no cover - abstract
        raise NotImplementedError

    def _finish(
        self, problem: Problem, out: ParamDict, params: dict[str, torch.Tensor] | None = None
    ) -> ParamDict:
        """Results in ``dtype`` (or each parameter's dtype), on the parameters' devices; refuses
        non-finite values (a NaN or inf loss anywhere in the data). ``params``: the problem's
        ``parameters()`` when the caller has them."""
        if out and not _all_finite(list(out.values())):
            for k, v in out.items():
                if not torch.isfinite(v).all():
                    raise NonFiniteLossError(
                        f"{type(self).__name__}: the curvature of {k} is NaN or infinite (NaN or "
                        "inf loss, inputs or weights in the data)"
                    )
        params = problem.parameters() if params is None else params
        return {
            k: v.to(dtype=self.dtype or params[k].dtype, device=params[k].device)
            for k, v in out.items()
        }

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if k != "progress")
        return f"{type(self).__name__}({args})"


def _all_finite(values: list[torch.Tensor]) -> bool:
    """Whether every entry of every tensor is finite.

    Fast path: a finite sum proves every entry finite (a NaN or inf entry makes the sum NaN or
    inf); only a non-finite sum, which may also be a mere overflow, needs the entry-wise check.
    """
    sums = [v.sum() for v in values]
    if len({s.device for s in sums}) == 1:
        total = float(torch.stack(sums).sum())
    else:
        total = sum(float(s) for s in sums)
    if math.isfinite(total):
        return True
    return all(bool(torch.isfinite(v).all()) for v in values)


def seeded_generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded with ``seed`` (fresh entropy when None); global RNG untouched."""
    gen = torch.Generator()
    if seed is not None:
        gen.manual_seed(seed)
    else:
        gen.seed()
    return gen


class StructuredEstimator(DiagonalEstimator):
    """An estimator with a structured path (``backprop.run`` in ``mode``) for chains of registry
    layers and a generic ``torch.func`` path for any module; ``method`` picks one, ``"auto"`` the
    structured path whenever it applies (:func:`structured_chain`)."""

    mode: str = ""
    methods: tuple[str, ...] = ("auto", "backprop", "func")

    def __init__(self, method: str = "auto", **kwargs):
        super().__init__(**kwargs)
        if method not in self.methods:
            raise ValueError(f"method must be one of {self.methods}, not {method!r}")
        self.method = method

    def _backprop_options(self) -> dict:
        return {}

    def _generic(self, work: Problem) -> ParamDict:  # pragma: no cover - abstract
        raise NotImplementedError

    def diagonal(self, problem: Problem) -> ParamDict:
        from . import backprop

        work = in_dtype(problem, self.dtype)
        params = problem.parameters()
        name = type(self).__name__
        chain = None
        if self.method == "backprop":
            chain = build_chain(work.model, name)
            shared = shared_parameters(chain)
            if shared:
                # the sweep squares each use's per-sample gradient separately: the cross terms
                # between the uses of a tied parameter would be missing
                tied = sorted(
                    n for lk in chain for n, p, _ in lk.params.values() if id(p) in shared
                )
                raise UnsupportedModuleError(
                    f"{name}(method='backprop') cannot take tied parameters "
                    f"({', '.join(dict.fromkeys(tied))}, used by several layers); use "
                    "method='auto' or the torch.func method"
                )
        elif self.method == "auto":
            chain = structured_chain(work, name)
        if chain is not None:
            opts = self._backprop_options()
            wanted = params if work is problem else None
            out = backprop.run(
                work,
                self.mode,
                estimator=name,
                tick=self.progress,
                chain=chain,
                wanted=wanted,
                **opts,
            )
        else:
            out = self._generic(work)
        return self._finish(problem, out, params)


class _CastData:
    """Re-iterable view of a problem's batches with floating tensors cast to ``dtype``."""

    def __init__(self, problem: Problem, dtype: torch.dtype):
        self.problem, self.dtype = problem, dtype

    def __iter__(self):
        for x, y in self.problem.batches():
            yield (
                x.to(self.dtype) if x.is_floating_point() else x,
                y.to(self.dtype) if y.is_floating_point() else y,
            )


def in_dtype(problem: Problem, dtype: torch.dtype | None) -> Problem:
    """The problem itself, or one on a copy of the model cast to ``dtype`` (results keep keys)."""
    if dtype is None:
        return problem
    params = list(problem.model.parameters())
    if not params or all(p.dtype == dtype for p in params):
        return problem
    model = copy.deepcopy(problem.model).to(dtype)
    cast = Problem(model, problem.loss_fn, _CastData(problem, dtype), problem.params)
    cast._n, cast._reduction = problem.n_samples, problem.reduction
    return cast


def structured_chain(problem: Problem, estimator: str) -> list | None:
    """The model's chain of registry layers when the structured back-propagation handles it
    exactly (every layer registered, no parameter used twice); None when the generic
    ``torch.func`` path is needed."""
    try:
        chain = build_chain(problem.model, estimator)
    except UnsupportedModuleError as exc:
        log.debug("%s falls back to torch.func: %s", estimator, exc)
        return None
    return None if shared_parameters(chain) else chain
