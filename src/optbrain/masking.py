"""Pruning masks and how they are attached to a model.

A :class:`Mask` maps *clean* parameter names (as :func:`optbrain.paramdict.named_parameters`
gives them, e.g. ``"0.weight"``) to bool tensors of the parameter's shape; ``True`` = kept.
A Mask is immutable: every operation returns a new Mask, and no method hands out a tensor that the
Mask itself still uses.

:func:`attach` registers a :mod:`torch.nn.utils.parametrize` parametrization, so that
``module.weight`` stays a real attribute whose value is ``original`` with the pruned entries set to
exactly zero. The optimizer keeps training the same ``Parameter`` object (PyTorch now lists it as
``"0.parametrizations.weight.original"``); whatever it does to a pruned entry (momentum, weight
decay, Adam state), the effective weight stays zero, and its gradient through the mask is zero.
Attaching again intersects with the attached mask, so masks only shrink. :func:`detach` removes the
parametrizations and, with ``bake=True``, leaves the masked values in the original parameters, so
``model.state_dict()`` has the same keys (in the same order) as before :func:`attach`.

While a mask is attached, clean names are unchanged but their *order* in
``model.named_parameters()`` is not: PyTorch lists a parametrized tensor after the module's other
parameters (``"0.bias"`` before ``"0.weight"``). Code that flattens ParamDicts should take the key
order from one source rather than assume it survives :func:`attach`.

A parameter object that several modules share (tied weights) is masked in every module attribute
that holds it, so all of its uses see the same mask.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from optbrain import paramdict, safeload
from optbrain.errors import ShapeMismatchError, UnsafeFileError
from optbrain.jsonio import atomic_write
from optbrain.prunable import prunable_names

__all__ = [
    "Mask",
    "apply_",
    "attach",
    "current_mask",
    "detach",
    "load_pruned",
    "pruned_state",
    "restore_pruned",
    "save_pruned",
    "validate",
]

logger = logging.getLogger(__name__)

PruneSpec = Tensor | Sequence[int]


class Mask(Mapping[str, Tensor]):
    """Immutable mapping from clean parameter name to a bool tensor (``True`` = kept).

    ``mask[name]``, :meth:`to_dict` and :meth:`state_dict` return copies; the stored tensors are
    never exposed. Iteration yields names in insertion order. Two masks are equal when they have
    the same names and equal tensors (order does not matter).
    """

    __slots__ = ("_masks",)
    __hash__ = None  # type: ignore[assignment]

    def __init__(self, masks: Mapping[str, Tensor] | None = None) -> None:
        """Copy ``masks``; values must be bool tensors or tensors whose entries are all 0 or 1."""
        checked: dict[str, Tensor] = {}
        for name, value in (masks or {}).items():
            if not isinstance(name, str):
                raise TypeError(f"mask names must be str, got {type(name).__name__}: {name!r}")
            checked[name] = _as_bool(name, value)
        self._masks = checked

    @classmethod
    def _trusted(cls, masks: dict[str, Tensor]) -> Mask:
        """Wrap bool tensors that no one else references (no copy, no checks)."""
        out = cls.__new__(cls)
        out._masks = masks
        return out

    # ----------------------------------------------------------------- constructors
    @classmethod
    def from_dict(cls, d: Mapping[str, Tensor]) -> Mask:
        """Mask from ``{name: tensor}``; tensors must be bool or hold only 0 and 1 (copied)."""
        return cls(d)

    @classmethod
    def ones(cls, model: nn.Module, names: Sequence[str] | None = None) -> Mask:
        """All-kept mask for ``names`` (clean names; any parameter of ``model``).

        By default the weights :func:`optbrain.prunable.prunable_names` chooses by layer kind
        (Linear, Conv, Embedding, recurrent and attention weights; not biases, not normalisation
        gains, not parameters of module kinds it does not know): pass ``names`` to choose.
        """
        if names is None:
            params = paramdict.named_parameters(model)
            params = {n: params[n] for n in prunable_names(model)}
        else:
            params = paramdict.named_parameters(model, names, trainable_only=False)
        return cls._trusted(
            {n: torch.ones(p.shape, dtype=torch.bool, device=p.device) for n, p in params.items()}
        )

    @classmethod
    def from_state_dict(
        cls, state: Mapping[str, Tensor], device: torch.device | str | None = None
    ) -> Mask:
        """Inverse of :meth:`state_dict`; ``device`` moves the tensors (default: leave them)."""
        return cls({n: t.to(device) if device is not None else t for n, t in state.items()})

    # ----------------------------------------------------------------- mapping protocol
    def __getitem__(self, name: str) -> Tensor:
        try:
            return self._masks[name].clone()
        except KeyError:
            raise KeyError(f"mask has no entry {name!r}; it has {list(self._masks)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._masks)

    def __len__(self) -> int:
        return len(self._masks)

    def __contains__(self, name: object) -> bool:
        return name in self._masks

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Mask):
            return NotImplemented
        if self._masks.keys() != other._masks.keys():
            return False
        return all(
            a.shape == (b := other._masks[n]).shape and torch.equal(a, b.to(a.device))
            for n, a in self._masks.items()
        )

    def __repr__(self) -> str:
        return (
            f"Mask({len(self)} tensors, kept {self.kept()}/{self.total()}, "
            f"sparsity {self.sparsity():.4f})"
        )

    def __and__(self, other: Mask) -> Mask:
        return self.intersect(other)

    # ----------------------------------------------------------------- queries
    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._masks)

    def kept(self) -> int:
        """Number of kept entries over all tensors."""
        return sum(int(m.sum()) for m in self._masks.values())

    def total(self) -> int:
        """Number of entries over all tensors."""
        return sum(m.numel() for m in self._masks.values())

    def pruned(self) -> int:
        """Number of pruned entries over all tensors."""
        return self.total() - self.kept()

    def sparsity(self) -> float:
        """``pruned() / total()`` (0.0 for an empty mask)."""
        total = self.total()
        return self.pruned() / total if total else 0.0

    def is_subset_of(self, other: Mask) -> bool:
        """True if every entry kept here is kept in ``other`` (names and shapes must match)."""
        _check_same_layout(self, other, "is_subset_of")
        return all(
            not bool((m & ~other._masks[n].to(m.device)).any()) for n, m in self._masks.items()
        )

    # ----------------------------------------------------------------- new masks
    def intersect(self, other: Mask) -> Mask:
        """Entry-wise logical AND (names and shapes must match)."""
        _check_same_layout(self, other, "intersect")
        return Mask._trusted({n: m & other._masks[n].to(m.device) for n, m in self._masks.items()})

    def with_pruned(self, prune: Mapping[str, PruneSpec]) -> Mask:
        """A new Mask with more entries pruned (entries are never revived).

        ``prune[name]`` is either a bool tensor of the parameter's shape (``True`` = prune) or
        flat indices into the parameter (an integer tensor or a sequence of ints, each in
        ``0 .. numel-1``). Names not in ``prune`` are unchanged.
        """
        new = dict(self._masks)
        for name, spec in prune.items():
            if name not in self._masks:
                raise KeyError(f"cannot prune {name!r}: the mask has {list(self._masks)}")
            current = self._masks[name]
            new[name] = current & ~_prune_flags(name, spec, current)
        return Mask._trusted(new)

    # ----------------------------------------------------------------- export
    def to_dict(self) -> dict[str, Tensor]:
        """Copies of the bool tensors (on their current devices)."""
        return {n: m.clone() for n, m in self._masks.items()}

    def state_dict(self) -> dict[str, Tensor]:
        """Plain ``{name: bool CPU tensor}`` for :func:`torch.save`; see :meth:`from_state_dict`."""
        return {n: m.detach().to("cpu", copy=True) for n, m in self._masks.items()}


# --------------------------------------------------------------------------- model functions
class _MaskParametrization(nn.Module):
    """``X -> where(mask, X, 0)``; ``mask`` is a persistent bool buffer.

    ``param_order`` is the order of the host module's own parameters before optbrain parametrized
    any of them; :func:`detach` restores it (``remove_parametrizations`` would append at the end).
    """

    mask: Tensor

    def __init__(self, mask: Tensor, param_order: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.register_buffer("mask", mask.to(torch.bool, copy=True))
        self.param_order = param_order

    def forward(self, X: Tensor) -> Tensor:
        return torch.where(self.mask, X, X.new_zeros(()))

    def extra_repr(self) -> str:
        return f"kept={int(self.mask.sum())}/{self.mask.numel()}"


def validate(model: nn.Module, mask: Mask | Mapping[str, Tensor]) -> None:
    """Check that every name of ``mask`` is a parameter of ``model`` with the mask's shape.

    Raises ``KeyError`` (listing the valid names) for an unknown name and
    :class:`~optbrain.errors.ShapeMismatchError` (naming the parameter and both shapes) for a
    shape mismatch. Names are clean names; a tied parameter is known by its first name.
    """
    mask = _as_mask(mask)
    params = paramdict.named_parameters(model, trainable_only=False)
    unknown = [n for n in mask if n not in params]
    if unknown:
        raise KeyError(f"mask names unknown parameter(s) {unknown}; the model has {sorted(params)}")
    for name, m in mask._masks.items():
        if m.shape != params[name].shape:
            raise ShapeMismatchError(
                f"mask for parameter {name!r} has shape {tuple(m.shape)}, "
                f"the parameter has shape {tuple(params[name].shape)}"
            )


def attach(model: nn.Module, mask: Mask | Mapping[str, Tensor]) -> Mask:
    """Mask the parameters named in ``mask`` through :mod:`torch.nn.utils.parametrize`.

    Where a mask is already attached it is replaced by ``old AND mask`` in place (no second
    parametrization is stacked; attaching twice is the same as once). The stored original values
    of the pruned entries are set to zero. Raises if a tensor already carries a parametrization
    that is not an optbrain mask. Nothing is changed if any check fails. Returns the attached
    masks of the names in ``mask``.
    """
    mask = _as_mask(mask)
    validate(model, mask)
    params = paramdict.named_parameters(model, trainable_only=False)
    uses = _uses(model)
    plan: list[tuple[str, nn.Parameter, list[tuple[nn.Module, str]]]] = []
    for name in mask:
        p = params[name]
        sites = uses[id(p)]
        for module, attr in sites:
            _check_attachable(module, attr, name)
        plan.append((name, p, sites))

    result: dict[str, Tensor] = {}
    for name, p, sites in plan:
        new = mask._masks[name].to(p.device)
        for module, attr in sites:
            old = _mask_of(module, attr)
            if old is not None:
                new = new & old.mask
        for module, attr in sites:
            old = _mask_of(module, attr)
            if old is None:
                order = _param_order(module)
                parametrize.register_parametrization(module, attr, _MaskParametrization(new, order))
            else:
                old.mask.copy_(new)
        with torch.no_grad():
            p.masked_fill_(~new, 0)
        result[name] = new.clone()
        logger.debug("attached mask to %s: kept %d/%d", name, int(new.sum()), new.numel())
    return Mask._trusted(result)


def current_mask(model: nn.Module, *, include_unmasked: bool = False) -> Mask:
    """The masks attached to ``model`` (keyed by clean name, in parameter order).

    With ``include_unmasked=True`` every trainable parameter without a mask is added as fully
    kept. A tied parameter masked in several places gets the AND of its masks.
    """
    params = paramdict.named_parameters(model, trainable_only=False)
    uses = _uses(model)
    out: dict[str, Tensor] = {}
    trainable = paramdict.named_parameters(model) if include_unmasked else {}
    for name, p in params.items():
        found = [
            m.mask for module, attr in uses[id(p)] if (m := _mask_of(module, attr)) is not None
        ]
        if found:
            combined = found[0].clone()
            for other in found[1:]:
                combined &= other.to(combined.device)
            out[name] = combined
        elif name in trainable:
            out[name] = torch.ones(p.shape, dtype=torch.bool, device=p.device)
    return Mask._trusted(out)


def detach(model: nn.Module, *, bake: bool = True) -> Mask:
    """Remove every optbrain mask from ``model`` and return the masks that were attached.

    ``bake=True``: each parameter keeps its masked value (pruned entries are zero) and its
    identity, so optimizers stay valid and ``model.state_dict()`` has the keys it had before
    :func:`attach`. ``bake=False``: the stored original values are left as they are (pruned entries
    are zero unless something wrote to them after :func:`attach`).
    """
    removed = current_mask(model)
    sites: list[tuple[nn.Module, str]] = []
    orders: list[tuple[nn.Module, tuple[str, ...]]] = []
    for module in model.modules():
        if not parametrize.is_parametrized(module):
            continue
        orders.append((module, _param_order(module)))
        for attr, chain in module.parametrizations.items():
            if not any(isinstance(m, _MaskParametrization) for m in chain):
                continue
            if len(chain) != 1:
                raise ValueError(
                    f"{type(module).__name__}.{attr} carries other parametrizations besides the "
                    f"optbrain mask ({[type(m).__name__ for m in chain]}); remove them first"
                )
            sites.append((module, attr))
    for module in {id(m): m for m, _ in sites}.values():
        _own_class(module)
    for module, attr in sites:
        parametrize.remove_parametrizations(module, attr, leave_parametrized=bake)
    for module, order in orders:
        rank = {n: i for i, n in enumerate(order)}
        own = module._parameters
        items = sorted(own.items(), key=lambda kv: rank.get(kv[0], len(rank)))
        own.clear()
        own.update(items)
    return removed


def _own_class(module: nn.Module) -> None:
    """Give a parametrized module a class object of its own before its parametrizations go.

    ``torch.nn.utils.parametrize`` keeps a parametrized tensor's property on a generated class,
    which ``copy.deepcopy`` shares between a copy and its original; removing the parametrization
    from one would delete the other's property too. A private sibling class with the same body
    makes :func:`detach` touch only ``module``.
    """
    cls = type(module)
    body = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, body)


def apply_(model: nn.Module, mask: Mask | Mapping[str, Tensor]) -> None:
    """Set the pruned entries of the named parameters to zero in place (nothing is attached)."""
    mask = _as_mask(mask)
    validate(model, mask)
    params = paramdict.named_parameters(model, trainable_only=False)
    with torch.no_grad():
        for name, m in mask._masks.items():
            p = params[name]
            p.masked_fill_(~m.to(p.device), 0)


# --------------------------------------------------------------------------- helpers
def _as_bool(name: str, value: object) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"mask for {name!r} must be a Tensor, got {type(value).__name__}")
    value = value.detach()
    if value.dtype == torch.bool:
        return value.clone()
    if value.is_complex() or not bool(((value == 0) | (value == 1)).all()):
        raise ValueError(
            f"mask for {name!r} must be bool or hold only 0 and 1 (dtype {value.dtype})"
        )
    return value != 0


def _as_mask(mask: Mask | Mapping[str, Tensor]) -> Mask:
    return mask if isinstance(mask, Mask) else Mask(mask)


def _check_same_layout(a: Mask, b: Mask, op: str) -> None:
    if not isinstance(b, Mask):
        raise TypeError(f"{op} needs a Mask, got {type(b).__name__}")
    if a._masks.keys() != b._masks.keys():
        only_a = [n for n in a._masks if n not in b._masks]
        only_b = [n for n in b._masks if n not in a._masks]
        raise KeyError(f"{op}: names differ; only in self {only_a}, only in other {only_b}")
    for n, m in a._masks.items():
        if m.shape != b._masks[n].shape:
            raise ShapeMismatchError(
                f"{op}: mask for {n!r} has shape {tuple(m.shape)} here "
                f"and {tuple(b._masks[n].shape)} in the other mask"
            )


def _prune_flags(name: str, spec: PruneSpec, current: Tensor) -> Tensor:
    if isinstance(spec, Tensor):
        t = spec.detach()
    else:
        t = torch.as_tensor(list(spec))
        if t.numel() == 0:
            t = t.to(torch.long)
    t = t.to(current.device)
    if t.dtype == torch.bool:
        if t.shape != current.shape:
            raise ShapeMismatchError(
                f"prune flags for {name!r} have shape {tuple(t.shape)}, "
                f"the mask has shape {tuple(current.shape)}"
            )
        return t
    if t.is_floating_point() or t.is_complex():
        raise TypeError(
            f"prune spec for {name!r} must be bool flags or integer flat indices, got {t.dtype}"
        )
    idx = t.reshape(-1).to(torch.long)
    n = current.numel()
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise IndexError(
            f"flat indices for {name!r} must lie in 0..{n - 1}; "
            f"got range {int(idx.min())}..{int(idx.max())}"
        )
    flags = torch.zeros(n, dtype=torch.bool, device=current.device)
    flags[idx] = True
    return flags.reshape(current.shape)


def _uses(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """``id(parameter) -> [(module, attribute), ...]`` for every place a parameter is used.

    A parametrized attribute is reported as ``(module, "weight")``, not as its ``original``.
    """
    uses: dict[int, list[tuple[nn.Module, str]]] = {}
    seen: set[tuple[int, str]] = set()
    for raw, p in model.named_parameters(remove_duplicate=False):
        path, _, attr = paramdict.clean_name(raw).rpartition(".")
        module = model.get_submodule(path) if path else model
        if (id(module), attr) in seen:
            continue
        seen.add((id(module), attr))
        uses.setdefault(id(p), []).append((module, attr))
    return uses


def _param_order(module: nn.Module) -> tuple[str, ...]:
    """Order of ``module``'s own parameters as it was before optbrain masked any of them."""
    if parametrize.is_parametrized(module):
        for chain in module.parametrizations.values():
            for m in chain:
                if isinstance(m, _MaskParametrization) and m.param_order:
                    return m.param_order
    return tuple(module._parameters)


