"""Full-batch L-BFGS training with early stopping on a validation loss.

The quasi-Newton counterpart of :func:`optbrain.train.train` for small models fitted to all of
their data at once, as system-identification practice does (NNSYSID retrains with
Levenberg–Marquardt, PAPERS.md §14.4): Adam needs thousands of full-batch steps where L-BFGS needs
hundreds of function evaluations. The objective is the mean of ``loss_fn`` over the batches of
``data`` (each batch weighted by its share of the samples). Training runs in chunks of
``check_every`` L-BFGS iterations (strong Wolfe line search); after each chunk the validation loss
is measured, and with ``patience`` training stops after that many chunks without improvement and
the best weights are restored. With a mask attached the stored weights are trained and pruned
entries stay zero (their gradient through the mask is zero).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import Tensor, nn

from .errors import EmptyDataError, NonFiniteLossError
from .train import TrainResult, evaluate

log = logging.getLogger(__name__)

__all__ = ["train_lbfgs"]


def _batches(data: Any) -> list[tuple[Tensor, Tensor]]:
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        return [data]
    out = list(data)
    if not out or sum(x.shape[0] for x, _ in out) == 0:
        raise EmptyDataError("the training data yielded no samples")
    return out


def _check(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, not {value!r}")


def train_lbfgs(
    model: nn.Module,
    data: Any,
    loss_fn: Any,
    *,
    max_iter: int,
    val_data: Any = None,
    patience: int | None = None,
    check_every: int = 10,
    history_size: int = 20,
) -> TrainResult:
    """Minimise the mean training loss by full-batch L-BFGS for at most ``max_iter`` iterations.

    ``data`` and ``val_data`` are one ``(X, Y)`` pair or a list of batches. Returns a
    :class:`~optbrain.train.TrainResult` whose "epochs" are the chunks of ``check_every``
    iterations (``train_loss``/``val_loss`` after each; ``best_epoch``: the chunk of the lowest
    validation loss, whose weights the model holds when ``patience`` is given, else the last).
    """
    _check("max_iter", max_iter, 0)
    _check("check_every", check_every, 1)
    if patience is not None:
        _check("patience", patience, 1)
        if val_data is None:
            raise ValueError("patience (early stopping) needs val_data")
    batches = _batches(data)
    val = _batches(val_data) if val_data is not None else None
    n = sum(x.shape[0] for x, _ in batches)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.LBFGS(
        params,
        lr=1.0,
        max_iter=check_every,
        history_size=history_size,
        tolerance_grad=1e-12,
        tolerance_change=1e-15,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        opt.zero_grad(set_to_none=True)
        total = _mean_loss(model, batches, loss_fn, n)
        if not torch.isfinite(total):
            raise _LeftFiniteRegion(f"the training loss became {float(total.detach())}")
        total.backward()
        return total

    with torch.no_grad():
        start = float(_mean_loss(model, batches, loss_fn, n))
    if not math.isfinite(start):
        raise NonFiniteLossError(f"the training loss is {start} before training")
    result = TrainResult(epochs_run=0)
    best, bad = math.inf, 0
    kept = _snapshot(model)  # the weights to keep: the best checked (patience) or the last
    for chunk in range(1, math.ceil(max_iter / check_every) + 1):
        try:
            loss = float(opt.step(closure).detach())
        except _LeftFiniteRegion as exc:
            log.warning("L-BFGS stopped in chunk %d: %s; keeping the last good weights", chunk, exc)
            model.load_state_dict(kept)
            return result
        result.train_loss.append(loss)
        result.epochs_run = chunk
        v = evaluate(model, val, loss_fn)["loss"] if val is not None else -math.inf
        if val is not None:
            result.val_loss.append(v)
        if v < best or val is None:
            best, result.best_epoch, bad = v, chunk, 0
        else:
            bad += 1
        if patience is None or bad == 0:
            kept = _snapshot(model)
        if patience is not None and bad >= patience:
            log.debug("L-BFGS: early stop after chunk %d (best %d)", chunk, result.best_epoch)
            break
    model.load_state_dict(kept)
    return result


def _mean_loss(model: nn.Module, batches: list[tuple[Tensor, Tensor]], loss_fn: Any, n: int):
    """The mean training loss: Σ_b loss_fn(model(x_b), y_b) · |b| / n."""
    return sum(loss_fn(model(x), y) * (x.shape[0] / n) for x, y in batches)


class _LeftFiniteRegion(NonFiniteLossError):
    """The loss became NaN or infinite during a line search."""


def _snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {k: t.detach().clone() for k, t in model.state_dict().items()}
