"""The object every estimator, saliency and pruner works on: a model, a loss and data.

The objective is the user's loss averaged over the whole data set, *per sample*:

    E(θ) = (1/N) Σ_n ℓ_n(θ),   ℓ_n = loss_fn(model(x_n[None]), y_n[None]),

whatever the batch sizes of ``data``. For a loss with ``reduction="mean"`` a batch of size b
contributes ``(b/N) · loss_fn(out, y)``; with ``reduction="sum"`` it contributes
``loss_fn(out, y) / N``. (For ``MSELoss(reduction="mean")`` the per-sample loss is therefore the
mean over output components, exactly as PyTorch defines it.)
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .errors import EmptyDataError, NonFiniteLossError, ShapeMismatchError
from .paramdict import named_parameters

log = logging.getLogger(__name__)

Batch = tuple[Tensor, Tensor]

_ELEMENTWISE_LOSSES = (
    nn.MSELoss,
    nn.L1Loss,
    nn.SmoothL1Loss,
    nn.HuberLoss,
    nn.BCELoss,
    nn.BCEWithLogitsLoss,
)


def _as_batches(data: Any) -> Iterable[Batch]:
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        return [data]
    return data


@dataclass
class Problem:
    """A model, a loss and data; optionally the names of the parameters to consider.

    ``data`` is a ``DataLoader``, any re-iterable of ``(x, y)`` batches, or one ``(X, Y)`` tuple of
    tensors. ``params`` restricts estimators to those parameters (clean names, see
    :mod:`optbrain.paramdict`); by default all trainable parameters.
    """

    model: nn.Module
    loss_fn: Any
    data: Any
    params: Sequence[str] | None = None
    _n: int | None = field(default=None, init=False, repr=False)
    _reduction: str | None = field(default=None, init=False, repr=False)

    # ---------------------------------------------------------------- data
    @property
    def device(self) -> torch.device:
        for p in self.model.parameters():
            return p.device
        return torch.device("cpu")

    def batches(self) -> Iterator[Batch]:
        """Yield ``(x, y)`` batches on the model's device."""
        dev = self.device
        for batch in _as_batches(self.data):
            if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                raise TypeError(
                    f"data must yield (input, target) pairs; got {type(batch).__name__}"
                )
            x, y = batch
            yield x.to(dev), y.to(dev)

    @property
    def n_samples(self) -> int:
        """Number of samples N over all batches (validated on first use)."""
        if self._n is None:
            self.check()
        assert self._n is not None
        return self._n

    def parameters(self) -> dict[str, nn.Parameter]:
        """The parameters considered, keyed by clean name."""
        return named_parameters(self.model, self.params)

    def restrict(self, names: Sequence[str]) -> Problem:
        """The same model, loss and data with the estimators restricted to the parameters
        ``names`` (clean names); the sample count and reduction are carried over, not re-probed."""
        return self._derived(self.model, self.data, list(names))

    def cast(self, dtype: torch.dtype) -> Problem:
        """The problem on a copy of the model cast to ``dtype``, floating data cast on the fly
        (results keep their keys); the problem itself when every parameter has that dtype."""
        params = list(self.model.parameters())
        if not params or all(p.dtype == dtype for p in params):
            return self
        model = copy.deepcopy(self.model).to(dtype)
        return self._derived(model, _CastData(self, dtype), self.params)

    def _derived(self, model: nn.Module, data: Any, params: Sequence[str] | None) -> Problem:
        out = Problem(model, self.loss_fn, data, params)
        out._n, out._reduction = self.n_samples, self.reduction
        return out

    # ---------------------------------------------------------------- loss
    @property
    def reduction(self) -> str:
        """``"mean"`` or ``"sum"``: how ``loss_fn`` reduces over the samples of a batch."""
        if self._reduction is None:
            self.check()
        assert self._reduction is not None
        return self._reduction

    def batch_weight(self, batch_size: int) -> float:
        """Factor turning ``loss_fn`` on one batch into its share of the objective E."""
        n = self.n_samples
        return batch_size / n if self.reduction == "mean" else 1.0 / n

    def sample_loss(self, out: Tensor, y: Tensor) -> Tensor:
        """ℓ for one sample given unbatched output and target (usable under ``torch.func``)."""
        return self.loss_fn(out.unsqueeze(0), y.unsqueeze(0))

    def batch_objective(self, out: Tensor, y: Tensor) -> Tensor:
        """This batch's additive share of E (a scalar that autograd can differentiate)."""
        loss = self.loss_fn(out, y)
        if loss.dim() != 0:
            raise ShapeMismatchError(
                f"loss_fn must return a scalar (reduction 'mean' or 'sum'); got shape "
                f"{tuple(loss.shape)}"
            )
        return loss * self.batch_weight(out.shape[0])

    def objective(self) -> float:
        """E(θ) at the current parameters, in float64 (model in eval mode for the call)."""
        total = 0.0
        with torch.no_grad(), eval_mode(self.model):
            for x, y in self.batches():
                total += float(self.batch_objective(self.model(x), y))
        if not math.isfinite(total):
            raise NonFiniteLossError(f"the objective is {total}: the loss is NaN or infinite")
        return total

    # ---------------------------------------------------------------- validation
    def check(self) -> Problem:
        """Validate the problem once: data not empty, outputs fit the loss, loss finite."""
        n = 0
        first: Batch | None = None
        for x, y in self.batches():
            if x.shape[0] != y.shape[0]:
                raise ShapeMismatchError(
                    f"a batch has {x.shape[0]} inputs but {y.shape[0]} targets"
                )
            n += x.shape[0]
            if first is None and x.shape[0] > 0:
                first = (x, y)
        if n == 0 or first is None:
            raise EmptyDataError("the problem's data yielded no samples")
        self._n = n
        x, y = first
        with torch.no_grad(), eval_mode(self.model):
            out = self.model(x)
            if isinstance(self.loss_fn, _ELEMENTWISE_LOSSES) and out.shape != y.shape:
                raise ShapeMismatchError(
                    f"model output shape {tuple(out.shape)} does not fit target shape "
                    f"{tuple(y.shape)} for {type(self.loss_fn).__name__}"
                )
            try:
                loss = self.loss_fn(out, y)
            except (RuntimeError, ValueError, IndexError) as exc:
                raise ShapeMismatchError(
                    f"loss_fn failed on model output of shape {tuple(out.shape)} and target of "
                    f"shape {tuple(y.shape)}: {exc}"
                ) from exc
            if loss.dim() != 0:
                raise ShapeMismatchError(
                    "loss_fn must reduce to a scalar ('mean' or 'sum'); got shape "
                    f"{tuple(loss.shape)}"
                )
            if not torch.isfinite(loss):
                raise NonFiniteLossError(f"the loss is {float(loss)} on the first batch")
            self._reduction = self._detect_reduction(out, y, loss)
        return self

    def _detect_reduction(self, out: Tensor, y: Tensor, loss: Tensor) -> str:
        red = getattr(self.loss_fn, "reduction", None)
        if red in ("mean", "sum"):
            return red
        if red is not None:
            raise ValueError(f"loss_fn.reduction must be 'mean' or 'sum', not {red!r}")
        b = out.shape[0]
        if b == 1:
            return "mean"
        per = torch.stack([self.sample_loss(out[i], y[i]) for i in range(b)])
        if torch.allclose(loss, per.mean(), rtol=1e-4, atol=1e-12):
            return "mean"
        if torch.allclose(loss, per.sum(), rtol=1e-4, atol=1e-12):
            return "sum"
        raise ValueError(
            "cannot tell how loss_fn reduces over samples (neither mean nor sum of per-sample "
            "losses); give it a .reduction attribute of 'mean' or 'sum'"
        )


