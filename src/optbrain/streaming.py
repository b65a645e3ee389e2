"""Data that is produced batch by batch instead of held in memory (issue 16, item 2).

Every consumer of a :class:`~optbrain.problem.Problem` (the diagonal estimators, the inverses,
the layer-wise Hessians, the objective) reads the data batch by batch and keeps only running
sums, so its memory does not depend on the number of samples N. What a consumer needs is a
*re-iterable*: each consumer starts a fresh pass, and the problem's first use peeks at the first
batch to validate it. A ``DataLoader``, a list of batches or :class:`BatchStream` are re-iterable;
a generator object is not (a second ``iter()`` would resume it where the last one stopped, so
samples would be silently lost), and :class:`~optbrain.problem.Problem` refuses it.

Passes over the data, for the diagonal estimators (all of them):

* one full pass, plus a peek at the first batch when the problem is first validated and, for the
  column-chunked engines, one more peek to size the chunks (:mod:`optbrain.curvature.budget`);
* N is not needed before the pass: it is counted during it (progress reports ``(done, 0)`` while
  N is unknown and a last ``(N, N)``; once N is known, ``(done, N)``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

__all__ = ["BatchStream", "check_reiterable"]


class BatchStream:
    """A re-iterable over the ``(x, y)`` batches that ``factory()`` yields: every ``iter()`` calls
    ``factory`` again, so each pass sees the whole stream.

    ``factory`` is typically a generator function producing the batches on the fly (read from
    disk, simulated, drawn from a teacher model with a fixed seed); for the passes to agree it
    must yield the same batches every time it is called.

    >>> import torch
    >>> stream = BatchStream(lambda: ((torch.zeros(2, 3), torch.zeros(2)) for _ in range(4)))
    >>> sum(x.shape[0] for x, _ in stream), sum(x.shape[0] for x, _ in stream)
    (8, 8)
    """

    def __init__(self, factory: Callable[[], Iterable[Any]]):
        if not callable(factory):
            raise TypeError(
                f"BatchStream needs a callable returning an iterable of batches, not "
                f"{type(factory).__name__}"
            )
        self.factory = factory

    def __iter__(self) -> Iterator[Any]:
        batches = self.factory()
        if isinstance(batches, BatchStream):
            raise TypeError("BatchStream's factory returned a BatchStream; return its batches")
        return iter(batches)

    def __repr__(self) -> str:
        return f"BatchStream({getattr(self.factory, '__name__', repr(self.factory))})"


def check_reiterable(data: Any, role: str = "data") -> None:
    """Raise ``TypeError`` when ``data`` is a one-shot iterator (a generator object, ``iter(x)``,
    ``map(...)``): a second pass over it would silently miss the samples already read."""
    if isinstance(data, Iterator):
        raise TypeError(
            f"{role} is a one-shot iterator ({type(data).__name__}): every consumer reads the "
            "data in its own pass, so a second pass would silently miss samples; pass a "
            "re-iterable instead, e.g. a DataLoader, a list of batches or "
            "optbrain.streaming.BatchStream(make_batches) with a generator function"
        )
