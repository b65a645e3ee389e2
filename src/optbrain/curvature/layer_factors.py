"""Per-layer factors of the Gauss–Newton rows: layer inputs a and output-side columns g.

For a Linear or convolution layer with weight W (out × L) and bias b, the GGN row of sample n
and loss-Hessian column k (:func:`~optbrain.curvature.losses.hessian_factor`, the rows of
:mod:`optbrain.curvature.inverse`) restricted to the layer is

    v_nk = Σ_t g_nkt ⊗ ã_nt,      ã = (a, 1) with the bias, g_nkt = ∂⟨s_nk, f(x_n)⟩/∂y_t,

over the positions t at which the layer is applied (one for a Linear layer on vectors; the
output pixels of a convolution, with a the input patch; the leading positions of a Linear layer
on sequences), y the layer's output. :func:`layer_factors` yields ã and g for chunks of samples
in one pass over the data — a forward pass with hooks on the layers, then one backward pass per
column — from which the block-diagonal GGN (:mod:`.blocks`) and the Kronecker factors
(:mod:`.kfac`) are accumulated. The GGN is that of the loss Hessian's non-negative part, as for
the dense inverses: negative columns are left out.

The row-major *extended* layout of a layer is E = [W | b] (out × L'), L' = L + 1 with a bias
among the coordinates: :func:`layer_slots` maps it to the rows of a
:class:`~optbrain.curvature.inverse.Coordinates`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import NonFiniteLossError, UnsupportedModuleError
from ..paramdict import clean_name
from ..problem import Problem, eval_mode
from . import losses
from .backprop import _chunks
from .inverse import Coordinates
from .rules import ConvRule

log = logging.getLogger(__name__)

LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)
CHUNK = 1024
"""Samples per forward/backward pass (larger batches are split)."""
_CONV = ConvRule()


@dataclass
class LayerSlot:
    """One layer of the problem: its module path, module, weight and bias names (bias None when
    it is not a coordinate), and ``rows``: out × L' coordinate rows of E = [W | b] (−1 pruned)."""

    path: str
    module: nn.Module
    weight: str
    bias: str | None
    rows: Tensor

    @property
    def shape(self) -> tuple[int, int]:
        """(out, L') of the extended layout."""
        return tuple(self.rows.shape)  # type: ignore[return-value]

    @property
    def fan_in(self) -> int:
        """L: the weight's columns (without the bias)."""
        return self.module.weight[0].numel()


def layer_slots(model: nn.Module, coords: Coordinates) -> list[LayerSlot]:
    """The Linear/Conv1d/Conv2d layers whose weights are coordinates, in module order; every
    coordinate must be such a weight or its bias (else :class:`UnsupportedModuleError`)."""
    slots: list[LayerSlot] = []
    covered: set[str] = set()
    for path, m in model.named_modules():
        if not isinstance(m, LAYERS):
            continue
        weight = clean_name(f"{path}.weight" if path else "weight")
        if weight not in coords.rows:
            continue
        if isinstance(m, (nn.Conv1d, nn.Conv2d)) and m.groups != 1:
            raise UnsupportedModuleError(
                f"layer {path!r}: block-diagonal and K-FAC inverses need groups=1 convolutions"
            )
        bias = clean_name(f"{path}.bias" if path else "bias")
        bias = bias if bias in coords.rows else None
        out = m.weight.shape[0]
        rows = coords.rows[weight].reshape(out, -1)
        if bias is not None:
            rows = torch.cat([rows, coords.rows[bias].reshape(out, 1)], 1)
            covered.add(bias)
        covered.add(weight)
        slots.append(LayerSlot(path, m, weight, bias, rows.cpu()))
    other = [n for n in coords.names if n not in covered]
    if other:
        raise UnsupportedModuleError(
            f"block-diagonal and K-FAC inverses cover the weights and biases of Linear, Conv1d "
            f"and Conv2d layers; the problem also holds {other}: restrict the problem's params "
            "(Problem(params=...)) to those layers"
        )
    if not slots:
        raise UnsupportedModuleError("the problem has no Linear/Conv1d/Conv2d weight")
    return slots


