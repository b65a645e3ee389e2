"""The prune–retrain loop (OBD recipe, PAPERS.md §1.3) with atomic per-round checkpoints.

Under ``torch.distributed`` (problems sharded over the ranks, :mod:`optbrain.distributed`) every
rank runs the loop; rank 0 alone reads and writes the checkpoint directory (the others take what
it read), and each round's record is rank 0's on every rank, so every rank takes the same
decisions and holds the same history."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import distributed, safeload
from .elimination import Step, eliminate
from .errors import OptbrainError, UnsafeFileError
from .generalization import check_decay, fpe_fields
from .history import History, RoundRecord
from .jsonio import atomic_write, write_text
from .masking import Mask, detach, load_pruned, pruned_state, restore_pruned, save_pruned
from .paramdict import ParamDict
from .problem import Problem
from .pruners.base import PrunerProtocol as Pruner
from .pruners.base import default_mask
from .schedule import Schedule

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
HISTORY = "history.json"
ROUNDS = "rounds"
"""Folder of the checkpoint directory holding every round's model with ``keep_rounds=True``."""
_FORMAT = "optbrain-checkpoint-3"  # 3: the loaders' generator states


class CheckpointError(OptbrainError, ValueError):
    """A checkpoint directory is corrupt or belongs to another configuration."""


def _remaining_params(model: nn.Module, mask: Mask) -> int:
    return sum(p.numel() for p in model.parameters()) - mask.pruned()


def _json_config(config: dict[str, Any] | None) -> dict[str, Any]:
    try:
        return json.loads(json.dumps(config or {}, sort_keys=True, default=str))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"config must be JSON-serialisable: {exc}") from exc


