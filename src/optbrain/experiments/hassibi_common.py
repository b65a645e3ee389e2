"""What the three Hassibi–Stork reproductions share: small sigmoid nets trained to a minimum of the
squared error by full-batch L-BFGS, the prunable set (every weight *and* bias, as the papers count
them), the pruners compared, and deletion one entry at a time without retraining.

The objective is ``nn.MSELoss()`` averaged over the patterns: E = (1/P) Σ_k (t_k − o_k)², twice the
papers' E = (1/2P) Σ (t − o)². Rankings and the OBS update do not depend on that factor; the
α of the recursive inverse is added to a Gauss–Newton matrix twice the paper's (immaterial at
α = 10⁻⁶, which the paper calls insensitive).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..elimination import Step
from ..errors import TargetUnreachableError
from ..masking import Mask, apply_
from ..paramdict import named_parameters
from ..problem import Problem, eval_mode

__all__ = [
    "FitResult",
    "ShuffledBatches",
    "accuracy",
    "all_parameters_mask",
    "delete_one_at_a_time",
    "fit",
    "live_topology",
    "make_pruner",
    "mse_problem",
    "outputs",
    "sigmoid_net",
]

METHODS = ("obs", "obd", "magnitude", "unit_obs")
LABELS = {
    "obs": "OBS",
    "obd": "OBD",
    "magnitude": "magnitude",
    "unit_obs": "Unit-OBS",
    "unit_obs_then_obs": "Unit-OBS, then OBS",
}


def sigmoid_net(
    n_in: int,
    n_hidden: int,
    seed: int,
    init_scale: float | None = None,
    dtype: torch.dtype = torch.float64,
) -> nn.Sequential:
    """``Linear(n_in, n_hidden) · Sigmoid · Linear(n_hidden, 1) · Sigmoid`` with biases.

    ``init_scale=None`` keeps PyTorch's default initialisation (uniform ±1/√fan_in); a number draws
    every weight and bias uniformly from ±``init_scale``. Seeded with a generator of its own (the
    global RNG is untouched)."""
    if n_in < 1 or n_hidden < 1:
        raise ValueError(f"layer sizes must be >= 1, got n_in={n_in!r}, n_hidden={n_hidden!r}")
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # nn.Linear's own init draws from the global RNG
        model = nn.Sequential(
            nn.Linear(n_in, n_hidden), nn.Sigmoid(), nn.Linear(n_hidden, 1), nn.Sigmoid()
        ).to(dtype)
    with torch.no_grad():
        for layer in (model[0], model[2]):
            for p in (layer.weight, layer.bias):
                bound = init_scale if init_scale is not None else 1.0 / math.sqrt(layer.in_features)
                p.copy_((torch.rand(p.shape, generator=gen, dtype=dtype) * 2 - 1) * bound)
    return model


@dataclass
class FitResult:
    """Objective (MSE, without the decay term) and regularised objective after :func:`fit`."""

    mse: float
    objective: float
    iterations: int


def fit(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    weight_decay: float = 0.0,
    max_iter: int = 1000,
    tolerance_grad: float = 1e-10,
) -> FitResult:
    """Minimise mean MSE + (``weight_decay``/2)‖θ‖² over every parameter by full-batch L-BFGS
    (strong Wolfe line search) in place. Works with a mask attached (pruned entries stay 0)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.LBFGS(
        params,
        lr=1.0,
        max_iter=max_iter,
        max_eval=2 * max_iter,
        tolerance_grad=tolerance_grad,
        tolerance_change=1e-14,
        history_size=20,
        line_search_fn="strong_wolfe",
    )
    loss_fn = nn.MSELoss()

    def objective() -> Tensor:
        loss = loss_fn(model(x), y)
        if weight_decay:
            loss = loss + 0.5 * weight_decay * sum(p.square().sum() for p in params)
        return loss

    def closure() -> Tensor:
        opt.zero_grad(set_to_none=True)
        loss = objective()
        loss.backward()
        return loss

    with eval_mode(model):
        opt.step(closure)
        with torch.no_grad():
            mse = float(loss_fn(model(x), y))
            total = float(objective())
    iterations = int(opt.state[params[0]].get("n_iter", 0)) if params else 0
    return FitResult(mse, total, iterations)


