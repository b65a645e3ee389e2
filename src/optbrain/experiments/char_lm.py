"""Training and evaluating small character-level language models on a text of ids.

* :func:`fit`: AdamW (β = 0.9, 0.95; weight decay on matrices only), linear warm-up then cosine
  decay to a tenth of the rate, gradient clipping at 1, random windows drawn with the run's own
  generator; returns the smoothed training loss every ``log_every`` steps.
* :func:`perplexity`: exp(mean next-character NLL) over non-overlapping windows of the held-out
  text (GPTQ's protocol, PAPERS.md §14.5), in nats per character before the exponential.

Models return logits ``(B, T, V)`` or an object with ``.logits`` (``transformers`` models).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.stdlib_text import random_windows, windows
from ..problem import eval_mode

__all__ = ["fit", "logits", "perplexity"]


def logits(model: nn.Module, x: Tensor) -> Tensor:
    out = model(x)
    return out.logits if hasattr(out, "logits") else out


def _nll(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    z = logits(model, x)
    return F.cross_entropy(z.reshape(-1, z.shape[-1]).float(), y.reshape(-1))


def fit(
    model: nn.Module,
    ids: Tensor,
    *,
    steps: int,
    batch: int,
    context: int,
    lr: float,
    seed: int,
    warmup: int = 50,
    weight_decay: float = 0.1,
    log_every: int = 50,
) -> list[tuple[int, float]]:
    """Train ``model`` on random windows of ``ids``; returns ``(step, smoothed loss)`` pairs."""
    gen = torch.Generator().manual_seed(seed)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
    )

    def rate(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, rate)
    model.train()
    curve: list[tuple[int, float]] = []
    smooth = None
    for step in range(steps):
        x, y = random_windows(ids, batch, context, gen)
        loss = _nll(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        value = float(loss.detach())
        smooth = value if smooth is None else 0.9 * smooth + 0.1 * value
        if (step + 1) % log_every == 0 or step + 1 == steps:
            curve.append((step + 1, smooth))
    model.eval()
    return curve


@torch.no_grad()
def perplexity(
    model: nn.Module, ids: Tensor, context: int, batch: int = 64, limit: int | None = None
) -> float:
    """exp(mean NLL per character) over non-overlapping ``context`` windows of ``ids``."""
    x, y = windows(ids, context, limit)
    total, count = 0.0, 0
    with eval_mode(model):
        for xb, yb in zip(x.split(batch), y.split(batch)):
            total += float(_nll(model, xb, yb)) * yb.numel()
            count += yb.numel()
    return math.exp(total / count)
