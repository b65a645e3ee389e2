"""Layer-wise calibration Hessians H = 2XXᵀ/n of Linear / Conv1d / Conv2d inputs (OBC, SparseGPT).

For a layer computing ``y = W x (+ b)``, the squared reconstruction error of a changed weight
matrix Ŵ on calibration inputs, averaged over the n input rows, is

    (1/n) ‖(W − Ŵ) X‖²_F  =  Σ_rows ½ (w − ŵ)ᵀ H (w − ŵ),     H = (2/n) X Xᵀ,

so each output row is an independent quadratic with the *same* Hessian H (PAPERS.md §11.1). The
rows of X are the layer's inputs: for ``Linear`` one row per sample (and per position of any extra
leading dimensions), for a convolution one row per sample and output position, the unfolded input
patch (honouring stride, padding, dilation; ``groups > 1`` gives one H per group, over that group's
``C_in/groups · prod(kernel)`` inputs). The bias is not part of H (it does not multiply an input).

H is accumulated as a running mean in float64 from calibration batches through forward hooks, with
the model in eval mode and without autograd; hooks are removed afterwards, also on error.

*Dead inputs* (an input that is zero on every calibration row, so ``H_ii = 0``) are handled as OBC
does: ``dead`` marks them, and the solvers (:mod:`optbrain.layerwise`) set their diagonal entry
to 1 so H stays invertible and set the weights on those inputs to zero, which leaves every
calibration output unchanged. A layer whose calibration inputs are all zero (or that no input
reached) raises :class:`~optbrain.errors.CalibrationError`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import CalibrationError, UnsupportedModuleError
from ..problem import Problem, eval_mode
from .rules import ConvRule

log = logging.getLogger(__name__)

LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d)

_CONV = ConvRule()


@dataclass
class LayerHessian:
    """Calibration Hessian of one layer.

    ``H`` has shape ``groups × k × k`` (float64), ``k`` = inputs per output unit
    (``in_features`` for Linear, ``C_in/groups · prod(kernel_size)`` for convolutions, in the
    order of ``weight.reshape(C_out, -1)``); ``n`` is the number of input rows averaged;
    ``dead`` (``groups × k`` bool) marks inputs that were zero on every row.
    """

    layer: str
    module: nn.Module
    weight: str
    H: Tensor
    n: int
    dead: Tensor

    @property
    def groups(self) -> int:
        return self.H.shape[0]

    def weight_matrix(self, weight: Tensor) -> Tensor:
        """The layer's weight as ``groups × rows × k`` (a view where possible)."""
        out = weight.shape[0]
        return weight.reshape(self.groups, out // self.groups, -1)


def layer_rows(module: nn.Module, x: Tensor) -> Tensor:
    """The input rows of ``module`` for input ``x``: ``groups × rows × k``."""
    if isinstance(module, nn.Linear):
        return x.reshape(1, -1, x.shape[-1])
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        if x.dim() == module.weight.dim() - 1:  # unbatched input
            x = x.unsqueeze(0)
        patches = _CONV._unfold(module, x)  # N × G × k × P
        g, k = patches.shape[1], patches.shape[2]
        return patches.permute(1, 0, 3, 2).reshape(g, -1, k)
    raise UnsupportedModuleError(
        f"layer-wise Hessians support {', '.join(c.__name__ for c in LAYER_TYPES)}, "
        f"not {type(module).__name__}"
    )


class _Accumulator:
    """Running mean of (2/n) Σ x xᵀ in float64 for one layer."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.H: Tensor | None = None
        self.n = 0
        self.error: Exception | None = None

    def __call__(self, module: nn.Module, inputs: tuple, output: object) -> None:
        if self.error is not None:
            return
        try:
            rows = layer_rows(module, inputs[0].detach()).to(torch.float64)
        except Exception as exc:  # noqa: BLE001 - re-raised after the forward pass
            self.error = exc
            return
        b = rows.shape[1]
        if b == 0:
            return
        if not torch.isfinite(rows).all():
            self.error = CalibrationError(
                f"{type(module).__name__} received NaN or infinite calibration inputs"
            )
            return
        if self.H is None:
            k = rows.shape[2]
            self.H = torch.zeros(rows.shape[0], k, k, dtype=torch.float64, device=rows.device)
        self.H.mul_(self.n / (self.n + b))
        self.n += b
        rows = rows * (2.0 / self.n) ** 0.5
        self.H.baddbmm_(rows.transpose(1, 2), rows)


def supported_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Module path → module for every Linear / Conv1d / Conv2d of ``model``, in forward order.

    The order is read from the model's graph (:func:`optbrain.curvature.paths.graph_of`, the
    reader every structured path shares: a layer is listed where the forward first calls it);
    layers the forward never reaches follow in module order. A model the graph reader cannot
    trace is listed in module order (logged)."""
    out: dict[str, nn.Module] = {}
    try:
        from .paths import graph_of

        graph = graph_of(model)
    except UnsupportedModuleError as exc:
        log.info("layer order from the module tree: %s", exc)
    else:
        for gn in graph.leaves():
            if isinstance(gn.module, LAYER_TYPES):
                out.setdefault(gn.node.target, model.get_submodule(gn.node.target))
    for path, m in model.named_modules():
        if isinstance(m, LAYER_TYPES) and path not in out:
            out[path] = m
    return out


def calibration_hessians(
    model: nn.Module,
    inputs: Iterable,
    layers: Sequence[str] | None = None,
) -> dict[str, LayerHessian]:
    """H = 2XXᵀ/n of the inputs of each layer (module paths; default: every supported layer).

    ``inputs`` yields input tensors, or ``(x, y)`` batches whose ``y`` is ignored. The model runs
    in eval mode without autograd; its modes are restored and every hook is removed, also when a
    forward pass fails.
    """
    available = supported_layers(model)
    wanted = list(available) if layers is None else list(layers)
    unknown = [n for n in wanted if n not in available]
    if unknown:
        raise UnsupportedModuleError(
            f"layer(s) {unknown} are not Linear/Conv1d/Conv2d modules of the model; "
            f"supported layers: {list(available)}"
        )
    acc = {name: _Accumulator(available[name]) for name in wanted}
    handles = [available[name].register_forward_hook(a) for name, a in acc.items()]
    try:
        with torch.no_grad(), eval_mode(model):
            for batch in inputs:
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                model(x)
                for a in acc.values():
                    if a.error is not None:
                        raise a.error
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name, a in acc.items():
        if a.H is None or a.n == 0:
            raise CalibrationError(f"no calibration input reached layer {name!r}")
        diag = a.H.diagonal(dim1=-2, dim2=-1)
        dead = diag <= 0
        if bool(dead.all()):
            raise CalibrationError(
                f"the calibration inputs of layer {name!r} are all zero: its weights cannot be "
                "calibrated (check the data, or leave the layer out of the mask)"
            )
        if bool(dead.any()):
            log.info(
                "layer %s: %d dead inputs (zero on all calibration rows)", name, int(dead.sum())
            )
        weight = f"{name}.weight" if name else "weight"
        out[name] = LayerHessian(name, a.module, weight, a.H, a.n, dead)
    return out


class LayerwiseHessian:
    """Estimator form of :func:`calibration_hessians` on a :class:`Problem`'s inputs (labels are
    not used): ``LayerwiseHessian().hessians(problem, layers=None) -> {layer: LayerHessian}``."""

    def hessians(
        self, problem: Problem, layers: Sequence[str] | None = None
    ) -> dict[str, LayerHessian]:
        return calibration_hessians(problem.model, problem.batches(), layers)

    def __repr__(self) -> str:
        return "LayerwiseHessian()"