def _mask_of(module: nn.Module, attr: str) -> _MaskParametrization | None:
    """The optbrain mask on ``module.attr`` (None if there is none)."""
    if isinstance(module, parametrize.ParametrizationList):
        return None
    if not parametrize.is_parametrized(module, attr):
        return None
    for m in module.parametrizations[attr]:
        if isinstance(m, _MaskParametrization):
            return m
    return None


def _check_attachable(module: nn.Module, attr: str, name: str) -> None:
    """Raise unless ``module.attr`` is unparametrized or carries only an optbrain mask."""
    if isinstance(module, parametrize.ParametrizationList):
        raise ValueError(
            f"parameter {name!r} is the input of a parametrization that is not an optbrain mask; "
            "optbrain can only mask unparametrized tensors"
        )
    if not parametrize.is_parametrized(module, attr):
        return
    chain = module.parametrizations[attr]
    if not (len(chain) == 1 and isinstance(chain[0], _MaskParametrization)):
        raise ValueError(
            f"parameter {name!r} already carries parametrizations "
            f"{[type(m).__name__ for m in chain]}; optbrain masks must be the only one"
        )


_PRUNED_FORMAT = "optbrain-pruned-1"


def pruned_state(model: nn.Module) -> dict:
    """The model's weights and attached mask as plain tensors (what :func:`save_pruned` stores and
    the prune–retrain loop checkpoints)."""
    return {
        "format": _PRUNED_FORMAT,
        "mask": current_mask(model).state_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }


