"""Estimators with a structured path (the second-order back-propagation over a chain or a graph)
and a generic ``torch.func`` path; ``method`` picks one."""

from __future__ import annotations

import logging

from ..errors import UnsupportedModuleError
from ..paramdict import ParamDict
from ..problem import Problem
from . import backprop
from .base import DiagonalEstimator, in_dtype
from .graph import sweep
from .paths import Path, choose

log = logging.getLogger(__name__)


class StructuredEstimator(DiagonalEstimator):
    """An estimator with a structured path (the second-order back-propagation in ``mode``, over
    an ``nn.Sequential`` chain or any torch.fx-traceable graph of registry layers) and a generic
    ``torch.func`` path for any module; ``method`` picks one, ``"auto"`` the structured path
    whenever it applies (:func:`optbrain.curvature.paths.choose`, which also says why not)."""

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

    def path(self, problem: Problem) -> Path:
        """The engine this estimator takes on ``problem`` and why (see :mod:`.paths`)."""
        if self.method not in ("auto", "backprop"):
            return Path("generic", f"method={self.method!r} asks for it")
        return choose(problem, type(self).__name__, self.mode)

    def diagonal(self, problem: Problem) -> ParamDict:
        work = in_dtype(problem, self.dtype)
        params = problem.parameters()
        name = type(self).__name__
        path = self.path(work)
        if path.engine == "refused":
            raise UnsupportedModuleError(f"{name}: {path.reason}")
        if self.method == "backprop" and path.engine == "generic":
            raise UnsupportedModuleError(
                f"{name}(method='backprop') has no structured path for this model: "
                f"{path.reason}; use method='auto' or the torch.func method"
            )
        wanted = params if work is problem else work.parameters()
        out = None
        if path.engine == "chain":
            out = backprop.run(
                work,
                self.mode,
                estimator=name,
                tick=self.progress,
                chain=path.chain,
                wanted=wanted,
                **self._backprop_options(),
            )
        elif path.engine == "graph":
            try:
                out = sweep.run(
                    work,
                    path.graph,
                    self.mode,
                    estimator=name,
                    wanted=wanted,
                    tick=self.progress,
                    **self._backprop_options(),
                )
            except UnsupportedModuleError as exc:  # found only while running (GraphReadError too)
                if self.method == "backprop":
                    raise
                if getattr(exc, "generic_ok", True) is False:
                    raise UnsupportedModuleError(f"{name}: {exc.reason}") from exc
                path = Path("generic", getattr(exc, "reason", None) or str(exc))
                log.warning("%s falls back to the torch.func path: %s", name, path.reason)
        if out is None:
            if path.engine == "generic" and self.method == "auto":
                log.info("%s takes the torch.func path: %s", name, path.reason)
            out = self._generic(work)
        return self._finish(problem, out, params)
