"""Weight updates applied when entries are deleted."""

from __future__ import annotations

import torch

from .masking import Mask
from .paramdict import ParamDict, named_parameters
from .problem import Problem


class ZeroUpdate:
    """Set deleted weights to 0 in place and leave the others unchanged (OBD, magnitude, ...)."""

    def __call__(self, problem: Problem, old: Mask, new: Mask, saliency: ParamDict) -> None:
        params = named_parameters(problem.model, new.names, trainable_only=False)
        with torch.no_grad():
            for k, p in params.items():
                p.mul_(new[k].to(device=p.device, dtype=p.dtype))

    def __repr__(self) -> str:
        return "ZeroUpdate()"
