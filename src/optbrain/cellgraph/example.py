"""An example input for reading a model's units: the user's, one of a given shape, or a guess.

The unit graph is read by running the traced model on a small batch (two samples), so every
value has a shape. Without ``example`` or ``input_shape`` the input is guessed from the first
layer that reads it: ``(in_features,)`` for a Linear, ``(3, input_size)`` steps for a recurrent
layer (time first when ``batch_first=False``), three token ids for an Embedding, and for a
convolution its channels with the smallest spatial size (up to 64) the whole model runs on. What
the units are does not depend on the size chosen; folding a constant conv channel into the
next layer does, so :func:`optbrain.structure.remove_dead_units` folds those only with a given
shape.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..curvature.graph.reader import ModelGraph
from ..errors import ShapeMismatchError
from ..problem import eval_mode

BATCH = 2
_KNOWN = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.RNNBase, nn.Embedding)
_SEQ = 3
_SPATIAL = range(1, 65)


def make(
    model: nn.Module,
    graph: ModelGraph,
    example: Tensor | None = None,
    input_shape=None,
) -> tuple[Tensor, bool]:
    """(an input batch, whether its shape came from the user)."""
    dtype, device = _dtype_device(model)
    if example is not None:
        if not isinstance(example, Tensor) or example.dim() == 0:
            raise TypeError("example must be a batched input tensor")
        return example[:BATCH], True
    if input_shape is not None:
        gen = torch.Generator().manual_seed(0)
        shape = (BATCH, *tuple(int(s) for s in input_shape))
        return torch.randn(shape, generator=gen, dtype=dtype).to(device), True
    return _guess(model, graph, dtype, device), False


def _dtype_device(model: nn.Module):
    p = next(iter(model.parameters()), None)
    if p is None:
        return torch.get_default_dtype(), torch.device("cpu")
    return (p.dtype if p.is_floating_point() else torch.get_default_dtype()), p.device


def _first_reader(graph: ModelGraph) -> nn.Module | None:
    """The first layer (forward order) that the input reaches through functions only."""
    start = next(n for n in graph.nodes if n.kind == "input").node
    frontier, seen = [start], set()
    reached = set()
    while frontier:
        node = frontier.pop()
        for user in node.users:
            if user.name in seen:
                continue
            seen.add(user.name)
            gn = graph.by_name.get(user.name)
            if gn is None:
                continue
            if gn.kind == "leaf" or _functional(graph, gn) is not None:
                reached.add(user.name)
                if gn.kind == "leaf" and _passes(gn.module):
                    frontier.append(user)
            elif gn.kind == "glue":
                frontier.append(user)
    for gn in graph.nodes:
        if gn.name not in reached:
            continue
        layer = _functional(graph, gn)
        if layer is not None:
            return layer
        if not _passes(gn.module):
            return gn.module
    return None


def _functional(graph: ModelGraph, gn) -> nn.Module | None:
    """For ``F.linear(x, w)`` / ``F.conv*d(x, w)`` on a parameter: a layer of that shape."""
    import torch.nn.functional as F

    if gn.kind != "glue" or gn.node.target not in (F.linear, F.conv1d, F.conv2d, F.conv3d):
        return None
    w = gn.node.args[1] if len(gn.node.args) > 1 else gn.node.kwargs.get("weight")
    src = graph.by_name.get(getattr(w, "name", ""))
    if src is None or src.kind != "param":
        return None
    shape = src.param[1].shape
    if gn.node.target is F.linear:
        return nn.Linear(shape[1], shape[0], bias=False, device="meta")
    conv = {3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}[len(shape)]
    return conv(shape[1], shape[0], 1, bias=False, device="meta")


def _passes(m: nn.Module) -> bool:
    from .layers import kind

    return kind(m) in ("identity", "reshape")


def _guess(model, graph, dtype, device) -> Tensor:
    m = _first_reader(graph)
    if m is None and isinstance(model, _KNOWN):
        m = model  # a bare layer: torch.fx traces its functional call
    candidates = _candidates(m, dtype)
    error = None
    for x in candidates:
        error = _runs(model, x.to(device))
        if error is None:
            return x.to(device)
    if not candidates:
        first = type(m).__name__ if m is not None else "no layer optbrain knows"
        raise ShapeMismatchError(
            f"cannot tell the shape of the model's input (the first layer that reads it is "
            f"{first}); pass input_shape= (one sample's shape) or example= (a batch)"
        )
    shape = tuple(candidates[0].shape[1:]) if len(candidates) == 1 else "any spatial size <= 64"
    raise ShapeMismatchError(
        f"the model does not run on inputs of shape {shape} (guessed from its first layer, "
        f"{type(m).__name__}): {error}; pass input_shape= or example="
    )


def _candidates(m: nn.Module | None, dtype) -> list[Tensor]:
    gen = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(BATCH, *shape, generator=gen, dtype=dtype)

    if isinstance(m, nn.Linear):
        return [randn(m.in_features)]
    if isinstance(m, nn.RNNBase):
        if m.batch_first:
            return [randn(_SEQ, m.input_size)]
        return [torch.randn(_SEQ, BATCH, m.input_size, generator=gen, dtype=dtype)]
    if isinstance(m, nn.Embedding):
        return [torch.zeros(BATCH, _SEQ, dtype=torch.long)]
    if isinstance(m, nn.LayerNorm):
        return [randn(*m.normalized_shape)]
    if isinstance(m, nn.BatchNorm1d):
        return [randn(m.num_features)]
    if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.BatchNorm2d, nn.BatchNorm3d)):
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            c, dims = m.in_channels, m.weight.dim() - 2
        else:
            c, dims = m.num_features, 2 if isinstance(m, nn.BatchNorm2d) else 3
        return [randn(c, *([s] * dims)) for s in _SPATIAL]
    return []


def _runs(model: nn.Module, x: Tensor) -> Exception | None:
    """None if the model runs on ``x``, else the error."""
    try:
        with torch.no_grad(), eval_mode(model):
            model(x)
    except (RuntimeError, ValueError, IndexError, TypeError) as exc:
        return exc
    return None
