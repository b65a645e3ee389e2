"""ParamDict helpers.

A *ParamDict* is a ``dict[str, Tensor]`` keyed by the names of ``model.named_parameters()`` as a
user sees them. When a mask is attached through :mod:`torch.nn.utils.parametrize`, PyTorch renames
``"0.weight"`` to ``"0.parametrizations.weight.original"``; optbrain keys everything by the *clean*
name (``"0.weight"``) so that curvature, saliencies and masks keep their keys whether or not a mask
is attached.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping

import torch
from torch import Tensor, nn

ParamDict = dict[str, Tensor]

_PARAMETRIZED = ".parametrizations."
_ORIGINAL = ".original"


def clean_name(raw: str) -> str:
    """Map a raw ``named_parameters`` name to the user-facing one (strip parametrize wrappers)."""
    if raw.startswith("parametrizations."):
        raw = "." + raw
    if _PARAMETRIZED in raw and raw.endswith(_ORIGINAL):
        head, tail = raw.split(_PARAMETRIZED, 1)
        raw = (head + "." if head else "") + tail[: -len(_ORIGINAL)]
    return raw.lstrip(".")


def named_parameters(
    model: nn.Module, names: Iterable[str] | None = None, *, trainable_only: bool = True
) -> dict[str, nn.Parameter]:
    """Parameters of ``model`` keyed by clean name (tied parameters appear once, first name wins).

    ``names`` restricts the result; an unknown name raises ``KeyError`` listing the valid ones.
    """
    out: dict[str, nn.Parameter] = {}
    for raw, p in model.named_parameters():
        if trainable_only and not p.requires_grad:
            continue
        out[clean_name(raw)] = p
    if names is None:
        return out
    wanted = list(names)
    missing = [n for n in wanted if n not in out]
    if missing:
        raise KeyError(f"unknown parameter name(s) {missing}; the model has {sorted(out)}")
    return {n: out[n] for n in wanted}


def raw_names(model: nn.Module) -> dict[str, str]:
    """Clean name -> raw name (as :func:`torch.func.functional_call` expects it)."""
    return {clean_name(raw): raw for raw, _ in model.named_parameters()}


def zeros_like(params: Mapping[str, Tensor], dtype: torch.dtype | None = None) -> ParamDict:
    return {k: torch.zeros_like(v, dtype=dtype or v.dtype) for k, v in params.items()}


def apply(fn: Callable[..., Tensor], *dicts: Mapping[str, Tensor]) -> ParamDict:
    """``{k: fn(d1[k], d2[k], ...)}`` over the keys of the first dict."""
    return {k: fn(*(d[k] for d in dicts)) for k in dicts[0]}


def flatten(d: Mapping[str, Tensor]) -> Tensor:
    """Concatenate the values (in key order) into one 1-D tensor."""
    return torch.cat([v.reshape(-1) for v in d.values()]) if d else torch.empty(0)


def unflatten(vec: Tensor, like: Mapping[str, Tensor]) -> ParamDict:
    """Inverse of :func:`flatten` for the shapes and key order of ``like``."""
    out: ParamDict = {}
    i = 0
    for k, v in like.items():
        n = v.numel()
        out[k] = vec[i : i + n].reshape(v.shape)
        i += n
    if i != vec.numel():
        raise ValueError(f"vector has {vec.numel()} entries, the ParamDict {i}")
    return out


def numel(d: Mapping[str, Tensor]) -> int:
    return sum(v.numel() for v in d.values())


def kth_smallest(d: Mapping[str, Tensor], k: int) -> Tensor:
    """The k-th smallest value (1-based) over all entries of all tensors."""
    flat = flatten(d)
    if not 1 <= k <= flat.numel():
        raise ValueError(f"k={k} out of range 1..{flat.numel()}")
    return flat.kthvalue(k).values


def to(d: Mapping[str, Tensor], dtype: torch.dtype | None = None, device=None) -> ParamDict:
    return {k: v.to(dtype=dtype, device=device) for k, v in d.items()}


@contextlib.contextmanager
def restored_on_error(params: Mapping[str, Tensor]) -> Iterator[None]:
    """Snapshot ``params`` and copy the snapshot back in place if the block raises anything
    (including ``KeyboardInterrupt``): a pruner that updates weights never leaves them half done."""
    snapshot = {k: p.detach().clone() for k, p in params.items()}
    try:
        yield
    except BaseException:
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(snapshot[k])
        raise
