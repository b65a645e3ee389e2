"""Data-parallel problems over ``torch.distributed``: the ranks of a process group hold shards of
one data set, and every sum over samples is all-reduced.

A :class:`~optbrain.problem.Problem` made while a process group is initialised (``group="auto"``,
the default) treats its ``data`` as this rank's shard of one data set of N = Σ_r N_r samples.
Its objective, every curvature estimate, inverse, layer-wise Hessian and saliency is then the
one of the union of the shards: each consumer of the data accumulates its local sums and calls
:meth:`Problem.all_reduce_ <optbrain.problem.Problem.all_reduce_>` once at the end, which sums
over the ranks (in place, identical bits on every rank). This module holds the primitives
behind that call (:class:`Shards`), the checks that the ranks hold parts of one problem (sample
shapes and dtypes, non-empty shards, equal models by a checksum of parameters and buffers), the
collective error handling (:meth:`Shards.together`: an error on one rank is raised on all of them
instead of leaving the others waiting in a collective), and rank-0-only writing
(:func:`on_rank0`).

Nothing here initialises a process group: the application does (``torchrun`` plus
``torch.distributed.init_process_group``; ``optbrain``'s CLI does it when launched by
``torchrun``, see :func:`init_from_env`). Without one, every function is the single-process
identity.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from .errors import (
    EmptyShardError,
    ModelMismatchError,
    NotDistributedError,
    RemoteRankError,
    ShardMismatchError,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

#: tensors above this many elements are all-reduced on their own (not packed with the others)
_PACK_LIMIT = 2**22

_SPLIT: ContextVar[bool] = ContextVar("optbrain_split_batches", default=False)


def _dist():
    """``torch.distributed`` when it is available and a default group is initialised."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist
    return None