def restore_pruned(model: nn.Module, state: Mapping) -> Mask:
    """Inverse of :func:`pruned_state` on a model of the same architecture (with no mask or any
    mask attached): attaches the saved mask, loads the weights, returns the mask now attached."""
    mask = Mask.from_state_dict(state["mask"])
    if len(mask):
        attach(model, mask)
    model.load_state_dict(state["state_dict"])
    return current_mask(model)


def save_pruned(model: nn.Module, path) -> None:
    """Save a pruned model (state dict and its attached mask) atomically with ``torch.save``."""
    atomic_write(path, lambda tmp: torch.save(pruned_state(model), tmp))


def load_pruned(model: nn.Module, path, map_location=None) -> Mask:
    """Load what :func:`save_pruned` wrote into ``model`` (same architecture, no mask or any mask
    attached): attaches the saved mask, loads the weights, returns the mask."""
    try:
        payload = safeload.load(path, map_location=map_location or "cpu")
    except UnsafeFileError:
        raise
    except Exception as exc:  # noqa: BLE001 - re-raised with the cause named
        raise ValueError(f"cannot read pruned model {path}: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != _PRUNED_FORMAT:
        raise ValueError(f"{path} is not an optbrain pruned-model file")
    return restore_pruned(model, payload)


def masked_parameter(m: nn.Module, attr: str) -> tuple[Tensor, Tensor | None] | None:
    """The stored parameter ``attr`` of ``m`` and the 0/1 multiplier of the optbrain masks
    parametrizing it (None when it has none), or None when ``m.attr`` is None. ``ValueError``
    when a parametrization of it is not an optbrain mask (what the curvature engines can read)."""
    if parametrize.is_parametrized(m, attr):
        plist = m.parametrizations[attr]
        masks = [getattr(p, "mask", None) for p in plist]
        if any(mk is None for mk in masks):
            raise ValueError(f"{type(m).__name__}.{attr} has a parametrization that is not a mask")
        mult = masks[0].to(plist.original.dtype)
        for mk in masks[1:]:
            mult = mult * mk
        return plist.original, mult
    p = m._parameters.get(attr)
    return None if p is None else (p, None)
