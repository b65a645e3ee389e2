"""Reproductions of published pruning experiments, one module per paper.

Every experiment module has ``NAME``, ``SUMMARY``, a ``Config`` dataclass (defaults = full setting,
``Config.quick()`` = CI setting) and ``run(config, out_dir, progress=None) -> Result`` (see
:mod:`optbrain.experiments.base`). Modules are imported only when asked for, so listing the
experiments costs nothing::

    from optbrain import experiments
    experiments.names()                                  # ["lecun1990", ...]
    result = experiments.run("lecun1990", "out/", quick=True, overrides=["seeds=0,1"])
    result.held, [c.name for c in result.claims]
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from .base import Claim, Config, Progress, Result, apply_overrides, parse_set_args

__all__ = [
    "REGISTRY",
    "Claim",
    "Config",
    "ExperimentSpec",
    "Progress",
    "Result",
    "apply_overrides",
    "get",
    "make_config",
    "names",
    "parse_set_args",
    "run",
]


@dataclass(frozen=True)
class ExperimentSpec:
    """Where an experiment lives and what it reproduces (available without importing it)."""

    name: str
    module: str
    summary: str


REGISTRY: dict[str, ExperimentSpec] = {
    spec.name: spec
    for spec in (
        ExperimentSpec(
            "lecun1990",
            "optbrain.experiments.lecun1990",
            "Optimal Brain Damage (LeCun, Denker & Solla 1990), figures 1a, 1b, 2 on the 8x8 "
            "digits with a shared-weight CNN and an MLP",
        ),
        ExperimentSpec(
            "cibas1994-waveform",
            "optbrain.experiments.cibas1994_waveform",
            "Optimal Cell Damage variable selection (Cibas et al. 1994/96) on Breiman's waveform "
            "data with 19 pure-noise inputs, against permutation importance and mutual information",
        ),
        ExperimentSpec(
            "digits-ocd",
            "optbrain.experiments.digits_ocd",
            "Optimal Cell Damage on the 8x8 digits: which pixels OCD keeps (saliency image) and "
            "accuracy against pixels kept, against fan-out magnitude and random orders",
        ),
        ExperimentSpec(
            "hassibi1993-xor",
            "optbrain.experiments.hassibi1993_xor",
            "Optimal Brain Surgeon (Hassibi & Stork 1993) on XOR: one weight of a trained 2-2-1 "
            "net deleted by magnitude, OBD and OBS over many initialisations; Hessian "
            "off-diagonal mass",
        ),
        ExperimentSpec(
            "hassibi1993-monk",
            "optbrain.experiments.hassibi1993_monk",
            "Optimal Brain Surgeon and Unit-OBS (Hassibi & Stork 1993; Stahlberger & Riedmiller "
            "1997) on MONK-1/2/3: weights left at unchanged train/test accuracy, OBS vs OBD vs "
            "magnitude",
        ),
        ExperimentSpec(
            "hassibi1994-mixture",
            "optbrain.experiments.hassibi1994_mixture",
            "OBS extensions (Hassibi, Stork, Wolff & Watanabe 1994): test error against weights "
            "removed on the 5-d Gaussian mixture, OBS (no retraining) vs OBD with 60 retraining "
            "epochs per step",
        ),
        ExperimentSpec(
            "nnsysid-sunspots",
            "optbrain.experiments.nnsysid_sunspots",
            "NNSYSID's sunspot demo: the 12-8-1 tapped-delay net (113 weights) with weight decay, "
            "pruned by OBS, OBD and γOBD with retraining, FPE selection; NMSE beside WRH and TAR",
        ),
        ExperimentSpec(
            "pedersen1996-mackey-glass",
            "optbrain.experiments.pedersen1996_mackey_glass",
            "γOBD and γOBS (Pedersen, Hansen & Larsen 1996) on Mackey-Glass: 6-10-1 net, 250 "
            "training / 8500 test samples; training, test and FPE against parameters, estimated "
            "vs actual test error per weight",
        ),
        ExperimentSpec(
            "gorodkin1993-contiguity",
            "optbrain.experiments.gorodkin1993_contiguity",
            "OBD on the contiguity problem (Gorodkin et al. 1993): learning curves with and "
            "without OBD, the smallest-successful-architecture heuristic, OBD's predicted vs "
            "measured ΔE",
        ),
        ExperimentSpec(
            "tresp1997-ebd",
            "optbrain.experiments.tresp1997_ebd",
            "Early Brain Damage (Tresp, Neuneier & Zimmermann 1997), Table 1: early stopping, "
            "prune 50 %, retrain; OBD vs ESP vs EBD on scikit-learn's breast-cancer (WDBC) and "
            "diabetes data",
        ),
        ExperimentSpec(
            "larsen1996-validation",
            "optbrain.experiments.larsen1996_validation",
            "Validation-set OBD (Larsen, Hansen, Svarer & Ohlsson 1996) against training-set OBD "
            "and FPE selection on a linear model and a small net: test error of the selected "
            "architectures",
        ),
        ExperimentSpec(
            "pedersen1995-recurrent-sunspots",
            "optbrain.experiments.pedersen1995_recurrent_sunspots",
            "The pruned 4-4-1 recurrent sunspot net (Pedersen & Hansen 1995): OBS with weight "
            "decay, FPE selection; lag inputs kept and the impulse response of the selected net",
        ),
        ExperimentSpec(
            "quantise-transformer",
            "optbrain.experiments.quantise_transformer",
            "GPTQ / OBQ / RTN post-training quantisation and layer-wise OBS pruning of a small "
            "character-level transformer trained offline on Python's standard library (Frantar "
            "et al. 2023), perplexity against the GPTQ paper's OPT-125M ordering",
        ),
        ExperimentSpec(
            "chaber2018-ph",
            "optbrain.experiments.chaber2018_ph",
            "OBD through time for output-error models of the pH neutralisation reactor (Chaber & "
            "Ławryńczuk 2018): parameters removed and validation error, full vs pruned, against "
            "magnitude pruning, NARX, GRU/LSTM and a sysidentpy NARMAX model",
        ),
        ExperimentSpec(
            "extreme-sparsity",
            "optbrain.experiments.extreme_sparsity",
            "OBD (LeCun's diagonal through time) vs the course project's squared-gradient 'OBD', "
            "SNIP, magnitude (class-blind/uniform/distribution) and random at 50-99.5 % sparsity, "
            "with and without retraining, on an LSTM+attention number-word translator (BLEU) "
            "and the digits MLP",
        ),
    )
}


def names() -> list[str]:
    """The registered experiment names, sorted."""
    return sorted(REGISTRY)


def get(name: str) -> ModuleType:
    """The experiment module ``name`` (imported now); ``KeyError`` lists the valid names."""
    try:
        spec = REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown experiment {name!r}; choose from {', '.join(names())}") from None
    return importlib.import_module(spec.module)


def make_config(
    name: str, quick: bool = False, overrides: Mapping[str, Any] | Iterable[str] | None = None
) -> Config:
    """The experiment's full (or ``quick``) config with ``overrides`` (``"key=value"`` strings or
    a dict) applied; ``ValueError`` names a bad key or value."""
    cls = get(name).Config
    config = cls.quick() if quick else cls()
    return apply_overrides(config, overrides or {})


def run(
    name: str,
    out_dir: str | Path,
    *,
    quick: bool = False,
    overrides: Mapping[str, Any] | Iterable[str] | None = None,
    progress: Progress | None = None,
) -> Result:
    """Run experiment ``name`` into ``out_dir`` and return its :class:`Result`."""
    config = make_config(name, quick, overrides)
    return get(name).run(config, out_dir, progress=progress)
