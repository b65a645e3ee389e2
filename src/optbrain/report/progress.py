"""Progress bars for long steps: tqdm on stderr, or nothing.

Library functions take ``progress=True|False`` and report through :class:`Bars`; they never print.
Without tqdm installed the bars are silently (one logged warning) replaced by no-ops.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["Bars", "Stage"]

Progress = Callable[[int, int], None]


class Stage:
    """One bar; call it as ``stage(done, total)`` (the ``progress`` callback protocol of optbrain)
    or ``stage(done, total, text)`` (the experiments' protocol), and add a short status text with
    :meth:`note`."""

    def __init__(self, bar: Any):
        self._bar = bar

    def __call__(self, done: int, total: int, text: str | None = None) -> None:
        bar = self._bar
        if bar.total != total:
            bar.total = total
            bar.refresh()
        if text is not None:
            bar.set_postfix_str(text, refresh=False)
        bar.update(done - bar.n)

    def note(self, text: str) -> None:
        self._bar.set_postfix_str(text, refresh=True)


class Bars:
    """A factory of tqdm bars on stderr, one per stage; a no-op when disabled or tqdm is missing."""

    def __init__(self, enabled: bool):
        self._tqdm = None
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                log.warning("progress bars need tqdm (`pip install 'optbrain[cli]'`); none shown")
            else:
                self._tqdm = tqdm

    @property
    def enabled(self) -> bool:
        return self._tqdm is not None

    @contextmanager
    def stage(
        self, desc: str, total: int | None = None, leave: bool = False
    ) -> Iterator[Stage | None]:
        """A bar for the duration of the ``with`` block; yields ``None`` when bars are off."""
        if self._tqdm is None:
            yield None
            return
        bar = self._tqdm(
            desc=f"{desc:<22}", total=total, file=sys.stderr, leave=leave, dynamic_ncols=True
        )
        try:
            yield Stage(bar)
        finally:
            bar.close()
