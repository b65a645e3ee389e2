"""Reading a model as a chain of registry layers (nested ``nn.Sequential`` are flattened)."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from ..errors import UnsupportedModuleError
from ..masking import masked_parameter
from .rules import GENERIC_ESTIMATORS, Rule, rule_for


@dataclass
class Link:
    """One layer of the chain: its module, its rule and the parameters it owns.

    ``params`` maps a rule attribute ("weight") to ``(clean name, parameter, mask or None)``; the
    mask is the 0/1 tensor of an attached optbrain mask (derivatives with respect to the stored
    weight are those of the effective weight times the mask).
    """

    prefix: str
    module: nn.Module
    rule: Rule
    params: dict[str, tuple[str, Tensor, Tensor | None]] = field(default_factory=dict)


def _leaves(module: nn.Module, prefix: str):
    """The layers in forward order; a module listed twice is yielded twice (``named_children``
    would hide the repeat, and the chain would then skip its second use)."""
    if isinstance(module, nn.Sequential):
        for name, child in module._modules.items():
            if child is not None:
                yield from _leaves(child, f"{prefix}{name}.")
    else:
        yield prefix, module


def _param_of(m: nn.Module, attr: str, estimator: str) -> tuple[Tensor, Tensor | None] | None:
    try:
        return masked_parameter(m, attr)
    except ValueError as exc:
        raise UnsupportedModuleError(
            f"{estimator} supports only optbrain masks as parametrizations of "
            f"{type(m).__name__}.{attr}; use one of {', '.join(GENERIC_ESTIMATORS)}"
        ) from exc


def build_chain(model: nn.Module, estimator: str) -> list[Link]:
    """The model's layers in forward order; raises UnsupportedModuleError for unknown layers."""
    chain: list[Link] = []
    covered: set[int] = set()
    names: dict[int, str] = {}  # a parameter used by several layers keeps its first name
    for prefix, m in _leaves(model, ""):
        link = Link(prefix.rstrip(".") if prefix else "", m, rule_for(m, estimator))
        for attr in link.rule.params:
            got = _param_of(m, attr, estimator)
            if got is None:
                continue
            p, mult = got
            name = names.setdefault(id(p), f"{prefix}{attr}")
            link.params[attr] = (name, p, mult)
            covered.add(id(p))
        chain.append(link)
    if any(id(p) not in covered for p in model.parameters()):
        stray = [n for n, p in model.named_parameters() if id(p) not in covered]
        raise UnsupportedModuleError(
            f"{estimator}: parameters {stray} belong to no registered layer; use one of "
            f"{', '.join(GENERIC_ESTIMATORS)}"
        )
    return chain


def shared_parameters(chain: list[Link]) -> set[int]:
    """ids of parameters used by more than one link (tied weights)."""
    seen: dict[int, int] = {}
    for link in chain:
        for _, p, _ in link.params.values():
            seen[id(p)] = seen.get(id(p), 0) + 1
    return {i for i, c in seen.items() if c > 1}