def iterative_prune(
    model: nn.Module,
    pruner: Pruner,
    schedule: Schedule,
    *,
    rounds: int,
    make_problem: Callable[[nn.Module], Problem],
    retrain: Callable[[nn.Module, int], Any] | None = None,
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
    stop_val_loss: float | None = None,
    stop_saliency: float | None = None,
    checkpoint_dir: str | Path | None = None,
    config: dict[str, Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
    loaders: Sequence[Any] = (),
    estimate_fpe: bool | Mapping[str, Any] = False,
    keep_rounds: bool = False,
) -> History:
    """Alternate deletion and retraining for ``rounds`` rounds; return the :class:`History`.

    Round r asks the pruner for the total sparsity ``schedule(r)`` on ``make_problem(model)``,
    attaches the mask (so retraining cannot revive deleted weights), measures the objective change,
    evaluates, retrains with ``retrain(model, r)``, and evaluates again. It stops early after a
    round whose ``evaluate(model)["val_loss"]`` exceeds ``stop_val_loss``, or before deleting when
    the smallest saliency of a kept entry exceeds ``stop_saliency``. The rounds are
    :func:`optbrain.elimination.eliminate` with these steps as callbacks.

    With ``checkpoint_dir`` every finished round is written atomically (model, mask, pruner state,
    history, and the random state of the ``loaders``' generators); calling again with the same
    directory and ``config`` resumes after the last finished round and gives the same history as
    an uninterrupted run when ``retrain`` is seeded by round and every shuffling loader that
    ``make_problem``, ``retrain`` or ``evaluate`` reads is in ``loaders`` (a ``DataLoader`` with a
    ``generator`` of its own). A directory holding another configuration's checkpoint, or a
    corrupt one, raises :class:`CheckpointError` and is left untouched; a checkpoint holding
    pickled code is refused (:class:`~optbrain.errors.UnsafeFileError`) without running it.

    ``estimate_fpe`` (``True``, or a dict of keyword arguments of
    :func:`optbrain.generalization.fpe`: ``weight_decay``, ``form``...) records FPE and N_eff of
    every round's final model on ``make_problem(model)`` — which must then be the *training* data —
    in ``RoundRecord.generalization`` (NaN where FPE is undefined, e.g. N ≤ p without decay);
    :meth:`History.select` picks a round from them. ``keep_rounds=True`` (needs
    ``checkpoint_dir``) also saves every round's model as ``rounds/round_NNNN.pt``, so that
    :func:`load_round` can restore the selected one.
    """
    _check_schedule(schedule, rounds)
    cfg = _json_config(config)
    ckdir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if keep_rounds and ckdir is None:
        raise ValueError("keep_rounds=True needs a checkpoint_dir to write the rounds into")
    estimates = _estimates(estimate_fpe, make_problem)
    gens = generators(loaders)

    history: History | None = None
    if ckdir is not None and _exists(ckdir / CHECKPOINT):
        history = _resume(ckdir, model, pruner, cfg, gens)
        log.info("resumed from %s after round %d", ckdir, history.last.round)
        if history.stopped or history.last.round >= rounds:
            return history
    if history is None:
        history = _first_record(model, pruner, cfg, evaluate)
        history.last.generalization = estimates(model)
        _checkpoint(ckdir, model, pruner, history, gens, keep_rounds)
    rec = _Recorder(model, pruner, history, evaluate, retrain is not None)
    rec.stop_val_loss, rec.stop_saliency = stop_val_loss, stop_saliency
    rec.schedule, rec.rounds, rec.progress = schedule, rounds, progress
    rec.estimates = estimates
    rec.save = lambda: _checkpoint(ckdir, model, pruner, history, gens, keep_rounds)
    eliminate(
        model,
        pruner,
        rec.target,
        make_problem=make_problem,
        first_round=history.last.round + 1,
        scores=rec.scores if stop_saliency is not None else None,
        before=rec.before,
        deleted=rec.deleted,
        retrain=retrain,
        after=rec.after,
    )
    return history


def _check_schedule(schedule: Schedule, rounds: int) -> None:
    """Validate the whole schedule before any work."""
    if not isinstance(rounds, int) or rounds < 0:
        raise ValueError(f"rounds must be a non-negative int, not {rounds!r}")
    for r in range(1, rounds + 1):
        s = schedule(r)
        if not (isinstance(s, (int, float)) and 0.0 <= s < 1.0) or math.isnan(s):
            raise ValueError(f"schedule({r}) = {s!r} is outside [0, 1)")


def _first_record(model: nn.Module, pruner: Pruner, cfg: dict, evaluate) -> History:
    """A new history with round 0: the unpruned model."""
    history = History(config=cfg)
    mask = _start_mask(pruner, model)
    metrics = dict(evaluate(model)) if evaluate is not None else {}
    record = RoundRecord(
        round=0,
        target=0.0,
        sparsity=mask.sparsity(),
        remaining=mask.kept(),
        total=mask.total(),
        remaining_params=_remaining_params(model, mask),
        metrics_pruned=metrics,
        metrics=metrics,
    )
    history.append(distributed.world().broadcast(record))  # rank 0's metrics on every rank
    return history


class _Recorder:
    """The callbacks of :func:`iterative_prune`: stop checks, measurements, one record a round."""

    stop_val_loss: float | None = None
    stop_saliency: float | None = None
    schedule: Schedule
    rounds: int
    progress: Callable[[int, int], None] | None = None
    save: Callable[[], None] = staticmethod(lambda: None)  # the checkpoint of a finished round
    estimates: Callable[[nn.Module], dict[str, float]] = staticmethod(lambda m: {})

    def __init__(self, model, pruner, history: History, evaluate, retrains: bool):
        self.model, self.pruner, self.history = model, pruner, history
        self.evaluate = evaluate or (lambda m: {})
        self.retrains = retrains
        self.t0 = 0.0
        self.checked: ParamDict = {}
        self.objective = (math.nan, math.nan)
        self.metrics_pruned: dict[str, float] = {}

    def target(self, r: int, mask: Mask) -> float | None:
        """The schedule's total for round r (None after the last round); starts the clock."""
        self.t0 = time.perf_counter()
        return float(self.schedule(r)) if r <= self.rounds else None

    def scores(self, step: Step):
        """The pruner's saliencies for the stop check (passed on to pruners that accept them)."""
        scores = self.checked = self.pruner.scores(step.problem, step.mask)
        return scores if getattr(self.pruner, "accepts_scores", False) else None

    def before(self, step: Step) -> str | None:
        if self.stop_saliency is not None:
            scores, mask = self.checked, step.mask
            smallest = min(
                float(scores[k].detach()[mask[k].to(scores[k].device)].min())
                for k in mask.names
                if mask[k].any()
            )
            if smallest > self.stop_saliency:
                self.history.stopped = (
                    f"smallest saliency {smallest:.3g} > {self.stop_saliency:.3g}"
                )
                self.save()
                return self.history.stopped
        measures = getattr(self.pruner, "measure", False) is True
        self.objective = (None if measures else step.problem.objective(), math.nan)
        return None

    def deleted(self, step: Step) -> None:
        self.objective = _measured(step.problem, step.info, self.objective[0])
        self.metrics_pruned = dict(self.evaluate(self.model))

    def after(self, step: Step) -> str | None:
        info, new = step.info, step.new
        metrics = dict(self.evaluate(self.model)) if self.retrains else self.metrics_pruned
        before, after = self.objective
        # rank 0's record on every rank (its metrics and time), so that every rank takes the
        # same decisions and holds the same history
        self.history.append(
            distributed.world().broadcast(
                RoundRecord(
                    round=step.round,
                    target=float(step.target),
                    sparsity=info.sparsity,
                    remaining=info.total - info.pruned,
                    total=info.total,
                    remaining_params=_remaining_params(self.model, new),
                    predicted_increase=info.predicted_increase,
                    actual_increase=after - before,
                    objective_before=before,
                    objective_pruned=after,
                    metrics_pruned=self.metrics_pruned,
                    metrics=metrics,
                    seconds=time.perf_counter() - self.t0,
                    generalization=self.estimates(self.model),
                )
            )
        )
        if self.stop_val_loss is not None and metrics.get("val_loss", -math.inf) > (
            self.stop_val_loss
        ):
            self.history.stopped = f"val_loss {metrics['val_loss']:.4g} > {self.stop_val_loss:.4g}"
        self.save()
        if self.progress is not None:
            self.progress(step.round, self.rounds)
        return self.history.stopped


def _measured(problem: Problem, info: Any, before: float | None) -> tuple[float, float]:
    """(E before, E after) of a round's deletion: the pruner's own measurement
    (``PruneInfo.measured_increase``) when it made one, else measured here (NaN if lost)."""
    if getattr(info, "measured_increase", None) is not None:
        return info.objective_before, info.objective_after
    return (math.nan if before is None else before), problem.objective()


def _start_mask(pruner: Pruner, model: nn.Module) -> Mask:
    """The mask a round starts from: the pruner's own default (one decision per pruner)."""
    own = getattr(pruner, "default_mask", None)
    return own(model) if own is not None else default_mask(model)


def generators(loaders: Sequence[Any]) -> list[torch.Generator]:
    """The random generators that decide the batch order of ``loaders``: a ``DataLoader``'s
    ``generator``, its sampler's and batch sampler's, or any loader's ``generator`` attribute
    (each listed once)."""
    found: list[torch.Generator] = []
    for loader in loaders:
        sampler = getattr(loader, "sampler", None)
        batch_sampler = getattr(loader, "batch_sampler", None)
        for owner in (loader, sampler, batch_sampler, getattr(batch_sampler, "sampler", None)):
            gen = getattr(owner, "generator", None)
            if isinstance(gen, torch.Generator) and all(gen is not g for g in found):
                found.append(gen)
    return found


def _estimates(estimate_fpe, make_problem) -> Callable[[nn.Module], dict[str, float]]:
    """What the loop records of a model's generalisation: FPE and N_eff when asked, else {}."""
    options = _fpe_options(estimate_fpe)

    def estimates(m: nn.Module) -> dict[str, float]:
        return {} if options is None else fpe_fields(make_problem(m), **options)

    return estimates


def _fpe_options(estimate_fpe: bool | Mapping[str, Any]) -> dict[str, Any] | None:
    if estimate_fpe is False or estimate_fpe is None:
        return None
    if estimate_fpe is True:
        return {}
    if not isinstance(estimate_fpe, Mapping):
        raise TypeError(
            f"estimate_fpe must be a bool or a dict of fpe() options, not {estimate_fpe!r}"
        )
    options = dict(estimate_fpe)
    check_decay(options.get("weight_decay", 0.0))  # fail before any work
    return options


def round_path(checkpoint_dir: str | Path, round: int) -> Path:
    """Where ``keep_rounds=True`` saves the model of ``round``."""
    return Path(checkpoint_dir) / ROUNDS / f"round_{int(round):04d}.pt"


def load_round(model: nn.Module, checkpoint_dir: str | Path, round: int) -> Mask:
    """Restore the model of ``round`` (as :meth:`History.select` returns it, or its number) from
    a run written with ``keep_rounds=True`` into ``model`` (same architecture): any attached mask
    is removed first (masks only shrink), then the round's weights and mask are loaded. Returns
    the mask now attached."""
    number = getattr(round, "round", round)
    path = round_path(checkpoint_dir, number)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: round {number} was not kept (run iterative_prune with "
            "keep_rounds=True and this checkpoint_dir)"
        )
    detach(model)
    return load_pruned(model, path)


def _checkpoint(
    ckdir: Path | None,
    model: nn.Module,
    pruner: Pruner,
    history: History,
    gens: list,
    keep: bool = False,
) -> None:
    if ckdir is None:
        return

    def write() -> None:  # rank 0 only: the ranks hold the same state
        if keep and history.last is not None:
            save_pruned(model, round_path(ckdir, history.last.round))
        payload = {
            "format": _FORMAT,
            "history": history.to_dict(),
            "model": pruned_state(model),
            "pruner": pruner.state_dict(),
            "generators": [g.get_state() for g in gens],
        }
        atomic_write(ckdir / CHECKPOINT, lambda tmp: torch.save(payload, tmp))
        write_text(ckdir / HISTORY, json.dumps(history.to_dict(), indent=1))

    distributed.on_rank0(write, "writing the checkpoint")


def _exists(path: Path) -> bool:
    """Whether ``path`` exists, as rank 0 sees it (every rank takes its answer)."""
    return distributed.from_rank0(path.exists, "looking for a checkpoint")


def _read(path: Path) -> dict:
    """The checkpoint at ``path``, validated (:class:`CheckpointError` when corrupt)."""
    try:
        payload = safeload.load(path)
        if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
            raise ValueError("unknown format")
        History.from_dict(payload["history"])
        Mask.from_state_dict(payload["model"]["mask"])  # validates the stored mask
    except UnsafeFileError:
        raise
    except Exception as exc:  # noqa: BLE001 - named and re-raised
        raise CheckpointError(f"corrupt checkpoint {path}: {exc}") from exc
    return payload


def _resume(
    ckdir: Path, model: nn.Module, pruner: Pruner, cfg: dict[str, Any], gens: list
) -> History:
    path = ckdir / CHECKPOINT
    payload = distributed.from_rank0(lambda: _read(path), "reading the checkpoint")
    history = History.from_dict(payload["history"])
    if history.config != cfg:
        keys = sorted(
            k
            for k in set(history.config) | set(cfg)
            if history.config.get(k, "<absent>") != cfg.get(k, "<absent>")
        )
        raise CheckpointError(
            f"{ckdir} holds a checkpoint of another configuration (differs in {keys}); "
            "use another directory or delete it"
        )
    states = payload.get("generators", [])
    if len(states) != len(gens):
        raise CheckpointError(
            f"checkpoint {path} holds the state of {len(states)} loader generator(s), this run "
            f"has {len(gens)}: pass the same loaders"
        )
    try:
        restore_pruned(model, payload["model"])
        pruner.load_state_dict(payload.get("pruner", {}))
        for g, state in zip(gens, states):
            g.set_state(state)
    except (RuntimeError, KeyError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} does not fit this model: {exc}") from exc
    if not history.records:
        raise CheckpointError(f"checkpoint {path} has no finished round")
    return history