def _inputs(slot: LayerSlot, x: Tensor) -> Tensor:
    """ã: N × T × L' (layer inputs or conv patches, with a column of ones for the bias)."""
    m = slot.module
    if isinstance(m, nn.Linear):
        a = x.reshape(x.shape[0], -1, x.shape[-1])
    else:
        if x.dim() == m.weight.dim() - 1:
            raise UnsupportedModuleError(f"layer {slot.path!r}: unbatched convolution inputs")
        if m.padding_mode != "zeros":
            raise UnsupportedModuleError(f"layer {slot.path!r}: padding_mode {m.padding_mode!r}")
        a = _CONV._unfold(m, x)[:, 0].transpose(1, 2)  # N × P × L
    if slot.bias is not None:
        a = torch.cat([a, a.new_ones(a.shape[:2] + (1,))], 2)
    return a


def _outputs(slot: LayerSlot, g: Tensor) -> Tensor:
    """Output-side columns as K × N × T × out."""
    if isinstance(slot.module, nn.Linear):
        return g.reshape(g.shape[0], g.shape[1], -1, g.shape[-1])
    return g.reshape(g.shape[0], g.shape[1], g.shape[2], -1).transpose(2, 3)


class _Capture:
    """Forward hooks keeping each slot's input (detached) and output (in the graph)."""

    def __init__(self, slots: list[LayerSlot]):
        self.slots = slots
        self.inputs: dict[str, Tensor] = {}
        self.outputs: dict[str, Tensor] = {}
        self.handles: list = []

    def __enter__(self) -> _Capture:
        for s in self.slots:

            def hook(module, args, out, path=s.path):
                if path in self.inputs:
                    raise UnsupportedModuleError(
                        f"layer {path!r} is called more than once per forward pass (shared "
                        "weights): its GGN rows do not factor per call"
                    )
                self.inputs[path] = args[0].detach()
                self.outputs[path] = out

            self.handles.append(s.module.register_forward_hook(hook))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()


def layer_factors(
    problem: Problem, slots: list[LayerSlot], tally: dict[str, int]
) -> Iterator[dict[str, tuple[Tensor, Tensor]]]:
    """For chunks of samples: slot path → (ã: N × T × L', g: K × N × T × out), float64.

    One pass over the data; ``tally`` counts "samples", "rows" (GGN rows kept) and "dropped"
    (negative loss-Hessian columns left out)."""
    problem.prepare()
    with eval_mode(problem.model):
        for x, y in _chunks(problem, CHUNK):
            yield _one_chunk(problem, slots, x, y, tally)
            tally["samples"] += x.shape[0]


def _one_chunk(problem, slots, x, y, tally) -> dict[str, tuple[Tensor, Tensor]]:
    cap = _Capture(slots)
    with cap, torch.enable_grad():
        out = problem.model(x)
    if not bool(torch.isfinite(out).all()):
        raise NonFiniteLossError("the model output contains NaN or inf")
    missing = [s.path for s in slots if s.path not in cap.outputs]
    if missing:
        raise UnsupportedModuleError(f"layer(s) {missing} are not called by the forward pass")
    cols, sign = losses.hessian_factor(problem, out.detach(), y)
    if sign is not None:  # the GGN of the loss Hessian's non-negative part
        keep = (sign > 0).to(cols.dtype)
        tally["dropped"] += int((sign < 0).sum())
        cols = cols * keep.reshape(keep.shape + (1,) * (cols.dim() - 2))
    k = cols.shape[0]
    tally["rows"] += k * x.shape[0] - (0 if sign is None else int((sign < 0).sum()))
    outs = [cap.outputs[s.path] for s in slots]
    grads: list[list[Tensor]] = [[] for _ in slots]
    for j in range(k):
        gs = torch.autograd.grad(out, outs, cols[j], retain_graph=j < k - 1)
        for acc, gj in zip(grads, gs):
            acc.append(gj.detach())
    result = {}
    for s, gl in zip(slots, grads):
        a = _inputs(s, cap.inputs[s.path]).to(torch.float64)
        g = _outputs(s, torch.stack(gl)).to(torch.float64)
        result[s.path] = (a, g)
    return result
