"""Which layers of a model are quantised, and which are skipped and why.

Quantisable: every ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d`` and ``transformers`` ``Conv1D``
anywhere in the module tree (attention projections written as ``nn.Linear`` included). Skipped,
with the reason in the report:

* the parameters of ``nn.MultiheadAttention``: its ``in_proj_weight`` is a bare parameter and
  its ``out_proj`` Linear is never called as a module (``F.multi_head_attention_forward`` reads
  its weight), so forward hooks see neither; write attention with ``nn.Linear`` projections
  (as :mod:`optbrain.models.transformer` does) to quantise it;
* a layer whose weight is tied to another parameter (GPT-2's ``lm_head`` shares the token
  embedding): quantising it would change the embedding too;
* layers outside ``layers`` or matched by ``exclude`` (what the caller asked for).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

from torch import nn
from torch.nn.utils import parametrize

from ..curvature.calibration import is_layer, is_transposed_linear
from ..errors import UnsupportedModuleError

__all__ = ["find_layers", "layer_kind"]


def layer_kind(module: nn.Module) -> str:
    """``"Linear"``, ``"Conv1d"``, ``"Conv2d"`` or ``"Conv1D"`` (transformers)."""
    if is_transposed_linear(module):
        return "Conv1D"
    for cls in (nn.Linear, nn.Conv1d, nn.Conv2d):
        if isinstance(module, cls):
            return cls.__name__
    raise UnsupportedModuleError(f"{type(module).__name__} is not a quantisable layer")


def _matches(path: str, patterns: Sequence[str]) -> bool:
    return any(path == p or fnmatch.fnmatchcase(path, p) for p in patterns)


def find_layers(
    model: nn.Module,
    layers: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """(path → module of the layers to quantise, path → reason of those skipped), in module
    order. ``layers``: module paths or shell patterns (``"blocks.*.fc1"``) to quantise (default:
    every quantisable layer); ``exclude``: paths or patterns to leave alone. A name in
    ``layers`` that matches no quantisable layer raises ``ValueError``."""
    skipped, inside_mha = _attention_skips(model)
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    found: dict[str, nn.Module] = {}
    for path, m in model.named_modules():
        if not is_layer(m) or path in inside_mha:
            continue
        if parametrize.is_parametrized(m, "weight"):
            raise UnsupportedModuleError(
                f"layer {path!r} has a parametrization on its weight (an attached mask?); "
                "bake it first, e.g. optbrain.masking.detach(model, bake=True)"
            )
        wname = f"{path}.weight" if path else "weight"
        tied = [n for n in owners.get(id(m.weight), []) if n != wname]
        if tied:
            skipped[path] = f"weight tied to {', '.join(tied)}"
            continue
        found[path] = m
    _select(found, skipped, layers, exclude)
    return found, skipped


def _attention_skips(model: nn.Module) -> tuple[dict[str, str], set[str]]:
    """nn.MultiheadAttention modules (skipped, with the reason) and their out_proj paths."""
    skipped: dict[str, str] = {}
    inside: set[str] = set()
    for path, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            skipped[path] = (
                "nn.MultiheadAttention: in_proj_weight and out_proj are not called as modules, "
                "so forward hooks cannot calibrate them (write attention with nn.Linear)"
            )
            inside.add(f"{path}.out_proj" if path else "out_proj")
    return skipped, inside


def _select(found: dict, skipped: dict, layers, exclude) -> None:
    """Keep the layers ``layers`` names (all by default) and not ``exclude`` (in place)."""
    if layers is not None:
        unknown = [p for p in layers if not any(_matches(q, [p]) for q in found)]
        if unknown:
            raise ValueError(
                f"layers {unknown} match no quantisable layer; quantisable: {list(found)}"
                + (f"; skipped: {list(skipped)}" if skipped else "")
            )
        for path in list(found):
            if not _matches(path, layers):
                del found[path]
    for path in list(found):
        if _matches(path, exclude):
            skipped[path] = "excluded"
            del found[path]
