"""Per-parameter weight decay of the OBD-type saliencies: one number for every parameter, or a
mapping name → λ (names not given: 0)."""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from ..paramdict import named_parameters


def decay_of(weight_decay: float | Mapping[str, float], name: str) -> float:
    """λ of parameter ``name``."""
    if isinstance(weight_decay, Mapping):
        return float(weight_decay.get(name, 0.0))
    return float(weight_decay)


def check_decay_names(weight_decay: float | Mapping[str, float], model: nn.Module) -> None:
    """KeyError naming the mapping's names that are not parameters of ``model``."""
    if isinstance(weight_decay, Mapping):
        known = set(named_parameters(model, trainable_only=False))
        unknown = [k for k in weight_decay if k not in known]
        if unknown:
            raise KeyError(f"weight_decay names unknown parameter(s) {unknown}")