class ShuffledBatches:
    """Mini-batches of ``(x, y)`` in a new random order on every pass, drawn from a generator of
    its own (``generator``, which :func:`optbrain.train.train` re-seeds with its ``seed``). A
    re-iterable for ``train`` without a ``DataLoader``'s per-sample indexing (10× faster on
    small tensors)."""

    def __init__(self, x: Tensor, y: Tensor, batch_size: int, seed: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x has {x.shape[0]} rows, y {y.shape[0]}")
        self.x, self.y, self.batch_size = x, y, batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        perm = torch.randperm(self.x.shape[0], generator=self.generator)
        for i in range(0, len(perm), self.batch_size):
            idx = perm[i : i + self.batch_size]
            yield self.x[idx], self.y[idx]

    def __len__(self) -> int:
        return -(-self.x.shape[0] // self.batch_size)


@torch.no_grad()
def outputs(model: nn.Module, x: Tensor) -> Tensor:
    with eval_mode(model):
        return model(x)


def accuracy(model: nn.Module, x: Tensor, labels: Tensor) -> float:
    """Fraction of patterns whose output is on the side of 0.5 of its 0/1 label."""
    pred = outputs(model, x) > 0.5
    return float((pred == (labels > 0.5)).to(torch.float64).mean())


def mse_problem(model: nn.Module, x: Tensor, y: Tensor) -> Problem:
    """The Problem of mean squared error on one full batch."""
    return Problem(model, nn.MSELoss(), [(x, y)])


def all_parameters_mask(model: nn.Module) -> Mask:
    """Every weight and every bias prunable (the papers count biases as weights)."""
    return Mask.ones(model, names=list(named_parameters(model)))


def make_pruner(
    method: str, *, alpha: float = 1e-6, weight_decay: float = 0.0, obd_curvature: str = "ggn"
):
    """The pruner of ``method``: ``"obs"`` (Hassibi–Stork with the recursive/direct inverse at
    α, chosen by cost), ``"unit_obs"`` (Stahlberger–Riedmiller: all outgoing weights of an input
    or hidden unit at once), ``"obd"`` (½ h w², ``obd_curvature`` ``"ggn"`` or ``"hessian"``
    diagonal), ``"magnitude"``. ``weight_decay`` is the λ the net was trained with (the
    weight-decay-aware saliencies of PAPERS.md §4). The papers' procedures: one step per call, no
    guard keeping a weight per layer (biases are deletable weights here)."""
    from ..pruners import presets

    if method == "obd":
        from ..curvature import ExactHessianDiagonal, GGNDiagonal

        curvature = ExactHessianDiagonal() if obd_curvature == "hessian" else GGNDiagonal()
        return presets.obd(curvature, weight_decay=weight_decay, steps=None, min_kept=0)
    if method == "magnitude":
        return presets.magnitude(min_kept=0)
    if method in ("obs", "unit_obs"):
        from ..curvature.inverse import AutoInverse
        from ..pruners import OBSPruner

        # trained with decay λ: the inverse is (R + λI)⁻¹ (OBSPruner's default then); else α
        inverse = None if weight_decay > 0 else AutoInverse(alpha=alpha)
        groups = "unit" if method == "unit_obs" else "weight"
        return OBSPruner(inverse=inverse, groups=groups, weight_decay=weight_decay)
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def delete_one_at_a_time(
    model: nn.Module,
    problem: Problem,
    pruner: Any,
    mask: Mask,
    *,
    after: Callable[[Step], str | None],
    min_kept: int = 1,
    retrain: Callable[[nn.Module, int], Any] | None = None,
    deleted: Callable[[Step], Any] | None = None,
) -> str | None:
    """Delete with ``pruner`` one step at a time on :func:`optbrain.elimination.eliminate`, the
    model's weights updated in place (OBS compensation, or zeroing) and the deleted entries
    zeroed (not attached); ``after(step)`` sees each step (``step.new``, ``step.info``) and may
    return a reason to stop, ``deleted(step)`` runs right after the deletion and ``retrain(model,
    k)`` after it. One step deletes one weight,
    or one unit for a Unit-OBS pruner (``units``: one more removed cell); every step starts from a
    fresh curvature at the current weights (OBS: the paper's "go back to step 2"). Stops when no
    more than ``min_kept`` entries are left, or when a Unit-OBS pruner has no candidate left;
    returns the reason it stopped (None: ``min_kept`` reached)."""
    from ..cells import cells
    from ..elimination import eliminate
    from ..pruners.cell_pruner import removed_cells

    units = getattr(pruner, "removes_cells", False)
    found = cells(model, ("input", "unit", "channel")) if units else []

    def target(r: int, m: Mask) -> int | None:
        if m.kept() <= min_kept:
            return None
        return sum(removed_cells(found, m)) + 1 if units else m.pruned() + 1

    return eliminate(
        model,
        pruner,
        target,
        make_problem=lambda m: problem,
        mask=mask,
        by="units" if units else "sparsity",
        deleted=deleted,
        retrain=retrain,
        after=after,
        apply=apply_,
        stop_on=(TargetUnreachableError,) if units else (),
    )


def live_topology(mask: Mask) -> tuple[int, int, int]:
    """``(inputs, hidden units, weights)`` still in use in a :func:`sigmoid_net`: a hidden unit is
    live if its output weight is kept, an input if it feeds a live hidden unit; weights counts the
    kept weights and biases that still influence the output (those of live units)."""
    w1, b1 = mask["0.weight"], mask["0.bias"]
    w2, b2 = mask["2.weight"], mask["2.bias"]
    hidden = w2[0]  # live hidden units
    inputs = (w1 & hidden[:, None]).any(dim=0)
    weights = int((w1 & hidden[:, None]).sum() + (b1 & hidden).sum() + w2.sum() + b2.sum())
    return int(inputs.sum()), int(hidden.sum()), weights