@dataclass(frozen=True)
class Shards:
    """The ranks a problem's data is sharded over: ``group`` (a ``ProcessGroup``, or None for
    the default group), this process's ``rank`` in it and the ``size`` of the group. ``size``
    1 is a single process: every method is then the identity (no collective call)."""

    group: Any = None
    rank: int = 0
    size: int = 1

    @property
    def active(self) -> bool:
        """Whether there is more than one rank."""
        return self.size > 1

    # ------------------------------------------------------------------ reductions
    def device(self) -> torch.device:
        """Where this group's collectives take tensors: the current CUDA device for NCCL, the
        CPU otherwise."""
        dist = _dist()
        if dist is not None and dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def all_reduce_(self, values: T) -> T:
        """Sum ``values`` over the ranks, in place: a tensor, a sequence of tensors or a mapping
        name → tensor (a ParamDict). Small tensors of one dtype travel packed in one buffer;
        returns ``values``. Every rank ends with the same bits."""
        if not self.active:
            return values
        tensors = _tensors(values)
        dev = self.device()
        small: dict[torch.dtype, list[Tensor]] = {}
        for t in tensors:
            if t.numel() > _PACK_LIMIT:
                self._reduce_one(t, dev)
            elif t.numel():
                small.setdefault(t.dtype, []).append(t)
        for group in small.values():
            flat = torch.cat([t.detach().reshape(-1).to(dev) for t in group])
            _dist().all_reduce(flat, group=self.group)
            i = 0
            for t in group:
                t.copy_(flat[i : i + t.numel()].view_as(t))
                i += t.numel()
        return values

    def _reduce_one(self, t: Tensor, dev: torch.device) -> None:
        if t.device == dev and t.is_contiguous():
            _dist().all_reduce(t, group=self.group)
        else:
            buf = t.detach().contiguous().to(dev)
            _dist().all_reduce(buf, group=self.group)
            t.copy_(buf)

    def sum(self, value: float) -> float:
        """A Python number summed over the ranks (in float64)."""
        if not self.active:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64)
        return float(self.all_reduce_(t)[0])

    def count(self, value: int) -> int:
        """An integer summed over the ranks (exact)."""
        if not self.active:
            return int(value)
        t = torch.tensor([int(value)], dtype=torch.int64)
        return int(self.all_reduce_(t)[0])

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's (picklable) ``obj``, in rank order."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.size
        _dist().all_gather_object(out, obj, group=self.group)
        return out

    def broadcast(self, obj: T, src: int = 0) -> T:
        """Rank ``src``'s (picklable) ``obj`` on every rank."""
        if not self.active:
            return obj
        box = [obj]
        _dist().broadcast_object_list(box, src=self._global(src), group=self.group)
        return box[0]

    def all_gather_rows(self, rows: Tensor | None) -> list[Tensor | None]:
        """Every rank's ``rows`` (a 2-D tensor whose row count may differ between ranks, all of
        one dtype and width, or None), in rank order."""
        if not self.active:
            return [rows]
        dist = _dist()
        dev = self.device()
        mine = -1 if rows is None else rows.shape[0]
        width = -1 if rows is None else rows.shape[1]
        meta = torch.tensor([[mine, width]], dtype=torch.int64, device=dev)
        metas = [torch.empty_like(meta) for _ in range(self.size)]
        dist.all_gather(metas, meta, group=self.group)
        sizes = [int(m[0, 0]) for m in metas]
        widths = {int(m[0, 1]) for m in metas if int(m[0, 0]) >= 0}
        if not widths:
            return [None] * self.size
        if len(widths) > 1:
            raise ShardMismatchError(f"the ranks' rows differ in width: {sorted(widths)}")
        top, w = max(max(sizes), 1), widths.pop()
        buf = torch.zeros(top, w, dtype=torch.float64, device=dev)
        if rows is not None:
            buf[: rows.shape[0]] = rows.to(device=dev, dtype=torch.float64)
        bufs = [torch.empty_like(buf) for _ in range(self.size)]
        dist.all_gather(bufs, buf, group=self.group)
        home = rows.device if rows is not None else torch.device("cpu")
        return [None if n < 0 else b[:n].to(home) for b, n in zip(bufs, sizes)]

    def _global(self, rank: int) -> int:
        dist = _dist()
        if self.group is None:
            return rank
        return dist.get_global_rank(self.group, rank)

    def same_generator(self, gen: torch.Generator) -> torch.Generator:
        """Give ``gen`` rank 0's state on every rank (in place): draws that must be equal on
        all ranks (Hutchinson's probes) come out equal even from a fresh seed."""
        if self.active:
            gen.set_state(self.broadcast(gen.get_state()))
        return gen

    # ------------------------------------------------------------------ errors
    @contextmanager
    def together(self, what: str) -> Iterator[None]:
        """Run a block of local work whose failure must stop every rank: on exit the ranks tell
        each other whether they failed; a failing rank re-raises its own error, the others raise
        :class:`~optbrain.errors.RemoteRankError` naming the rank and its error. Without this,
        the ranks that did not fail would wait in their next collective call."""
        if not self.active:
            yield
            return
        try:
            yield
        except Exception as exc:
            self._agree(what, exc)
            raise
        self._agree(what, None)

    def _agree(self, what: str, exc: Exception | None) -> None:
        if self.count(exc is not None) == 0:
            return
        text = None if exc is None else f"{type(exc).__name__}: {exc}"
        messages = self.gather(text)
        if exc is None:
            rank, msg = next((r, m) for r, m in enumerate(messages) if m is not None)
            raise RemoteRankError(f"rank {rank} failed while {what}: {msg}")

    # ------------------------------------------------------------------ checks
    def check_model(self, model: nn.Module) -> None:
        """Raise :class:`~optbrain.errors.ModelMismatchError` on every rank unless all ranks hold
        the same parameters and buffers (compared by :func:`checksum`)."""
        if not self.active:
            return
        mine = checksum(model)
        sums = self.gather(mine)
        odd = [r for r, s in enumerate(sums) if s != sums[0]]
        if odd:
            raise ModelMismatchError(
                f"the ranks hold different models: the parameters and buffers of rank(s) {odd} "
                f"differ from rank 0's (checksums {sums}); broadcast rank 0's state_dict, or "
                "build and train the model identically on every rank"
            )

    def check_shards(self, local: ShardInfo) -> None:
        """Raise on every rank when a rank has no sample (:class:`EmptyShardError`) or the
        ranks' samples differ in shape or dtype (:class:`ShardMismatchError`)."""
        if not self.active:
            return
        infos: list[ShardInfo] = self.gather(local)
        empty = [r for r, i in enumerate(infos) if i.samples == 0]
        if empty:
            counts = ", ".join(f"rank {r}: {i.samples}" for r, i in enumerate(infos))
            raise EmptyShardError(
                f"rank(s) {empty} hold no sample of the problem's data ({counts}); give every "
                "rank a non-empty shard (fewer ranks, or split the data evenly)"
            )
        odd = [r for r, i in enumerate(infos) if i.signature != infos[0].signature]
        if odd:
            parts = "; ".join(f"rank {r}: {infos[r].describe()}" for r in [0, *odd])
            raise ShardMismatchError(
                f"the ranks' data are not shards of one data set: {parts}; every rank must hold "
                "samples of the same shape and dtype and use the same loss"
            )


