"""The graph engine: any ``nn.Module`` read as a graph of registry layers and glue functions
(:mod:`.reader`, :mod:`.glue`) and swept backwards for every structured estimator (:mod:`.sweep`).
"""

from .reader import GraphReadError, ModelGraph, read_graph

__all__ = ["GraphReadError", "ModelGraph", "read_graph"]
