"""Estimators with a structured path (the second-order back-propagation of :mod:`.backprop`) and
a generic ``torch.func`` path; ``method`` picks one."""

from __future__ import annotations

import logging

from ..errors import UnsupportedModuleError
from ..paramdict import ParamDict
from ..problem import Problem
from . import backprop
from .base import DiagonalEstimator, in_dtype
from .chain import build_chain, shared_parameters

log = logging.getLogger(__name__)


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