SINGLE = Shards()
"""One process: no collective calls."""


def average_models_(model: nn.Module, weight: float, s: Shards) -> None:
    """Replace every parameter (and normalisation statistic) of ``model`` by its average over
    the ranks, weighted by ``weight`` (this rank's samples), in place: after each rank retrained
    on its own shard the ranks hold one model again (weight averaging, not the model one
    process would train on the union of the shards). A no-op on one process."""
    if not s.active:
        return
    total = s.sum(float(weight))
    if total <= 0:
        raise ValueError("average_models_: the ranks hold no samples")
    stats = [b for n, b in model.named_buffers() if n.endswith(("running_mean", "running_var"))]
    tensors = [t for t in (*model.parameters(), *stats) if t.is_floating_point()]
    with torch.no_grad():
        for t in tensors:
            t.mul_(float(weight) / total)
        s.all_reduce_(tensors)


@dataclass(frozen=True)
class ShardInfo:
    """What the ranks compare of their shards: the sample count read so far (0: none), and the
    signature of one sample (input and target shapes without the batch axis, dtypes, loss)."""

    samples: int
    signature: tuple = ()

    def describe(self) -> str:
        if not self.signature:
            return "no sample"
        xs, xd, ys, yd, loss = self.signature
        return f"inputs {xd} {list(xs)}, targets {yd} {list(ys)}, loss {loss}"


def shard_info(samples: int, x: Tensor | None, y: Tensor | None, loss: str) -> ShardInfo:
    """The :class:`ShardInfo` of a shard whose first batch is ``(x, y)``."""
    if x is None or y is None:
        return ShardInfo(samples)
    sig = (tuple(x.shape[1:]), str(x.dtype), tuple(y.shape[1:]), str(y.dtype), loss)
    return ShardInfo(samples, sig)


def _tensors(values: Any) -> list[Tensor]:
    if isinstance(values, Tensor):
        return [values]
    if isinstance(values, Mapping):
        return [v for v in values.values() if v is not None]
    if isinstance(values, Sequence):
        return [v for v in values if v is not None]
    raise TypeError(f"all_reduce_ takes a tensor, a sequence or a mapping of them, not {values!r}")


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def checksum(model: nn.Module) -> tuple[int, int]:
    """A checksum of every parameter and buffer of ``model`` (their bits, positions and order):
    two models with the same state give the same pair; any changed bit changes it with
    overwhelming probability (not a cryptographic hash). Computed on the tensors' device."""
    s1 = s2 = 0
    for i, t in enumerate(list(model.parameters()) + list(model.buffers())):
        t = t.detach().contiguous().reshape(-1)
        if t.is_complex():
            t = torch.view_as_real(t).reshape(-1)
        if t.dtype == torch.bool:
            bits = t.to(torch.int64)
        elif t.is_floating_point():
            bits = t.view(_BITS[t.element_size()]).to(torch.int64)
        else:
            bits = t.to(torch.int64)
        weights = torch.arange(bits.numel(), device=bits.device, dtype=torch.int64) % 65521 + 1
        s1 = (s1 * 1000003 + int(bits.sum()) + i) % (1 << 61)
        s2 = (s2 * 1000033 + int((bits * weights).sum()) + bits.numel()) % (1 << 61)
    return s1, s2


