"""Layer-wise calibration Hessians H = 2XXᵀ/n of Linear / Conv1d / Conv2d inputs (OBC, SparseGPT).

For a layer computing ``y = W x (+ b)``, the squared reconstruction error of a changed weight
matrix Ŵ on calibration inputs, averaged over the n input rows, is

    (1/n) ‖(W − Ŵ) X‖²_F  =  Σ_rows ½ (w − ŵ)ᵀ H (w − ŵ),     H = (2/n) X Xᵀ,

so each output row is an independent quadratic with the *same* Hessian H (PAPERS.md §11.1). The
rows of X are the layer's inputs: for ``Linear`` one row per sample (and per position of any extra
leading dimensions), for a convolution one row per sample and output position, the unfolded input
patch (honouring stride, padding, dilation; ``groups > 1`` gives one H per group, over that group's
``C_in/groups · prod(kernel)`` inputs; a ``padding_mode`` other than zeros pads the input as the
layer does). The bias is not part of H (it does not multiply an input).
Hugging Face ``transformers``' ``Conv1D`` (GPT-2's projections: ``y = x W + b`` with ``W`` stored
as in × out, transposed against ``nn.Linear``) is a Linear layer here: its weight matrix is
``Wᵀ`` (:meth:`LayerHessian.weight_matrix` and :meth:`LayerHessian.weight_from_matrix` convert).

H is accumulated through forward hooks, with the model in eval mode and without autograd; hooks
are removed afterwards, also on error. Each batch's rows are multiplied in the inputs' own
precision (float32 for a float32 model: the GEMM that dominates the cost runs at float32 speed)
accumulated into a buffer of that precision (the GEMM adds into it: no extra pass), which is
flushed into a float64 sum every :data:`CHUNK_ROWS` rows; H = 2·sum/n is formed once at the end.
A non-finite input shows up as a non-finite diagonal entry of the buffer (x² is inf or NaN), so
the inputs need no separate scan.

*Dead inputs* (an input that is zero on every calibration row, so ``H_ii = 0``) are handled as OBC
does: ``dead`` marks them, and the solvers (:mod:`optbrain.layerwise`) set their diagonal entry
to 1 so H stays invertible and set the weights on those inputs to zero, which leaves every
calibration output unchanged. A layer whose calibration inputs are all zero (or that no input
reached) raises :class:`~optbrain.errors.CalibrationError`.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..distributed import SINGLE, Shards
from ..errors import CalibrationError, UnsupportedModuleError
from ..problem import Problem, eval_mode
from .rules import ConvRule

log = logging.getLogger(__name__)

LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d)

#: rows per Gram product: each chunk's XᵀX is taken in the inputs' precision, the sum in float64
CHUNK_ROWS = 8192

_CONV = ConvRule()


def is_transposed_linear(module: nn.Module) -> bool:
    """True for Hugging Face ``transformers``' ``Conv1D`` (a Linear layer whose weight is stored
    in × out). Detected without importing ``transformers``: a model holding one has imported it."""
    hf = sys.modules.get("transformers.pytorch_utils")
    cls = getattr(hf, "Conv1D", None) if hf is not None else None
    return cls is not None and isinstance(module, cls)


def is_layer(module: nn.Module) -> bool:
    """A Linear, Conv1d, Conv2d or ``transformers`` Conv1D module."""
    return isinstance(module, LAYER_TYPES) or is_transposed_linear(module)


def layer_columns(module: nn.Module) -> int:
    """Inputs per output unit k: the columns of the layer's weight matrix."""
    w = module.weight
    return w.shape[0] if is_transposed_linear(module) else w[0].numel()


