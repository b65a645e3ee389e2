"""The per-layer registry: the only place in optbrain with layer-specific derivative code.

* :mod:`.base` — the :class:`Rule` interface, :func:`register` and :func:`rule_for`;
* :mod:`.layers` — Linear, Conv1d/2d, pooling, reshape-like layers;
* :mod:`.activations` — element-wise activations (closed forms and forward-mode AD);
* :mod:`.fusion` — opt-in oneDNN kernel fusion for the sweep's forward pass (no math).
"""

from .activations import ElementwiseRule, register_elementwise
from .base import GENERIC_ESTIMATORS, Derivatives, Rule, hooked, register, rule_for, stock_forward
from .layers import AvgPoolRule, ConvRule, LinearRule, MaxPoolRule, ReshapeRule

__all__ = [
    "GENERIC_ESTIMATORS",
    "AvgPoolRule",
    "ConvRule",
    "Derivatives",
    "ElementwiseRule",
    "LinearRule",
    "MaxPoolRule",
    "ReshapeRule",
    "Rule",
    "hooked",
    "register",
    "register_elementwise",
    "rule_for",
    "stock_forward",
]
