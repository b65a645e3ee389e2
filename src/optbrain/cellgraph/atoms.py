"""Atoms: the identity of every entry of every value, and the union-find that groups them.

Each entry of each tensor value of the graph carries an *atom* id (``int64``; 0 = a constant
that belongs to no unit). A layer's output unit/channel ``j`` is one atom, shared by all its
entries (every sample, position, time step); the model input has one atom per entry of one
sample. Functions that join entries element by element (``x + y``, ``x * g``, ``where``) unite
the atoms they join; routing functions (views, ``cat``, ``getitem``, ...) are evaluated on the
atom maps themselves, so atoms travel with the entries. A *group* is a class of the union-find:
the entries that must be removed together.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Block:
    """Why a group cannot lose entries: the fx node and the reason."""

    node: str
    reason: str

    def __str__(self) -> str:
        return f"{self.reason} (node {self.node!r})"


class UnionFind:
    """Union-find over atom ids. ``owned[root]``: the group holds units of a layer (a producer);
    blocks are recorded per atom and resolved to groups at the end."""

    def __init__(self) -> None:
        self.parent: list[int] = [0]
        self.owned: list[bool] = [False]
        self.blocks: dict[int, Block] = {}

    def __len__(self) -> int:
        return len(self.parent)

    def fresh(self, shape: tuple[int, ...] | torch.Size, owned: bool = False) -> Tensor:
        """New atoms, one per entry of ``shape``."""
        n = 1
        for s in shape:
            n *= int(s)
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        self.owned.extend([owned] * n)
        return torch.arange(start, start + n, dtype=torch.long).reshape(tuple(shape))

    def find(self, a: int) -> int:
        parent = self.parent
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb or ra == 0 or rb == 0:
            return ra or rb
        if rb < ra:
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.owned[ra] = self.owned[ra] or self.owned[rb]
        return ra

    def union_all(self, ids) -> int:
        root = 0
        for i in ids:
            i = int(i)
            if i:
                root = self.union(root, i) if root else self.find(i)
        return root

    def union_pairs(self, a: Tensor, b: Tensor) -> None:
        """Unite ``a[k]`` with ``b[k]`` for every entry (same shapes; zeros skipped)."""
        a, b = a.reshape(-1), b.reshape(-1)
        keep = (a != 0) & (b != 0) & (a != b)
        if not bool(keep.any()):
            return
        pairs = torch.unique(torch.stack([a[keep], b[keep]], 1), dim=0)
        for x, y in pairs.tolist():
            self.union(x, y)

    def block(self, ids, node: str, reason: str) -> None:
        """Record that the atoms in ``ids`` (a tensor, nested tuples, or ints) cannot go."""
        for t in tensors_in(ids):
            for i in torch.unique(t).tolist():
                if i:
                    self.blocks.setdefault(int(i), Block(node, reason))

    def roots(self) -> Tensor:
        """``table[atom]`` = the group (root id) of every atom."""
        return torch.tensor([self.find(i) for i in range(len(self.parent))], dtype=torch.long)

    def roots_of(self, t: Tensor) -> Tensor:
        """The current root of every entry of ``t`` (zeros stay zero)."""
        if t.numel() == 0:
            return t.clone()
        uniq, inv = torch.unique(t, return_inverse=True)
        r = torch.tensor([self.find(int(i)) for i in uniq.tolist()], dtype=torch.long)
        return r[inv]


def tensors_in(value) -> list[Tensor]:
    """The integer atom tensors inside a value (a tensor or nested tuples/lists/dicts)."""
    if isinstance(value, Tensor):
        return [value] if not value.is_floating_point() and value.dtype == torch.long else []
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in tensors_in(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in tensors_in(v)]
    return []


def merge_along(uf: UnionFind, amap: Tensor, axis: int, node: str, what: str) -> Tensor:
    """One atom per position along ``axis`` of ``amap``: the atoms of each slice united.

    A layer that reads (or acts per channel on) this axis sees each position as one unit, so all
    atoms of a slice belong together (the entries of one input variable at every position), unless
    a slice holds several layer units (e.g. a Linear applied along the length axis of a conv
    output): those are blocked, naming ``node``.
    Returns the ids (0 for a slice of constants), one per position."""
    axis = axis % amap.dim()
    rows = amap.movedim(axis, 0).reshape(amap.shape[axis], -1)
    roots = uf.roots_of(rows)
    if rows.shape[1] == 0:
        return torch.zeros(rows.shape[0], dtype=torch.long)
    big = torch.iinfo(torch.long).max
    lo = torch.where(roots > 0, roots, big).amin(1)
    hi = roots.amax(1)
    out = hi.clone()
    for p in torch.nonzero((hi > 0) & (lo != hi)).flatten().tolist():
        present = [r for r in torch.unique(roots[p]).tolist() if r]
        if sum(uf.owned[r] for r in present) >= 2:
            uf.block(
                roots[p],
                node,
                f"{what} reads several units at one position (a layer applied along another axis)",
            )
            continue
        out[p] = uf.union_all(present)
    return out


def mix_along(uf: UnionFind, amap: Tensor, dims: tuple[int, ...], node: str, reason: str):
    """The atoms of ``amap`` after a function that mixes entries along ``dims`` (a reduction,
    softmax, normalisation): a fibre whose entries all belong to one group keeps it; a fibre
    mixing several groups blocks them and its result gets fresh, blocked atoms. Returns the atom
    map with ``dims`` kept (size 1 where reduced: the caller broadcasts or squeezes)."""
    dims = tuple(sorted(d % amap.dim() for d in dims))
    roots = uf.roots_of(amap)
    if not dims:
        return roots
    hi = roots.amax(dims, keepdim=True)
    big = torch.iinfo(torch.long).max
    lo = torch.where(roots > 0, roots, big).amin(dims, keepdim=True)
    mixed = (hi > 0) & (lo != hi)
    if bool(mixed.any()):
        uf.block(torch.where(mixed.expand_as(roots), roots, 0), node, reason)
        fresh = uf.fresh(hi.shape)
        uf.block(fresh, node, reason)
        hi = torch.where(mixed, fresh, hi)
    return hi


def broadcast_union(
    uf: UnionFind, maps: list[Tensor], shape, node: str = "", reason: str = ""
) -> Tensor:
    """Atoms of an element-wise function of ``maps`` (broadcast to ``shape``): the atoms meeting
    at each output entry are united; constants (0) join nothing.

    An entry broadcast over several output entries (a scalar gain, a per-sample value added to
    every unit) is *shared*: if those entries belong to one group it joins it (a squeeze-and-
    excitation gate per channel), if they belong to several it cannot be removed with any one
    of them, so it is blocked (naming ``node``) and unites nothing."""
    shape = tuple(shape)
    if not maps:
        return torch.zeros(shape, dtype=torch.long)
    padded = [m.reshape((1,) * (len(shape) - m.dim()) + tuple(m.shape)) for m in maps]
    full = [m for m in padded if tuple(m.shape) == shape]
    shared = [m for m in padded if tuple(m.shape) != shape]
    out = full[0].clone() if full else torch.zeros(shape, dtype=torch.long)
    for other in full[1:]:
        uf.union_pairs(out, other)
        out = torch.where(out != 0, out, other)
    for m in shared:
        dims = tuple(i for i, (a, b) in enumerate(zip(m.shape, shape)) if a == 1 and b != 1)
        roots = uf.roots_of(out)
        big = torch.iinfo(torch.long).max
        hi = roots.amax(dims, keepdim=True)
        lo = torch.where(roots > 0, roots, big).amin(dims, keepdim=True)
        mixed = (hi > 0) & (lo != hi)
        if bool(mixed.any()):
            uf.block(torch.where(mixed, m, 0), node, reason or "shared by several units")
        single = (hi > 0) & ~mixed
        uf.union_pairs(torch.where(single, m, 0), torch.where(single, hi, 0))
        out = torch.where(out != 0, out, m.expand(shape))
    return out


# --------------------------------------------------------------------------- compaction
class Gone:
    """A value all of whose entries are removed."""

    def __repr__(self) -> str:
        return "GONE"


GONE = Gone()


def compact(amap: Tensor, drop: Tensor) -> Tensor | Gone | None:
    """``amap`` without the entries flagged in ``drop``, or None if they cannot be deleted as
    a smaller rectangular tensor. Entries are deleted along one axis: every fibre along it loses
    the same number of entries (the other entries keep their order); whole hyperplanes are
    preferred (a channel everywhere), then equal counts per fibre (e.g. different units of each
    layer of a stacked recurrent state)."""
    if not bool(drop.any()):
        return amap
    if bool(drop.all()):
        return GONE
    axes = list(range(amap.dim() - 1, -1, -1))
    for axis in axes:  # whole hyperplanes
        other = tuple(d for d in range(amap.dim()) if d != axis)
        if other and not bool((drop.all(other) == drop.any(other)).all()):
            continue
        keep = ~drop.any(other) if other else ~drop
        return amap.index_select(axis, torch.nonzero(keep).flatten())
    for axis in axes:  # equal counts per fibre
        moved = drop.movedim(axis, -1)
        counts = moved.sum(-1)
        if not bool((counts == counts.reshape(-1)[0]).all()):
            continue
        n = moved.shape[-1] - int(counts.reshape(-1)[0])
        kept = amap.movedim(axis, -1)[~moved].reshape(*moved.shape[:-1], n)
        return kept.movedim(-1, axis)
    return None
