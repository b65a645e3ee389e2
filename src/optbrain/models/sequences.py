"""Identification sequences as optbrain data, and what a *sample* of a simulated sequence is.

A :class:`~optbrain.problem.Problem` averages a per-sample loss over samples (E = (1/N) Σ_n ℓ_n).
For a model simulated over time the samples cannot be single time steps: ŷ(k) of an output-error
model depends on every earlier output of the same run. Here a sample is one **segment** of the
sequence, simulated from its own initial conditions:

* x_n: the segment's L × 2 rows (u(k), measured y(k)), k = s_n..s_n + L − 1;
* y_n: the measured outputs y(k) of the segment's predicted steps, (L − start) × 1, where
  ``start`` is the model's (its orders, or a warm-up);
* ℓ_n = ``MSELoss()`` = the mean squared simulation error over those L − start steps, so
  E(θ) = (1/N) Σ_n 1/(L − start) Σ_k (ŷ_n(k) − y_n(k))², and for the GGN with ∂²ℓ_n/∂ŷ² = 2/(L −
  start)·I, diag G = (1/N) Σ_n 2/(L − start) Σ_k (∂ŷ_n(k)/∂w)², with ∂ŷ_n(k)/∂w through every
  fed-back output (PAPERS.md §14.1).

Segments start every L − start samples, so that consecutive segments overlap by exactly the
``start`` samples the next one needs as initial conditions and every y(k) with k ≥ start is
predicted once; samples at the end that do not fill a segment are left out. ``segment=None`` makes
the whole sequence one sample (N = 1), the textbook simulation error. Shorter segments cost less
per training step and batch the recurrence; they leave out only how an error at a segment's start
would propagate beyond L steps, which for a stable process with fading memory is negligible once L
is several settling times.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from ..problem import Problem

log = logging.getLogger(__name__)

__all__ = ["frame", "sequence_problem", "simulation_error"]


def _column(name: str, v: Tensor) -> Tensor:
    v = torch.as_tensor(v)
    if v.dim() == 1:
        v = v.unsqueeze(1)
    if v.dim() != 2 or v.shape[1] != 1:
        raise ValueError(f"{name} must be a sequence of shape (T,) or (T, 1); got {tuple(v.shape)}")
    if not v.is_floating_point():
        raise TypeError(f"{name} must be floating point, not {v.dtype}")
    return v


def frame(u: Tensor, y: Tensor, start: int, segment: int | None = None) -> tuple[Tensor, Tensor]:
    """``(X, Y)``: X is N × L × 2 (u, y), Y is N × (L − start) × 1 (see the module docstring)."""
    u, y = _column("u", u), _column("y", y)
    if u.shape[0] != y.shape[0]:
        raise ValueError(f"u has {u.shape[0]} samples but y has {y.shape[0]}")
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise ValueError(f"start must be an int >= 0, not {start!r}")
    t = u.shape[0]
    length = t if segment is None else segment
    if isinstance(length, bool) or not isinstance(length, int):
        raise TypeError(f"segment must be an int or None, not {segment!r}")
    if length <= start:
        raise ValueError(
            f"a segment of {length} samples is too short for a model that needs {start} initial "
            f"samples (its orders or warm-up); give segment > {start}"
        )
    if t < length:
        raise ValueError(
            f"the sequence has {t} samples, fewer than one segment of {length} (the model needs "
            f"more than {start})"
        )
    step = length - start
    offsets = range(0, t - length + 1, step)
    left = t - (offsets[-1] + length)
    if left:
        log.debug("frame: the last %d samples do not fill a segment and are left out", left)
    xy = torch.cat([u, y], 1)
    x = torch.stack([xy[o : o + length] for o in offsets])
    return x, x[:, start:, 1:].clone()


def sequence_problem(
    model: nn.Module,
    u: Tensor,
    y: Tensor,
    segment: int | None = None,
    loss_fn=None,
) -> Problem:
    """The :class:`Problem` of ``model`` (with a ``start`` attribute) on one sequence, framed by
    :func:`frame`; ``loss_fn`` defaults to ``MSELoss()``."""
    start = getattr(model, "start", None)
    if start is None:
        raise TypeError(
            f"{type(model).__name__} has no 'start' attribute (the first predicted sample)"
        )
    loss_fn = loss_fn if loss_fn is not None else nn.MSELoss()
    return Problem(model, loss_fn, frame(u, y, start, segment))


@torch.no_grad()
def simulation_error(
    model: nn.Module, u: Tensor, y: Tensor, *, start: int | None = None, simulate: bool = True
) -> float:
    """Mean squared error of the model run over the whole sequence against ``y`` at
    k = ``start``..T−1 (default: the model's own ``start``; a larger common ``start`` compares
    models of different orders on the same samples). ``simulate=True`` runs a model that has a
    ``simulate`` method (a NARX model) in simulation mode; others run their ``forward``."""
    from ..problem import eval_mode

    u, y = _column("u", u), _column("y", y)
    own = model.start
    start = own if start is None else start
    if start < own:
        raise ValueError(f"start ({start}) must be >= the model's start ({own})")
    x = torch.cat([u, y], 1).unsqueeze(0).to(next(model.parameters()).dtype)
    run = model.simulate if simulate and hasattr(model, "simulate") else model
    with eval_mode(model):
        out = run(x)[0, start - own :, 0]
    return float(((out - y[start:, 0].to(out.dtype)) ** 2).mean())