class _CastData:
    """Re-iterable view of a problem's batches with floating tensors cast to ``dtype``."""

    def __init__(self, problem: Problem, dtype: torch.dtype):
        self.problem, self.dtype = problem, dtype

    def __iter__(self):
        for x, y in self.problem.batches():
            yield (
                x.to(self.dtype) if x.is_floating_point() else x,
                y.to(self.dtype) if y.is_floating_point() else y,
            )


class eval_mode:
    """Context manager: put a module in eval mode, restore its previous modes afterwards.

    Cheap when it can be (it runs on every curvature call): only the modules that are training are
    touched, and when all of them use ``nn.Module.train`` their ``training`` flags are flipped
    directly instead of calling the recursive ``train()``; a module overriding ``train`` gets the
    ordinary ``model.eval()`` / ``train(mode)`` calls."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._modes: list[tuple[nn.Module, bool]] = []
        self._flat = True

    def __enter__(self) -> nn.Module:
        training = [m for m in self.model.modules() if m.training]
        self._flat = all(type(m).train is nn.Module.train for m in training)
        if self._flat:
            self._modes = [(m, True) for m in training]
            for m in training:
                m.training = False
        else:
            self._modes = [(m, m.training) for m in self.model.modules()]
            self.model.eval()
        return self.model

    def __exit__(self, *exc: object) -> None:
        for m, mode in self._modes:
            if self._flat:
                m.training = mode
            else:
                m.train(mode)
