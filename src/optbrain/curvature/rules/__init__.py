"""The per-layer registry: the only place in optbrain with layer-specific derivative code.

* :mod:`.base` — the :class:`Rule` interface, :func:`register` and :func:`rule_for`;
* :mod:`.layers` — Linear, Conv1d/2d, pooling, reshape-like layers;
* :mod:`.activations` — element-wise activations (closed forms and forward-mode AD);
* :mod:`.embedding`, :mod:`.norm` — Embedding, LayerNorm, BatchNorm (eval);
* :mod:`.attention` — multi-head attention, read by the graph engine as its decomposition;
* :mod:`.recurrent` — RNN, GRU, LSTM through time (:mod:`.recurrent_backward`);
* :mod:`.fusion` — opt-in oneDNN kernel fusion for the sweep's forward pass (no math).
"""

from .activations import ElementwiseRule, register_elementwise
from .attention import AttentionRule
from .base import (
    GENERIC_ESTIMATORS,
    Derivatives,
    Rule,
    hooked,
    register,
    registered_rule,
    rule_for,
    stock_forward,
)
from .embedding import EmbeddingRule
from .layers import AvgPoolRule, ConvRule, LinearRule, MaxPoolRule, ReshapeRule
from .norm import BatchNormRule, LayerNormRule
from .recurrent import GRURule, LSTMRule, RecurrentRule, RNNRule

__all__ = [
    "GENERIC_ESTIMATORS",
    "AttentionRule",
    "AvgPoolRule",
    "BatchNormRule",
    "EmbeddingRule",
    "LayerNormRule",
    "ConvRule",
    "Derivatives",
    "ElementwiseRule",
    "GRURule",
    "LSTMRule",
    "RNNRule",
    "RecurrentRule",
    "LinearRule",
    "MaxPoolRule",
    "ReshapeRule",
    "Rule",
    "hooked",
    "register",
    "register_elementwise",
    "registered_rule",
    "rule_for",
    "stock_forward",
]