def weight_matrix(module: nn.Module, weight: Tensor) -> Tensor:
    """``weight`` (or any tensor of its shape) of layer ``module`` as ``groups × rows × k``:
    convolution groups first, ``transformers`` Conv1D transposed (a view where possible)."""
    if is_transposed_linear(module):
        return weight.t().unsqueeze(0)
    groups = module.groups if isinstance(module, (nn.Conv1d, nn.Conv2d)) else 1
    return weight.reshape(groups, weight.shape[0] // groups, -1)


def weight_from_matrix(module: nn.Module, matrix: Tensor) -> Tensor:
    """Inverse of :func:`weight_matrix`: ``groups × rows × k`` back to the weight's shape."""
    shape = module.weight.shape
    if is_transposed_linear(module):
        return matrix.reshape(shape[1], shape[0]).t()
    return matrix.reshape(shape)


@dataclass
class LayerHessian:
    """Calibration Hessian of one layer.

    ``H`` has shape ``groups × k × k`` (float64), ``k`` = inputs per output unit
    (``in_features`` for Linear, ``C_in/groups · prod(kernel_size)`` for convolutions, in the
    order of ``weight.reshape(C_out, -1)``); ``n`` is the number of input rows averaged;
    ``dead`` (``groups × k`` bool) marks inputs that were zero on every row; ``transposed`` is
    True for a ``transformers`` Conv1D (weight stored in × out).
    """

    layer: str
    module: nn.Module
    weight: str
    H: Tensor
    n: int
    dead: Tensor
    transposed: bool = False

    @property
    def groups(self) -> int:
        return self.H.shape[0]

    def weight_matrix(self, weight: Tensor) -> Tensor:
        """The layer's weight (or any tensor of its shape) as ``groups × rows × k`` (a view
        where possible)."""
        if self.transposed:
            return weight.t().unsqueeze(0)
        out = weight.shape[0]
        return weight.reshape(self.groups, out // self.groups, -1)

    def weight_from_matrix(self, matrix: Tensor) -> Tensor:
        """Inverse of :meth:`weight_matrix`: ``groups × rows × k`` back to the weight's shape."""
        return weight_from_matrix(self.module, matrix)


def layer_rows(module: nn.Module, x: Tensor) -> Tensor:
    """The input rows of ``module`` for input ``x``: ``groups × rows × k``."""
    if isinstance(module, nn.Linear) or is_transposed_linear(module):
        return x.reshape(1, -1, x.shape[-1])
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        if x.dim() == module.weight.dim() - 1:  # unbatched input
            x = x.unsqueeze(0)
        if module.padding_mode != "zeros":  # pad as the layer does, then unfold unpadded
            x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
            module = _Unpadded(module)
        patches = _CONV._unfold(module, x)  # N × G × k × P
        g, k = patches.shape[1], patches.shape[2]
        return patches.permute(1, 0, 3, 2).reshape(g, -1, k)
    raise UnsupportedModuleError(
        f"layer-wise Hessians support {', '.join(c.__name__ for c in LAYER_TYPES)} and "
        f"transformers' Conv1D, not {type(module).__name__}"
    )


class _Unpadded:
    """The geometry of a convolution without its padding (for inputs padded beforehand)."""

    padding_mode = "zeros"

    def __init__(self, conv: nn.Module):
        self.kernel_size, self.stride, self.dilation = conv.kernel_size, conv.stride, conv.dilation
        self.groups = conv.groups
        self.padding = (0,) * len(conv.kernel_size)


class _Accumulator:
    """Σ x xᵀ over a layer's input rows: GEMMs into a buffer of the input precision, flushed into
    a float64 sum every :data:`CHUNK_ROWS` rows (float64 inputs accumulate in float64 directly)."""

    def __init__(self, module: nn.Module, name: str = ""):
        self.module = module
        self.name = name
        self.S: Tensor | None = None  # float64 sum of the flushed buffers
        self.buf: Tensor | None = None  # running sum of the current chunk (input precision)
        self.rows_in_buf = 0
        self.n = 0
        self.error: Exception | None = None

    @property
    def H(self) -> Tensor | None:
        """(2/n) Σ x xᵀ (float64), or None before any input."""
        total = self.total()
        return None if total is None or self.n == 0 else total.mul_(2.0 / self.n)

    def total(self) -> Tensor | None:
        """Σ x xᵀ over the rows so far (a float64 copy), or None before any input."""
        if self.buf is None:
            return None
        out = self.buf.to(torch.float64, copy=True)
        if self.S is not None:
            out += self.S
        return out

    def _flush(self) -> None:
        if self.S is None:
            self.S = self.buf.to(torch.float64, copy=True)
        else:
            self.S += self.buf
        self.buf.zero_()
        self.rows_in_buf = 0

    def __call__(self, module: nn.Module, inputs: tuple, output: object) -> None:
        if self.error is not None:
            return
        try:
            rows = layer_rows(module, inputs[0].detach())
        except Exception as exc:  # noqa: BLE001 - re-raised after the forward pass
            self.error = exc
            return
        if rows.shape[1] == 0:
            return
        if rows.dtype not in (torch.float32, torch.float64):
            rows = rows.float()  # half/bfloat16 inputs: products in float32
        if self.buf is None:
            g, k = rows.shape[0], rows.shape[2]
            self.buf = torch.zeros(g, k, k, dtype=rows.dtype, device=rows.device)
        limit = CHUNK_ROWS if self.buf.dtype != torch.float64 else rows.shape[1]
        start = 0
        while start < rows.shape[1]:
            take = min(rows.shape[1] - start, max(1, limit - self.rows_in_buf))
            chunk = rows[:, start : start + take].to(self.buf.dtype)
            if self.buf.shape[0] == 1:
                self.buf[0].addmm_(chunk[0].t(), chunk[0])
            else:
                self.buf.baddbmm_(chunk.transpose(1, 2), chunk)
            if not bool(torch.isfinite(self.buf.diagonal(dim1=1, dim2=2)).all()):
                self.error = CalibrationError(
                    f"layer {self.name!r} ({type(module).__name__}) received NaN or infinite "
                    f"calibration inputs (or inputs whose squares overflow {rows.dtype})"
                )
                return
            start += take
            self.n += take
            self.rows_in_buf += take
            if self.buf.dtype != torch.float64 and self.rows_in_buf >= CHUNK_ROWS:
                self._flush()


class HessianHooks:
    """Forward hooks that accumulate H = 2XXᵀ/n for each of ``layers`` (path → module).

    Use as a context manager (hooks are removed on exit, also on error); after running the
    model, :meth:`check` re-raises the first error a hook met and :meth:`hessians` returns the
    :class:`LayerHessian` of every layer (:class:`~optbrain.errors.CalibrationError` naming a
    layer that no input reached or whose inputs were all zero).
    """

    def __init__(self, layers: Mapping[str, nn.Module]):
        self.acc = {name: _Accumulator(m, name) for name, m in layers.items()}
        self._handles: list = []

    def __enter__(self) -> HessianHooks:
        self._handles = [a.module.register_forward_hook(a) for a in self.acc.values()]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def check(self) -> None:
        """Raise the first error a hook recorded."""
        for a in self.acc.values():
            if a.error is not None:
                raise a.error

    def hessians(self, shards: Shards = SINGLE) -> dict[str, LayerHessian]:
        """Every layer's H; on several ``shards`` (ranks) Σ x xᵀ and n are summed over them
        first, so each rank gets H of the union of the ranks' inputs."""
        totals = {name: a.total() for name, a in self.acc.items()}
        counts = {name: a.n for name, a in self.acc.items()}
        if shards.active:
            for name, a in self.acc.items():
                if totals[name] is None:  # no input here: this rank adds nothing
                    g = a.module.groups if isinstance(a.module, (nn.Conv1d, nn.Conv2d)) else 1
                    k = layer_columns(a.module)
                    totals[name] = torch.zeros(g, k, k, dtype=torch.float64)
            n = torch.tensor(list(counts.values()), dtype=torch.int64)
            shards.all_reduce_([*totals.values(), n])
            counts = dict(zip(counts, n.tolist()))
        out = {}
        for name, a in self.acc.items():
            if totals[name] is None or counts[name] == 0:
                raise CalibrationError(f"no calibration input reached layer {name!r}")
            H = totals[name].mul_(2.0 / counts[name])
            out[name] = _layer_hessian(name, a.module, H, counts[name])
        return out


def _layer_hessian(name: str, module: nn.Module, H: Tensor, n: int) -> LayerHessian:
    diag = H.diagonal(dim1=-2, dim2=-1)
    dead = diag <= 0
    if bool(dead.all()):
        raise CalibrationError(
            f"the calibration inputs of layer {name!r} are all zero: its weights cannot be "
            "calibrated (check the data, or leave the layer out of the mask)"
        )
    if bool(dead.any()):
        log.info("layer %s: %d dead inputs (zero on all calibration rows)", name, int(dead.sum()))
    weight = f"{name}.weight" if name else "weight"
    return LayerHessian(name, module, weight, H, n, dead, is_transposed_linear(module))


def supported_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Module path → module for every Linear / Conv1d / Conv2d (and ``transformers`` Conv1D) of
    ``model``, in forward order.

    The order is read from the model's graph (:func:`optbrain.curvature.paths.graph_of`, the
    reader every structured path shares: a layer is listed where the forward first calls it);
    layers the forward never reaches follow in module order. A model the graph reader cannot
    trace is listed in module order (logged). The projections inside ``nn.MultiheadAttention``
    are not listed: its forward reads their weights without calling them, so no hook sees their
    inputs."""
    out: dict[str, nn.Module] = {}
    inside = {
        f"{p}.{c}" if p else c
        for p, m in model.named_modules()
        if isinstance(m, nn.MultiheadAttention)
        for c, _ in m.named_modules()
        if c
    }
    try:
        from .paths import graph_of

        graph = graph_of(model)
    except UnsupportedModuleError as exc:
        log.info("layer order from the module tree: %s", exc)
    else:
        for gn in graph.leaves():
            if is_layer(gn.module) and gn.node.target not in inside:
                out.setdefault(gn.node.target, model.get_submodule(gn.node.target))
    for path, m in model.named_modules():
        if is_layer(m) and path not in out and path not in inside:
            out[path] = m
    return out


def calibration_hessians(
    model: nn.Module,
    inputs: Iterable,
    layers: Sequence[str] | None = None,
    *,
    shards: Shards = SINGLE,
) -> dict[str, LayerHessian]:
    """H = 2XXᵀ/n of the inputs of each layer (module paths; default: every supported layer).

    ``inputs`` yields input tensors, or ``(x, y)`` batches whose ``y`` is ignored. The model runs
    in eval mode without autograd; its modes are restored and every hook is removed, also when a
    forward pass fails. ``shards``: the ranks whose inputs are parts of one calibration set
    (:attr:`optbrain.problem.Problem.shards`): Σ x xᵀ and n are summed over them.
    """
    available = supported_layers(model)
    wanted = list(available) if layers is None else list(layers)
    unknown = [n for n in wanted if n not in available]
    if unknown:
        raise UnsupportedModuleError(
            f"layer(s) {unknown} are not Linear/Conv1d/Conv2d modules of the model; "
            f"supported layers: {list(available)}"
        )
    hooks = HessianHooks({name: available[name] for name in wanted})
    with shards.together("calibrating the layer-wise Hessians"):
        with hooks, torch.no_grad(), eval_mode(model):
            for batch in inputs:
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                model(x)
                hooks.check()
    return hooks.hessians(shards)


class LayerwiseHessian:
    """Estimator form of :func:`calibration_hessians` on a :class:`Problem`'s inputs (labels are
    not used): ``LayerwiseHessian().hessians(problem, layers=None) -> {layer: LayerHessian}``."""

    def hessians(
        self, problem: Problem, layers: Sequence[str] | None = None
    ) -> dict[str, LayerHessian]:
        problem.prepare()
        return calibration_hessians(problem.model, problem.batches(), layers, shards=problem.shards)

    def __repr__(self) -> str:
        return "LayerwiseHessian()"
