"""A small built-in trainer: Adam or SGD, optional early stopping on a validation loss.

It trains whatever ``model.parameters()`` yields, so a model with a mask attached through
:mod:`torch.nn.utils.parametrize` trains its stored weights and pruned entries stay zero.
Nothing here prints; progress goes to an optional callback and to :mod:`logging`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .datacheck import check_batch
from .errors import EmptyDataError, NonFiniteLossError

log = logging.getLogger(__name__)

__all__ = ["TrainResult", "train", "evaluate"]

Progress = Callable[[int, int], None]


@dataclass
class TrainResult:
    """What :func:`train` did: per-epoch mean training (and validation) losses.

    ``best_epoch`` is the 1-based epoch whose weights the model holds at the end (the epoch of the
    lowest validation loss when early stopping is on, else the last epoch).
    """

    epochs_run: int
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    best_epoch: int = 0


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _make_optimizer(
    params: Iterable[nn.Parameter],
    optimizer: str,
    lr: float,
    momentum: float,
    weight_decay: float,
) -> torch.optim.Optimizer:
    name = optimizer.lower()
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {optimizer!r}; choose 'adam' or 'sgd'")


def _summed(loss_fn: Any, loss: Tensor, batch_size: int) -> float:
    """A batch loss as the sum over its samples (epoch means are exact whatever the batch sizes)."""
    value = float(loss.detach())
    return value if getattr(loss_fn, "reduction", "mean") == "sum" else value * batch_size


def train(
    model: nn.Module,
    train_loader: Iterable[tuple[Tensor, Tensor]],
    loss_fn: Any,
    *,
    epochs: int,
    lr: float = 1e-3,
    optimizer: str = "adam",
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    val_loader: Iterable[tuple[Tensor, Tensor]] | None = None,
    patience: int | None = None,
    seed: int | None = None,
    progress: Progress | None = None,
) -> TrainResult:
    """Train ``model`` in place for up to ``epochs`` epochs and return the loss curves.

    ``optimizer`` is ``"adam"`` or ``"sgd"`` (with ``momentum``); ``weight_decay`` is the usual L2
    term. With ``val_loader`` the validation loss is recorded after every epoch; with ``patience``
    too, training stops after ``patience`` epochs without improvement and the best weights are
    restored. ``best_epoch`` is the epoch of the lowest validation loss (the last epoch without a
    ``val_loader``). ``seed`` makes the run reproducible: it seeds a forked copy of the global CPU
    RNG, which drives dropout and any loader without a generator of its own, and re-seeds the
    training loader's own ``generator`` if it has one (so shuffling does not depend on how often the
    loader was used before — what makes resumed pruning runs identical); the caller's global RNG
    state is unchanged. ``progress(done, total)`` is called after every epoch.
    """
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs!r}")
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    if patience is not None:
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience!r}")
        if val_loader is None:
            raise ValueError("patience (early stopping) needs a val_loader")

    rng = torch.random.fork_rng(devices=[]) if seed is not None else nullcontext()
    with rng:
        if seed is not None:
            torch.manual_seed(seed)
            gen = getattr(train_loader, "generator", None)
            if isinstance(gen, torch.Generator):
                gen.manual_seed(seed)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = _make_optimizer(params, optimizer, lr, momentum, weight_decay)
        return _run(model, train_loader, loss_fn, opt, epochs, val_loader, patience, progress)


def _epoch(model: nn.Module, loader, loss_fn, opt, epoch: int, device) -> float:
    """One pass over ``loader`` in train mode; the mean per-sample training loss."""
    model.train()
    total, n = 0.0, 0
    for i, (x, y) in enumerate(loader):
        x, y = x.to(device), y.to(device)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        if not torch.isfinite(loss):
            check_batch("training", i, (x, y), f" (epoch {epoch})")  # the data's fault?
            raise NonFiniteLossError(
                f"the training loss became {float(loss)} in epoch {epoch}, batch {i} "
                "(the data are finite); lower lr?"
            )
        loss.backward()
        opt.step()
        total += _summed(loss_fn, loss, x.shape[0])
        n += x.shape[0]
    if n == 0:
        raise EmptyDataError("train_loader yielded no samples")
    return total / n


def _run(
    model: nn.Module,
    train_loader: Iterable[tuple[Tensor, Tensor]],
    loss_fn: Any,
    opt: torch.optim.Optimizer,
    epochs: int,
    val_loader: Iterable[tuple[Tensor, Tensor]] | None,
    patience: int | None,
    progress: Progress | None,
) -> TrainResult:
    device = _device(model)
    result = TrainResult(epochs_run=0)
    best_val = math.inf
    best_state: dict[str, Tensor] | None = None
    bad_epochs = 0
    was_training = model.training
    try:
        for epoch in range(1, epochs + 1):
            mean = _epoch(model, train_loader, loss_fn, opt, epoch, device)
            result.train_loss.append(mean)
            result.epochs_run = epoch
            msg = f"epoch {epoch}/{epochs} train loss {mean:.5g}"
            if val_loader is not None:
                val = evaluate(model, val_loader, loss_fn)["loss"]
                result.val_loss.append(val)
                msg += f" val loss {val:.5g}"
                if val < best_val:
                    best_val, result.best_epoch, bad_epochs = val, epoch, 0
                    if patience is not None:
                        best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                else:
                    bad_epochs += 1
            else:
                result.best_epoch = epoch
            log.debug(msg)
            if progress is not None:
                progress(epoch, epochs)
            if patience is not None and bad_epochs >= patience:
                log.info("early stopping after epoch %d (best epoch %d)", epoch, result.best_epoch)
                break
        if best_state is not None:
            model.load_state_dict(best_state)
    finally:
        model.train(was_training)
    return result


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: Iterable[tuple[Tensor, Tensor]], loss_fn: Any
) -> dict[str, float]:
    """Mean per-sample loss over ``loader`` (model in eval mode; modes restored afterwards).

    A non-finite loss caused by NaN or infinity in the data raises
    :class:`~optbrain.errors.NonFiniteDataError` naming the batch. For integer targets
    (classification) the result also has ``"accuracy"``: the argmax over the
    class dimension 1 (as ``CrossEntropyLoss`` lays outputs out), or the sign of a single logit.
    """
    device = _device(model)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    total, n, correct, n_pred = 0.0, 0, 0, 0
    classification = True
    try:
        for i, (x, y) in enumerate(loader):
            x, y = x.to(device), y.to(device)
            out = model(x)
            loss = loss_fn(out, y)
            if not torch.isfinite(loss):
                check_batch("evaluation", i, (x, y))  # NaN data is an error, not a NaN metric
            total += _summed(loss_fn, loss, x.shape[0])
            n += x.shape[0]
            if y.dtype.is_floating_point or y.dtype == torch.bool:
                classification = False
            elif classification:
                if out.dim() == y.dim() + 1 and out.shape[1] > 1:
                    pred = out.argmax(dim=1)  # the class dimension, as for CrossEntropyLoss
                else:
                    pred = (out.reshape(y.shape) > 0).to(y.dtype)
                correct += int((pred == y).sum())
                n_pred += y.numel()
    finally:
        for m, mode in modes:
            m.train(mode)
    if n == 0:
        raise EmptyDataError("the loader yielded no samples")
    result = {"loss": total / n}
    if classification and n_pred:
        result["accuracy"] = correct / n_pred
    return result
