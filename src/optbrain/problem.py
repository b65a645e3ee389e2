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
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from . import distributed
from .distributed import Shards
from .errors import EmptyDataError, NonFiniteLossError, ShapeMismatchError
from .paramdict import named_parameters
from .streaming import check_reiterable

log = logging.getLogger(__name__)

Batch = tuple[Tensor, Tensor]
T = TypeVar("T")

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

    **Data-parallel** (:mod:`optbrain.distributed`). While a ``torch.distributed`` process group is
    initialised (``group="auto"``, the default; or a ``ProcessGroup``), ``data`` is this rank's
    shard of one data set: N (:attr:`n_samples`) and every sum over samples (:meth:`objective`,
    the estimators, inverses, layer-wise Hessians, saliencies) are summed over the ranks by
    :meth:`all_reduce_`, so every rank gets the result of one process on the union of the shards.
    ``group=None`` keeps the problem to this process's data. ``split=True`` (or ``None`` inside
    :func:`optbrain.distributed.split_batches`) is for programs whose ranks all load the whole
    data: each rank then uses its contiguous part of every batch. The first use validates the
    ranks against each other: a rank without samples, samples of other shapes or dtypes, or a
    model that differs from rank 0's raise a named error on every rank.

    **Streaming.** Each consumer reads ``data`` batch by batch, in one pass, in memory independent
    of N; a consumer that needs N before its pass (the recursive OBS inverse, the exact Hessian)
    makes one counting pass the first time (cached).
    """

    model: nn.Module
    loss_fn: Any
    data: Any
    params: Sequence[str] | None = None
    group: Any = "auto"
    split: bool | None = None
    _n: int | None = field(default=None, init=False, repr=False)
    _local_n: int | None = field(default=None, init=False, repr=False)
    _reduction: str | None = field(default=None, init=False, repr=False)
    _shards: Shards | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        check_reiterable(self.data, "the problem's data")

    # ---------------------------------------------------------------- data
    @property
    def device(self) -> torch.device:
        for p in self.model.parameters():
            return p.device
        return torch.device("cpu")

    @property
    def shards(self) -> Shards:
        """The ranks this problem's data is sharded over (one process without a group)."""
        if self._shards is None:
            self._shards = distributed.shards(self.group)
        return self._shards

    @property
    def distributed(self) -> bool:
        """Whether the problem spans several ranks."""
        return self.shards.active

    def _splits(self) -> bool:
        split = distributed.splitting() if self.split is None else self.split
        return bool(split) and self.shards.active

    def batches(self) -> Iterator[Batch]:
        """Yield this rank's ``(x, y)`` batches on the model's device (empty parts skipped)."""
        dev = self.device
        split = self._splits()
        for batch in _as_batches(self.data):
            if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                raise TypeError(
                    f"data must yield (input, target) pairs; got {type(batch).__name__}"
                )
            x, y = batch
            if x.shape[0] != y.shape[0]:
                raise ShapeMismatchError(
                    f"a batch has {x.shape[0]} inputs but {y.shape[0]} targets"
                )
            if split:
                x, y = distributed.part(x, y, self.shards)
                if x.shape[0] == 0:
                    continue
            yield x.to(dev), y.to(dev)

    @property
    def n_samples(self) -> int:
        """Number of samples N over all batches (of all ranks), counted and validated on first
        use unless a pass over the data has counted them already."""
        if self._n is None:
            self.check()
        assert self._n is not None
        return self._n

    @property
    def local_samples(self) -> int | None:
        """This rank's samples, when a pass has counted them (None before)."""
        return self._local_n

    def counted(self, local: int) -> int:
        """For a consumer that read every batch once and saw ``local`` samples: N over all
        ranks (the count is all-reduced and cached when it was not known yet)."""
        if self._n is None:
            n = self.shards.count(local)
            if n == 0:
                raise EmptyDataError("the problem's data yielded no samples")
            self._local_n, self._n = local, n
        return self._n

    def progress_total(self) -> int:
        """The ``total`` of progress callbacks: this rank's samples, 0 while unknown."""
        return self._local_n or 0

    def progress_done(self, tick: Any, done: int) -> None:
        """After a pass that reported ``tick(done, progress_total())``: a last call with the
        total, when it was not known during the pass (the first pass over a stream)."""
        if tick is not None and self._local_n is None:
            tick(done, done)

    def all_reduce_(self, values: T) -> T:
        """Sum ``values`` (a tensor, a sequence or a mapping of tensors) over the ranks in place
        and return them: the one place where optbrain combines the ranks' sums over samples
        (identity in one process)."""
        return self.shards.all_reduce_(values)

    def reduce_sum(self, value: float) -> float:
        """A local float summed over the ranks."""
        return self.shards.sum(value)

    def together(self, what: str):
        """Context manager around local work that must fail on every rank when it fails on one
        (:meth:`optbrain.distributed.Shards.together`)."""
        return self.shards.together(what)

    def parameters(self) -> dict[str, nn.Parameter]:
        """The parameters considered, keyed by clean name."""
        return named_parameters(self.model, self.params)

    def restrict(self, names: Sequence[str]) -> Problem:
        """The same model, loss and data with the estimators restricted to the parameters
        ``names`` (clean names); the sample count and reduction are carried over, not re-probed."""
        return self._derived(self.model, self.data, list(names), self.split)

    def on_batch(self, x: Tensor, y: Tensor) -> Problem:
        """The same model, loss and parameters on the one batch ``(x, y)`` alone, in this process
        (no group), taking this problem's validation as done: for estimators that run another
        estimator batch by batch (:mod:`optbrain.curvature.subsampled`)."""
        self.prepare()
        out = Problem(self.model, self.loss_fn, (x, y), self.params, group=None, split=False)
        out._n = out._local_n = int(x.shape[0])
        out._reduction = self._reduction
        return out

    def cast(self, dtype: torch.dtype) -> Problem:
        """The problem on a copy of the model cast to ``dtype``, floating data cast on the fly
        (results keep their keys); the problem itself when every parameter has that dtype."""
        params = list(self.model.parameters())
        if not params or all(p.dtype == dtype for p in params):
            return self
        model = copy.deepcopy(self.model).to(dtype)
        return self._derived(model, _CastData(self, dtype), self.params, False)

    def _derived(
        self, model: nn.Module, data: Any, params: Sequence[str] | None, split: bool | None
    ) -> Problem:
        self.prepare()
        out = Problem(model, self.loss_fn, data, params, group=self.group, split=split)
        out._n, out._local_n, out._reduction = self._n, self._local_n, self._reduction
        out._shards = self._shards
        return out

    # ---------------------------------------------------------------- loss
    @property
    def reduction(self) -> str:
        """``"mean"`` or ``"sum"``: how ``loss_fn`` reduces over the samples of a batch."""
        if self._reduction is None:
            self._inspect(count=False)
        assert self._reduction is not None
        return self._reduction

    def batch_weight(self, batch_size: int) -> float:
        """Factor turning ``loss_fn`` on one batch into its share of the objective E."""
        n = self.n_samples
        return batch_size / n if self.reduction == "mean" else 1.0 / n

    def sample_loss(self, out: Tensor, y: Tensor) -> Tensor:
        """ℓ for one sample given unbatched output and target (usable under ``torch.func``)."""
        return self.loss_fn(out.unsqueeze(0), y.unsqueeze(0))

    def batch_sum(self, out: Tensor, y: Tensor) -> Tensor:
        """Σ ℓ_n over the batch (a scalar autograd can differentiate): E times N, this batch's
        share, for consumers that divide by N once at the end."""
        loss = self.loss_fn(out, y)
        if loss.dim() != 0:
            raise ShapeMismatchError(
                f"loss_fn must return a scalar (reduction 'mean' or 'sum'); got shape "
                f"{tuple(loss.shape)}"
            )
        return loss * out.shape[0] if self.reduction == "mean" else loss

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
        """E(θ) at the current parameters, in float64 (model in eval mode for the call); one pass
        over the data, summed over the ranks of a distributed problem."""
        self.prepare()
        total, seen = 0.0, 0
        with self.together("measuring the objective"):
            with torch.no_grad(), eval_mode(self.model):
                for x, y in self.batches():
                    total += float(self.batch_sum(self.model(x), y))
                    seen += x.shape[0]
        total = self.reduce_sum(total) / self.counted(seen)
        if not math.isfinite(total):
            raise NonFiniteLossError(f"the objective is {total}: the loss is NaN or infinite")
        return total

    # ---------------------------------------------------------------- validation
    def check(self) -> Problem:
        """Validate the problem once: data not empty, outputs fit the loss, loss finite; count
        the samples (one pass). Distributed: the ranks' shards and models are compared too."""
        self._inspect(count=True)
        return self

    def prepare(self) -> Problem:
        """Validate on first use without counting the samples: the first batch (outputs fit the
        loss, loss finite, its reduction) and, distributed, the ranks against each other. Every
        consumer of the data calls it before its pass."""
        if self._reduction is None:
            self._inspect(count=False)
        return self

    def check_model(self) -> None:
        """Distributed: raise :class:`~optbrain.errors.ModelMismatchError` on every rank unless
        the ranks hold the same parameters and buffers (done by the first validation)."""
        self.shards.check_model(self.model)

    def _inspect(self, count: bool) -> None:
        """Validate the first non-empty batch (and count every sample with ``count``); then
        compare the ranks (shards, model) when distributed."""
        with self.together("validating the problem's data"):
            n, first = self._first_batch(count)
            if first is not None:
                self._validate(*first)
        x, y = first if first is not None else (None, None)
        info = distributed.shard_info(n, x, y, f"{type(self.loss_fn).__name__}/{self._reduction}")
        self.shards.check_shards(info)
        self.check_model()
        if first is None:
            raise EmptyDataError("the problem's data yielded no samples")
        if count:
            self._local_n, self._n = n, self.shards.count(n)

    def _first_batch(self, count: bool) -> tuple[int, Batch | None]:
        n = 0
        first: Batch | None = None
        for x, y in self.batches():
            n += x.shape[0]
            if first is None and x.shape[0] > 0:
                first = (x, y)
                if not count:
                    break
        return n, first

    def _validate(self, x: Tensor, y: Tensor) -> None:
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
