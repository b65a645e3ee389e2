"""Which parameters a pruner deletes entries of, unless the user chooses: decided by layer kind.

By default the *weights* that connect units are prunable:

* ``Linear``, ``Conv1d/2d/3d`` (and their transposed forms), ``Bilinear``: ``weight``;
* ``Embedding``, ``EmbeddingBag``: ``weight`` (one row per token);
* ``RNN``, ``GRU``, ``LSTM`` (and their cells): every ``weight_ih*`` and ``weight_hh*`` (and
  ``weight_hr*`` of an LSTM with ``proj_size``);
* ``MultiheadAttention``: ``in_proj_weight`` or ``q/k/v_proj_weight``; its ``out_proj`` is a
  ``Linear``;
* a Hugging Face ``Conv1D`` (GPT-2's projections, recognised by class name): ``weight``.

Never by default: biases, normalisation gains and shifts (``BatchNorm``, ``LayerNorm``,
``GroupNorm``, ``InstanceNorm``, ``RMSNorm``), attention biases, and parameters of module kinds
this table does not know; for those, :func:`partition` says why each was left out, and pruners
report the list (``PruneInfo.excluded``). Pass your own names (``Mask.ones(model, names)``) to
prune anything else.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from torch import nn

from . import paramdict

log = logging.getLogger(__name__)

_WEIGHT_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Bilinear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Embedding,
    nn.EmbeddingBag,
)
_RECURRENT: tuple[type[nn.Module], ...] = (nn.RNNBase, nn.RNNCellBase)
_NORMS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
_ATTENTION_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
_HF_CONV1D = "Conv1D"  # transformers.pytorch_utils.Conv1D, not imported (optional dependency)


@dataclass
class Partition:
    """The model's trainable parameters split into ``prunable`` names and ``excluded`` ones, with
    the reason each excluded name was left out."""

    prunable: list[str] = field(default_factory=list)
    excluded: dict[str, str] = field(default_factory=dict)


def _verdict(module: nn.Module, attr: str) -> str | None:
    """None if ``module.attr`` is prunable by default, else why not."""
    if attr.startswith("bias") or attr.endswith("_bias") or "bias_" in attr:
        return "bias"
    if isinstance(module, _NORMS):
        return f"normalisation parameter of {type(module).__name__}"
    if isinstance(module, _WEIGHT_LAYERS) or type(module).__name__ == _HF_CONV1D:
        return None if attr == "weight" else f"{type(module).__name__}.{attr} is not a weight"
    if isinstance(module, _RECURRENT):
        ok = attr.startswith(("weight_ih", "weight_hh", "weight_hr"))
        return None if ok else f"{type(module).__name__}.{attr} is not a weight"
    if isinstance(module, nn.MultiheadAttention):
        return None if attr in _ATTENTION_WEIGHTS else f"MultiheadAttention.{attr}"
    return f"module type {type(module).__name__} is not in optbrain.prunable's table"


def partition(model: nn.Module) -> Partition:
    """Split the trainable parameters of ``model`` (clean names, tied ones once) into prunable
    and excluded; see the module docstring for the rule."""
    owner: dict[int, tuple[nn.Module, str]] = {}
    for module in model.modules():
        for attr, p in _own_parameters(module):
            owner.setdefault(id(p), (module, attr))
    out = Partition()
    for name, p in paramdict.named_parameters(model).items():
        module, attr = owner[id(p)]
        why = _verdict(module, attr)
        if why is None:
            out.prunable.append(name)
        else:
            out.excluded[name] = why
    return out


def _own_parameters(module: nn.Module):
    """(attribute, parameter) pairs the module itself holds, seeing through an attached mask
    (``parametrizations.<attr>.original``)."""
    for attr, p in module._parameters.items():
        if p is not None:
            yield attr, p
    plist = getattr(module, "parametrizations", None)
    if plist is not None:
        for attr, entry in plist.items():
            yield attr, entry.original


def prunable_names(model: nn.Module) -> list[str]:
    """Clean names of the parameters pruned by default (see the module docstring)."""
    part = partition(model)
    unknown = sorted(n for n, why in part.excluded.items() if "not in optbrain.prunable" in why)
    if unknown:
        log.info("not pruned by default (module kinds unknown to optbrain.prunable): %s", unknown)
    return part.prunable