def shards(group: Any = "auto") -> Shards:
    """The :class:`Shards` of ``group``: ``"auto"`` the default process group when one is
    initialised (else one process), ``None`` one process, or a ``ProcessGroup``."""
    if group is None:
        return SINGLE
    dist = _dist()
    if dist is None:
        if group != "auto":
            raise ValueError("a process group was given but torch.distributed is not initialised")
        return SINGLE
    if isinstance(group, str):
        if group != "auto":
            raise ValueError(f"group must be 'auto', None or a ProcessGroup, not {group!r}")
        group = None
    return Shards(group, dist.get_rank(group), dist.get_world_size(group))


def world() -> Shards:
    """The default process group's :class:`Shards` (one process when none is initialised)."""
    return shards("auto")


def is_rank0() -> bool:
    """True on rank 0 of the default group, and in a single process."""
    return world().rank == 0


def on_rank0(fn: Callable[[], T], what: str = "writing") -> T | None:
    """Run ``fn`` on rank 0 only (writing files, removing a run); an error there is raised on
    every rank (the others get :class:`~optbrain.errors.RemoteRankError`). Returns ``fn()`` on
    rank 0 and None elsewhere; the ranks leave together."""
    w = world()
    result = None
    with w.together(what):
        if w.rank == 0:
            result = fn()
    return result


def from_rank0(fn: Callable[[], T], what: str = "reading") -> T:
    """Run ``fn`` on rank 0 and give its (picklable) result to every rank; an error there is
    raised on every rank."""
    w = world()
    result = None
    with w.together(what):
        if w.rank == 0:
            result = fn()
    return w.broadcast(result)


def refuse(what: str, hint: str = "") -> None:
    """Raise :class:`~optbrain.errors.NotDistributedError` when the default group has several
    ranks: ``what`` cannot run data-parallel and must not return a per-rank result."""
    w = world()
    if w.active:
        raise NotDistributedError(
            f"{what} cannot run data-parallel ({w.size} ranks): it would return a result of this "
            f"rank's data only{'; ' + hint if hint else ''}"
        )


# ---------------------------------------------------------------------------- splitting batches
@contextmanager
def split_batches(on: bool = True) -> Iterator[None]:
    """Within the block, problems made with ``split=None`` (the default) split every batch of
    their data over the ranks (each rank keeps its contiguous part): for programs where every
    rank loads the whole data set, such as ``optbrain reproduce`` under ``torchrun``."""
    token = _SPLIT.set(on)
    try:
        yield
    finally:
        _SPLIT.reset(token)


def splitting() -> bool:
    """Whether :func:`split_batches` is in force here."""
    return _SPLIT.get()


def part(x: Tensor, y: Tensor, s: Shards) -> tuple[Tensor, Tensor]:
    """Rank ``s.rank``'s contiguous part of the batch ``(x, y)`` (``torch.tensor_split`` into
    ``s.size`` parts: sizes differ by at most one)."""
    if not s.active:
        return x, y
    return torch.tensor_split(x, s.size)[s.rank], torch.tensor_split(y, s.size)[s.rank]


# ---------------------------------------------------------------------------- launching
_INIT_LOCK = threading.Lock()


def init_from_env(backend: str | None = None) -> Shards:
    """Initialise the default process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1 in
    the environment) and none is initialised yet: ``backend`` ``"gloo"`` (CPU) or ``"nccl"``
    (GPU; the process then uses the CUDA device ``LOCAL_RANK``), default gloo without CUDA.
    For applications (the CLI), never called by the library itself. Returns the world's
    :class:`Shards`."""
    import torch.distributed as dist

    size = int(os.environ.get("WORLD_SIZE", "1"))
    with _INIT_LOCK:
        if size > 1 and dist.is_available() and not dist.is_initialized():
            backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
            if backend == "nccl":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend)
            log.info("process group initialised: %s, %d ranks", backend, size)
    return world()
