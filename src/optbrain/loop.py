"""The prune–retrain loop (OBD recipe, PAPERS.md §1.3) with atomic per-round checkpoints."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import OptbrainError
from .history import History, RoundRecord
from .jsonio import atomic_write, write_text
from .masking import Mask, attach, pruned_state, restore_pruned
from .problem import Problem
from .pruners.base import PrunerProtocol as Pruner
from .pruners.base import default_mask
from .schedule import Schedule

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
HISTORY = "history.json"
_FORMAT = "optbrain-checkpoint-2"


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
) -> History:
    """Alternate deletion and retraining for ``rounds`` rounds; return the :class:`History`.

    Round r asks the pruner for the total sparsity ``schedule(r)`` on ``make_problem(model)``,
    attaches the mask (so retraining cannot revive deleted weights), measures the objective change,
    evaluates, retrains with ``retrain(model, r)``, and evaluates again. It stops early after a
    round whose ``evaluate(model)["val_loss"]`` exceeds ``stop_val_loss``, or before deleting when
    the smallest saliency of a kept entry exceeds ``stop_saliency``.

    With ``checkpoint_dir`` every finished round is written atomically (model, mask, pruner state,
    history); calling again with the same directory and ``config`` resumes after the last finished
    round and gives the same history as an uninterrupted run when ``retrain`` is seeded by round.
    A directory holding another configuration's checkpoint, or a corrupt one, raises
    :class:`CheckpointError` and is left untouched.
    """
    if not isinstance(rounds, int) or rounds < 0:
        raise ValueError(f"rounds must be a non-negative int, not {rounds!r}")
    for r in range(1, rounds + 1):  # validate the whole schedule before any work
        s = schedule(r)
        if not (isinstance(s, (int, float)) and 0.0 <= s < 1.0) or math.isnan(s):
            raise ValueError(f"schedule({r}) = {s!r} is outside [0, 1)")
    cfg = _json_config(config)
    ckdir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    evaluate = evaluate or (lambda m: {})

    history: History | None = None
    if ckdir is not None and (ckdir / CHECKPOINT).exists():
        history = _resume(ckdir, model, pruner, cfg)
        log.info("resumed from %s after round %d", ckdir, history.last.round)
        if history.stopped or history.last.round >= rounds:
            return history
    if history is None:
        history = History(config=cfg)
        mask = _start_mask(pruner, model)
        metrics = dict(evaluate(model))
        history.append(
            RoundRecord(
                round=0,
                target=0.0,
                sparsity=mask.sparsity(),
                remaining=mask.kept(),
                total=mask.total(),
                remaining_params=_remaining_params(model, mask),
                metrics_pruned=metrics,
                metrics=metrics,
            )
        )
        _checkpoint(ckdir, model, pruner, history)

    for r in range(history.last.round + 1, rounds + 1):
        start = time.perf_counter()
        mask = _start_mask(pruner, model)
        problem = make_problem(model)
        target = float(schedule(r))
        scores = None
        if stop_saliency is not None:
            scores = pruner.scores(problem, mask)
            smallest = min(
                float(scores[k].detach()[mask[k].to(scores[k].device)].min())
                for k in mask.names
                if mask[k].any()
            )
            if smallest > stop_saliency:
                history.stopped = f"smallest saliency {smallest:.3g} > {stop_saliency:.3g}"
                _checkpoint(ckdir, model, pruner, history)
                break
        before = None if getattr(pruner, "measure", False) is True else problem.objective()
        new, info = pruner(problem, mask, target, scores=scores)
        attach(model, new)
        before, after = _measured(problem, info, before)
        metrics_pruned = dict(evaluate(model))
        if retrain is not None:
            retrain(model, r)
            metrics = dict(evaluate(model))
        else:
            metrics = metrics_pruned
        history.append(
            RoundRecord(
                round=r,
                target=target,
                sparsity=info.sparsity,
                remaining=info.total - info.pruned,
                total=info.total,
                remaining_params=_remaining_params(model, new),
                predicted_increase=info.predicted_increase,
                actual_increase=after - before,
                objective_before=before,
                objective_pruned=after,
                metrics_pruned=metrics_pruned,
                metrics=metrics,
                seconds=time.perf_counter() - start,
            )
        )
        if stop_val_loss is not None and metrics.get("val_loss", -math.inf) > stop_val_loss:
            history.stopped = f"val_loss {metrics['val_loss']:.4g} > {stop_val_loss:.4g}"
        _checkpoint(ckdir, model, pruner, history)
        if progress is not None:
            progress(r, rounds)
        if history.stopped:
            break
    return history


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


def _checkpoint(ckdir: Path | None, model: nn.Module, pruner: Pruner, history: History) -> None:
    if ckdir is None:
        return
    payload = {
        "format": _FORMAT,
        "history": history.to_dict(),
        "model": pruned_state(model),
        "pruner": pruner.state_dict(),
    }
    atomic_write(ckdir / CHECKPOINT, lambda tmp: torch.save(payload, tmp))
    write_text(ckdir / HISTORY, json.dumps(history.to_dict(), indent=1))


def _resume(ckdir: Path, model: nn.Module, pruner: Pruner, cfg: dict[str, Any]) -> History:
    path = ckdir / CHECKPOINT
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
            raise ValueError("unknown format")
        history = History.from_dict(payload["history"])
        Mask.from_state_dict(payload["model"]["mask"])  # validates the stored mask
    except Exception as exc:  # noqa: BLE001 - named and re-raised
        raise CheckpointError(f"corrupt checkpoint {path}: {exc}") from exc
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
    try:
        restore_pruned(model, payload["model"])
        pruner.load_state_dict(payload.get("pruner", {}))
    except (RuntimeError, KeyError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} does not fit this model: {exc}") from exc
    if not history.records:
        raise CheckpointError(f"checkpoint {path} has no finished round")
    return history
