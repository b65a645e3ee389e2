"""How many samples one backward sweep of the structured engines takes at a time.

A column estimator (exact GGN, Hessian, empirical and Monte-Carlo Fisher) carries K columns per
sample through the sweep, K × width elements each, beside the forward values the sweep keeps
(``kept`` elements per sample: about what a gradient pass keeps for its backward). Sweeping a
whole batch at once would hold K times a gradient pass's memory. :func:`samples_per_sweep`
chooses the chunk so that the columns (and the temporaries of moving them: :data:`LIVE` sets in
all), a rule's scratch (unfolded patches) and the kept values of one chunk stay within about
twice what a gradient pass over the batch holds —
never more than :data:`BUDGET` column elements, and never so few samples that a chunk holds
fewer than :data:`FLOOR` elements in all (below that the per-chunk overhead costs more time than
the memory is worth).
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import Tensor

#: most elements of one column tensor (~64 MB in float32, ~128 MB in float64)
BUDGET = 2**24
#: fewest elements in all a chunk is cut down to (~4 MB in float32)
FLOOR = 2**20


#: column-sized tensors alive at once in a sweep step (the columns in, the columns out, per-sample
#: gradients and their squares)
LIVE = 4


def samples_per_sweep(k: int, width: int, kept: int, batch: int, scratch: int = 0) -> int:
    """Samples per sweep for ``k`` columns of ``width`` elements per sample, ``kept`` forward
    elements per sample, ``scratch`` elements per sample a rule holds besides the columns
    (unfolded patches) and batches of ``batch`` samples: at least 1, and
    ``min(BUDGET/c, max(FLOOR, 2·kept·batch)/(kept + scratch + LIVE·c))`` with c = k·width."""
    cols = max(1, k * width)
    kept = max(kept, 1)
    per_sample = kept + scratch + LIVE * cols
    return max(1, min(BUDGET // cols, max(FLOOR, 2 * kept * batch) // per_sample))


def split(x: Tensor, y: Tensor, size: int | None) -> Iterator[tuple[Tensor, Tensor]]:
    """``(x, y)`` in pieces of at most ``size`` samples (whole when ``size`` is None)."""
    if size is None or x.shape[0] <= size:
        yield x, y
    else:
        for i in range(0, x.shape[0], size):
            yield x[i : i + size], y[i : i + size]
