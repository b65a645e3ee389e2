"""Selectors: which kept entries to delete next, given saliencies and the current mask.

``sparsity`` is a *total* target, never an increment (calls are idempotent; masks only shrink): a
float in [0, 1) is the fraction of the mask's entries to have pruned, an int the number of pruned
entries (as ``amount`` in ``torch.nn.utils.prune``). Ties are broken deterministically by position
(mask name order, then flat index). Entries already pruned are never selected again.

A selector built with ``min_kept=k > 0`` keeps at least k entries of every masked parameter, so
that no layer loses every weight (the named methods of :mod:`optbrain.pruners.presets` use
``min_kept=1`` unless told ``min_kept=0``; the selectors themselves default to 0, the plain
ranking). Within a parameter the entries kept by this guard are those of largest saliency; a
target that cannot be reached with the guard raises :class:`~optbrain.errors.EmptyLayerError`,
naming the largest reachable target.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from .errors import EmptyLayerError, OptbrainError
from .masking import Mask


class TargetExceededError(OptbrainError, ValueError):
    """The mask already prunes more than the requested target (masks only shrink)."""


def target_count(sparsity: float | int | None, total: int, what: str = "sparsity") -> int:
    """Number of pruned entries a target means, with clear errors for bad values.

    Python, NumPy and 0-d tensor numbers are accepted: integers are counts, reals fractions. Both
    have the same bound: a fraction in [0, 1), a count in [0, ``total``) (everything pruned is
    refused either way; 0 is always allowed). ``what`` names the argument in the messages."""
    if sparsity is None:
        raise ValueError(f"this selector needs a {what} target (a fraction in [0, 1) or a count)")
    if isinstance(sparsity, torch.Tensor) and sparsity.numel() == 1 and not sparsity.is_complex():
        sparsity = sparsity.item()
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real):
        raise TypeError(f"{what} must be a float in [0, 1) or an int count, not {sparsity!r}")
    sparsity = int(sparsity) if isinstance(sparsity, numbers.Integral) else float(sparsity)
    if isinstance(sparsity, float):
        if not (0.0 <= sparsity < 1.0) or math.isnan(sparsity):
            raise ValueError(f"{what} {sparsity} out of range: a fraction must be in [0, 1)")
        return int(round(sparsity * total))
    if sparsity != 0 and not 0 <= sparsity < total:
        raise ValueError(
            f"{what} {sparsity} out of range: a count must be in [0, {total}) (there are {total} "
            "entries; pruning all of them is refused, as the fraction 1.0 is)"
        )
    return int(sparsity)


def _check(saliency: Mapping[str, Tensor], mask: Mask) -> None:
    missing = [n for n in mask.names if n not in saliency]
    if missing:
        raise KeyError(f"no saliency for masked parameter(s) {missing}")
    for n in mask.names:
        if saliency[n].shape != mask[n].shape:
            raise ValueError(
                f"saliency of {n} has shape {tuple(saliency[n].shape)}, the mask "
                f"{tuple(mask[n].shape)}"
            )
        if torch.isnan(saliency[n]).any():
            raise ValueError(f"saliency of {n} contains NaN")


def check_min_kept(min_kept: int) -> int:
    if isinstance(min_kept, bool) or not isinstance(min_kept, int) or min_kept < 0:
        raise ValueError(f"min_kept must be an int >= 0, not {min_kept!r}")
    return min_kept


def _guarded(saliency: Mapping[str, Tensor], mask: Mask, names: list[str], min_kept: int) -> Tensor:
    """Flat bool over ``names``: the kept entries that may be deleted, i.e. all kept entries but
    the ``min_kept`` of largest saliency in each parameter (stable: ties keep the later one)."""
    parts = []
    for n in names:
        kept = mask[n].reshape(-1).cpu()
        free = kept.clone()
        alive = int(kept.sum())
        if min_kept and alive:
            s = torch.where(
                kept, saliency[n].detach().reshape(-1).cpu().to(torch.float64), -torch.inf
            )
            top = torch.sort(s, stable=True).indices[-min(min_kept, alive) :]
            free[top] = False
        parts.append(free)
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool)


def _unreachable(target: int, reachable: int, total: int, min_kept: int) -> EmptyLayerError:
    return EmptyLayerError(
        f"pruning {target} of {total} entries would leave a layer with fewer than {min_kept} "
        f"kept entr{'y' if min_kept == 1 else 'ies'}; at most {reachable} "
        f"({reachable / total:.4%}) can be pruned while every masked parameter keeps "
        f"{min_kept}; pass min_kept=0 to allow a layer to lose every weight"
    )


def _smallest_kept(scores: Tensor, kept: Tensor, n: int) -> Tensor:
    """Flat indices of the n smallest scores among kept entries (stable: ties by position)."""
    s = torch.where(kept, scores.to(torch.float64), torch.inf)
    order = torch.sort(s, stable=True).indices
    return order[:n]


class GlobalSelector:
    """Delete the lowest-saliency entries over all masked parameters together, never the last
    ``min_kept`` entries of a parameter (default 0: no guard)."""

    def __init__(self, min_kept: int = 0):
        self.min_kept = check_min_kept(min_kept)

    def __call__(self, saliency: Mapping[str, Tensor], mask: Mask, sparsity) -> Mask:
        _check(saliency, mask)
        names = list(mask.names)
        kept = torch.cat([mask[n].reshape(-1).cpu() for n in names])
        scores = torch.cat([saliency[n].detach().reshape(-1).cpu() for n in names])
        target = target_count(sparsity, kept.numel())
        already = int((~kept).sum())
        if target < already:
            raise TargetExceededError(
                f"target of {target} pruned entries is below the {already} already pruned"
            )
        free = _guarded(saliency, mask, names, self.min_kept)
        if target - already > int(free.sum()):
            raise _unreachable(target, already + int(free.sum()), kept.numel(), self.min_kept)
        idx = _smallest_kept(scores, free, target - already)
        return mask.with_pruned(_split(idx, names, mask))

    def __repr__(self) -> str:
        return f"GlobalSelector(min_kept={self.min_kept})" if self.min_kept else "GlobalSelector()"


def split_target(
    forced: Sequence[int], sizes: Sequence[int], target: int, min_kept: int = 0
) -> list[int]:
    """Split ``target`` deletions over parts of ``sizes`` entries in proportion to their sizes
    (cumulative rounding), each part getting at least its ``forced`` (already deleted) entries and
    at most its size less ``min_kept`` (or its forced count, if larger); the parts add up to
    exactly ``target``.

    Raises :class:`TargetExceededError` if ``target`` is below the forced total,
    ``ValueError`` if it is above the total size and
    :class:`~optbrain.errors.EmptyLayerError` if it needs a part below ``min_kept`` kept."""
    forced_l, sizes_l = [int(v) for v in forced], [int(v) for v in sizes]
    caps = [max(s - min_kept, f) for f, s in zip(forced_l, sizes_l)]
    total = sum(sizes_l)
    if target < sum(forced_l):
        raise TargetExceededError(
            f"target of {target} pruned entries is below the {sum(forced_l)} already pruned"
        )
    if target > total:
        raise ValueError(f"target of {target} pruned entries exceeds the {total} entries")
    if target > sum(caps):
        raise _unreachable(target, sum(caps), total, min_kept)
    if total == 0:
        return [0] * len(sizes_l)
    after, room = sum(forced_l), sum(caps)
    out, done, cum = [], 0, 0
    for f, s, c in zip(forced_l, sizes_l, caps):
        after -= f
        room -= c
        cum += s
        want = round(target * cum / total) - done
        q = min(max(want, f, target - done - room), target - done - after, c)
        out.append(q)
        done += q
    return out


class LayerSelector:
    """Delete the same fraction of every masked parameter, lowest saliency first within each.

    The total target is split over the parameters by size (:func:`split_target`), so the counts add
    up to it exactly; a parameter that already has more entries pruned than its share keeps them and
    the others make up the rest (after a global step, say). No parameter keeps fewer than
    ``min_kept`` entries (the others take the difference)."""

    def __init__(self, min_kept: int = 0):
        self.min_kept = check_min_kept(min_kept)

    def __call__(self, saliency: Mapping[str, Tensor], mask: Mask, sparsity) -> Mask:
        _check(saliency, mask)
        kept = {n: mask[n].reshape(-1).cpu() for n in mask.names}
        forced = [int((~k).sum()) for k in kept.values()]
        quota = split_target(
            forced,
            [k.numel() for k in kept.values()],
            target_count(sparsity, mask.total()),
            self.min_kept,
        )
        prune: dict[str, Tensor] = {}
        for (n, k), q, f in zip(kept.items(), quota, forced):
            prune[n] = _smallest_kept(saliency[n].detach().reshape(-1).cpu(), k, q - f)
        return mask.with_pruned(prune)

    def __repr__(self) -> str:
        return f"LayerSelector(min_kept={self.min_kept})" if self.min_kept else "LayerSelector()"


class ThresholdSelector:
    """Delete every kept entry whose saliency is below ``threshold`` (``sparsity`` caps it), but
    never the last ``min_kept`` entries of a parameter."""

    def __init__(self, threshold: float, min_kept: int = 0):
        self.threshold = float(threshold)
        self.min_kept = check_min_kept(min_kept)

    def __call__(self, saliency: Mapping[str, Tensor], mask: Mask, sparsity=None) -> Mask:
        _check(saliency, mask)
        names = list(mask.names)
        free = _guarded(saliency, mask, names, self.min_kept)
        scores = torch.cat([saliency[n].detach().reshape(-1).cpu() for n in names])
        n = int((free & (scores.to(torch.float64) < self.threshold)).sum())
        if sparsity is not None:
            n = min(n, max(0, target_count(sparsity, mask.total()) - mask.pruned()))
        return mask.with_pruned(_split(_smallest_kept(scores, free, n), names, mask))

    def __repr__(self) -> str:
        extra = f", min_kept={self.min_kept}" if self.min_kept else ""
        return f"ThresholdSelector({self.threshold!r}{extra})"


def _split(flat_idx: Tensor, names: list[str], mask: Mask) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    start = 0
    for n in names:
        size = mask[n].numel()
        sel = flat_idx[(flat_idx >= start) & (flat_idx < start + size)] - start
        out[n] = sel
        start += size
    return out


def selector_for(scope: str, min_kept: int = 1):
    """The selector of a preset's ``scope``: ``"global"`` (one ranking over every masked
    parameter) or ``"layer"`` (each parameter its share); ``min_kept`` entries of each parameter
    are never deleted (1: no layer is emptied)."""
    if scope == "global":
        return GlobalSelector(min_kept)
    if scope == "layer":
        return LayerSelector(min_kept)
    raise ValueError(f"scope must be 'global' or 'layer', not {scope!r}")


# --------------------------------------------------------------------------- weight classes
def _class_groups(classes: Mapping[str, str], mask: Mask) -> dict[str, list[str]]:
    """Class label → the masked parameter names in it (in mask order); every masked parameter
    must have a class."""
    missing = [n for n in mask.names if n not in classes]
    if missing:
        raise KeyError(f"no class for masked parameter(s) {missing}")
    groups: dict[str, list[str]] = {}
    for n in mask.names:
        groups.setdefault(str(classes[n]), []).append(n)
    return groups


class ClassUniformSelector:
    """See, Luong & Manning's (2016) *class-uniform* pruning: every class of parameters loses the
    same fraction of its entries, lowest saliency first within the class.

    ``classes`` maps each masked parameter's name to its class (e.g. ``"encoder"`` for both
    weight matrices of an encoder LSTM); a class may hold several parameters, ranked together.
    The total target is split over the classes by size (:func:`split_target`, so the counts add
    up exactly; a class already pruned beyond its share keeps its deletions). With one class per
    parameter this is :class:`LayerSelector`. ``min_kept`` entries of every parameter are never
    deleted; a class whose share needs them raises
    :class:`~optbrain.errors.EmptyLayerError`."""

    def __init__(self, classes: Mapping[str, str], min_kept: int = 0):
        self.classes = dict(classes)
        self.min_kept = check_min_kept(min_kept)

    def __call__(self, saliency: Mapping[str, Tensor], mask: Mask, sparsity) -> Mask:
        _check(saliency, mask)
        groups = _class_groups(self.classes, mask)
        kept = {c: torch.cat([mask[n].reshape(-1).cpu() for n in ns]) for c, ns in groups.items()}
        forced = [int((~k).sum()) for k in kept.values()]
        target = target_count(sparsity, mask.total())
        quota = split_target(forced, [k.numel() for k in kept.values()], target)
        prune: dict[str, Tensor] = {}
        for (c, names), q, f in zip(groups.items(), quota, forced):
            free = _guarded(saliency, mask, names, self.min_kept)
            if q - f > int(free.sum()):
                raise EmptyLayerError(
                    f"class {c!r} would need {q - f} more deletions but only {int(free.sum())} "
                    f"of its entries may go while each of its parameters keeps {self.min_kept}"
                )
            scores = torch.cat([saliency[n].detach().reshape(-1).cpu() for n in names])
            sub = Mask({n: mask[n] for n in names})
            prune.update(_split(_smallest_kept(scores, free, q - f), names, sub))
        return mask.with_pruned(prune)

    def __repr__(self) -> str:
        extra = f", min_kept={self.min_kept}" if self.min_kept else ""
        return f"ClassUniformSelector({len(set(self.classes.values()))} classes{extra})"


class ClassDistributionSelector:
    """See, Luong & Manning's (2016) *class-distribution* pruning: a threshold per class
    proportional to the class's spread.

    Entry k of class c is deleted when s_k < λ·ν_c, with λ the one global factor that reaches
    the total target; equivalently the entries of lowest s_k/ν_c over all classes go first.
    ``spread`` maps each class to ν_c > 0; without it ν_c is the standard deviation of the
    saliencies of the class's kept entries at the call. For the paper's rule — delete
    |w| < λσ_c, σ_c the standard deviation of the class's weights — use :meth:`for_magnitude`
    with the ``Magnitude`` saliency ½w² (½w² < λ'·½σ_c² ⇔ |w| < √λ'·σ_c).
    ``min_kept`` as :class:`GlobalSelector`'s (the normalisation is constant within a
    parameter, so the entries it keeps are the same)."""

    def __init__(
        self,
        classes: Mapping[str, str],
        spread: Mapping[str, float] | None = None,
        min_kept: int = 0,
    ):
        self.classes = dict(classes)
        if spread is not None:
            bad = {c: v for c, v in spread.items() if not (math.isfinite(v) and v > 0)}
            if bad:
                raise ValueError(f"class spreads must be finite and > 0, got {bad}")
            spread = {str(c): float(v) for c, v in spread.items()}
        self.spread = spread
        self.min_kept = check_min_kept(min_kept)

    @classmethod
    def for_magnitude(
        cls, weights: Mapping[str, Tensor], classes: Mapping[str, str], min_kept: int = 0
    ) -> ClassDistributionSelector:
        """The paper's rule for the ``Magnitude`` saliency ½w²: ν_c = ½σ_c², σ_c the (sample)
        standard deviation of every entry of class c's parameters among ``weights`` (name →
        tensor, e.g. the trained model's, before pruning)."""
        values: dict[str, list[Tensor]] = {}
        for n, c in classes.items():
            if n in weights:
                values.setdefault(str(c), []).append(weights[n].detach().reshape(-1).double())
        sigma = {c: float(torch.cat(v).std()) for c, v in values.items()}
        return cls(classes, {c: 0.5 * s * s for c, s in sigma.items()}, min_kept)

    def _spread(self, saliency: Mapping[str, Tensor], mask: Mask, groups) -> dict[str, float]:
        if self.spread is not None:
            missing = [c for c in groups if c not in self.spread]
            if missing:
                raise KeyError(f"no spread for class(es) {missing}")
            return {c: self.spread[c] for c in groups}
        out = {}
        for c, names in groups.items():
            parts = [
                saliency[n].detach().reshape(-1).cpu()[mask[n].reshape(-1).cpu()] for n in names
            ]
            s = torch.cat(parts).double()
            sd = float(s.std()) if s.numel() > 1 else 0.0
            if not (math.isfinite(sd) and sd > 0):
                raise ValueError(f"class {c!r}: the spread of its saliencies is {sd}; pass spread")
            out[c] = sd
        return out

    def __call__(self, saliency: Mapping[str, Tensor], mask: Mask, sparsity) -> Mask:
        _check(saliency, mask)
        groups = _class_groups(self.classes, mask)
        spread = self._spread(saliency, mask, groups)
        scaled = {n: saliency[n] / spread[str(self.classes[n])] for n in mask.names}
        return GlobalSelector(self.min_kept)(scaled, mask, sparsity)

    def __repr__(self) -> str:
        extra = f", min_kept={self.min_kept}" if self.min_kept else ""
        return f"ClassDistributionSelector({len(set(self.classes.values()))} classes{extra})"
