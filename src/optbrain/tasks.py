"""A user's own pruning task, as ``optbrain prune --task module:function`` loads it.

The contract: a function without arguments that returns the model, the loss and the data, either
as a tuple ::

    def task():
        return model, loss_fn, train_loader, test_loader      # test_loader may be None

or as a dict with the keys ``model``, ``loss_fn``, ``train_loader`` and optionally
``val_loader`` and ``test_loader``::

    def task():
        return {"model": model, "loss_fn": nn.CrossEntropyLoss(), "train_loader": train,
                "val_loader": val, "test_loader": test}

* ``model``: a trained :class:`torch.nn.Module` with at least one parameter named ``weight...``
  (those are what is pruned);
* ``loss_fn``: ``loss_fn(model(x), y)`` returns a scalar (``reduction="mean"`` or ``"sum"``);
* loaders: re-iterable sources of ``(x, y)`` tensor batches, e.g. a ``DataLoader`` or a list of
  batches; an ``(X, Y)`` pair of tensors is taken as one full batch. The training loader drives
  the saliencies (curvature) and the retraining; validation and test loaders are evaluated every
  round.

``module:function`` is imported with the current directory on ``sys.path`` (as ``python -m``
does); ``path/to/file.py:function`` imports that file (its folder goes on ``sys.path`` so that it
can import its neighbours). :func:`load_task` resolves, calls and validates a task and raises
:class:`TaskError`, naming what was wrong, for anything that does not fit; :func:`prune` runs the
prune–retrain loop on it and writes a run directory.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import distributed
from .errors import NonFiniteDataError, OptbrainError
from .pruners.presets import METHODS as _METHOD_TABLE

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_OUT",
    "METHODS",
    "PruneResult",
    "Task",
    "prune_model",
    "RunExistsError",
    "TaskError",
    "as_task",
    "load_task",
    "prune",
    "resolve",
]

DEFAULT_OUT = Path("optbrain-runs") / "prune"
METHODS = tuple(_METHOD_TABLE)  # the one table of named methods: optbrain.pruners.METHODS
_KEYS = ("model", "loss_fn", "train_loader", "val_loader", "test_loader")
_REQUIRED = ("model", "loss_fn", "train_loader")
_EXPECTED = (
    "expected a tuple (model, loss_fn, train_loader, test_loader) or a dict with keys "
    "model, loss_fn, train_loader and optionally val_loader, test_loader"
)


class TaskError(OptbrainError, ValueError):
    """A task cannot be found, imported or called, or returned something that does not fit."""


class RunExistsError(OptbrainError, FileExistsError):
    """The output directory already holds a run of this method (finished or interrupted)."""


@dataclass
class Task:
    """A validated task: what the user's function returned."""

    model: nn.Module
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    train_loader: Iterable
    val_loader: Iterable | None = None
    test_loader: Iterable | None = None
    name: str = "task"

    def loaders(self) -> dict[str, Iterable]:
        """The evaluation loaders that are present: ``{"val": ..., "test": ...}``."""
        out = {"val": self.val_loader, "test": self.test_loader}
        return {k: v for k, v in out.items() if v is not None}


# ------------------------------------------------------------------------------ resolving
def _describe(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        kinds = ", ".join(type(v).__name__ for v in value[:6])
        more = ", ..." if len(value) > 6 else ""
        return f"a {type(value).__name__} of {len(value)} items ({kinds}{more})"
    if isinstance(value, Mapping):
        return f"a dict with keys {sorted(map(str, value))}"
    if value is None:
        return "None"
    return f"a {type(value).__module__}.{type(value).__qualname__}"


def _is_file_spec(target: str) -> bool:
    return target.endswith(".py") or "/" in target or os.sep in target


def _ensure_on_path(folder: str) -> None:
    if folder not in sys.path:
        sys.path.insert(0, folder)


def _import_module(spec: str, name: str):
    cwd = os.getcwd()
    _ensure_on_path(cwd)
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (name == exc.name or name.startswith(exc.name + ".")):
            raise TaskError(
                f"task {spec!r}: no module named {name!r} (looked in the current directory "
                f"{cwd} and on sys.path); for a file write path/to/file.py:function"
            ) from exc
        raise TaskError(
            f"task {spec!r}: importing module {name!r} failed: {type(exc).__name__}: {exc}"
        ) from exc
    except Exception as exc:
        raise TaskError(
            f"task {spec!r}: importing module {name!r} raised {type(exc).__name__}: {exc}"
        ) from exc


def _import_file(spec: str, target: str):
    path = Path(target).expanduser()
    if not path.is_file():
        raise TaskError(f"task {spec!r}: no such file {str(path)!r}")
    path = path.resolve()
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    mod_name = f"_optbrain_task_{path.stem}_{digest}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec_obj = importlib.util.spec_from_file_location(mod_name, path)
    if spec_obj is None or spec_obj.loader is None:
        raise TaskError(f"task {spec!r}: {str(path)!r} cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec_obj)
    _ensure_on_path(str(path.parent))
    sys.modules[mod_name] = module
    try:
        spec_obj.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[mod_name]
        raise TaskError(
            f"task {spec!r}: importing {str(path)!r} raised {type(exc).__name__}: {exc}"
        ) from exc
    return module


def resolve(spec: str) -> Callable[[], Any]:
    """The function a ``module:function`` or ``path/to/file.py:function`` spec names."""
    if not isinstance(spec, str):
        raise TaskError(f"a task is given as a 'module:function' string, not {_describe(spec)}")
    target, _, func = spec.rpartition(":")
    if not target or not func or not all(p.isidentifier() for p in func.split(".")):
        raise TaskError(
            f"task {spec!r} must be 'module:function' or 'path/to/file.py:function' "
            "(a function that returns model, loss_fn and data loaders)"
        )
    if _is_file_spec(target):
        module = _import_file(spec, target)
    else:
        module = _import_module(spec, target)
    obj: Any = module
    for part in func.split("."):
        if not hasattr(obj, part):
            public = sorted(
                n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
            )
            raise TaskError(
                f"task {spec!r}: {target!r} has no attribute {func!r}"
                + (f"; its callables are {', '.join(public)}" if public else "")
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise TaskError(f"task {spec!r}: {func!r} is {_describe(obj)}, not a function")
    return obj


# ------------------------------------------------------------------------------ validation
def _loader(name: str, role: str, value: Any) -> Iterable:
    if isinstance(value, tuple) and len(value) == 2 and all(isinstance(t, Tensor) for t in value):
        if value[0].shape[:1] != value[1].shape[:1]:
            raise TaskError(
                f"task {name} returned a {role} (X, Y) whose tensors have {value[0].shape[0]} and "
                f"{value[1].shape[0]} rows"
            )
        return [value]  # one full batch
    if isinstance(value, (str, bytes, Tensor, Mapping)) or not isinstance(value, Iterable):
        raise TaskError(
            f"task {name} returned {_describe(value)} as {role}; expected a DataLoader or another "
            "re-iterable source of (input, target) tensor batches"
        )
    if iter(value) is value:
        raise TaskError(
            f"task {name} returned a one-shot iterator ({_describe(value)}) as {role}; pruning "
            "reads the data many times: return a DataLoader or a list of batches"
        )
    try:
        first = next(iter(value))
    except StopIteration:
        raise TaskError(f"task {name} returned an empty {role}") from None
    except Exception as exc:
        raise TaskError(
            f"task {name}: reading the first batch of {role} raised {type(exc).__name__}: {exc}"
        ) from exc
    if not (
        isinstance(first, (tuple, list))
        and len(first) == 2
        and all(isinstance(t, Tensor) for t in first)
    ):
        raise TaskError(
            f"task {name}: {role} yields {_describe(first)}; expected (input, target) pairs of "
            "tensors"
        )
    return value


def as_task(value: Any, name: str = "task") -> Task:
    """Validate what a task function returned (see the module docstring) and wrap it."""
    if isinstance(value, Task):
        return value
    if isinstance(value, Mapping):
        unknown = [k for k in value if k not in _KEYS]
        missing = [k for k in _REQUIRED if value.get(k) is None]
        if unknown or missing:
            what = []
            if missing:
                what.append(f"missing {missing}")
            if unknown:
                what.append(f"unknown {unknown}")
            raise TaskError(
                f"task {name} returned a dict with {' and '.join(what)} keys; {_EXPECTED}"
            )
        parts = {k: value.get(k) for k in _KEYS}
    elif isinstance(value, (tuple, list)) and len(value) == 4:
        parts = dict(zip(("model", "loss_fn", "train_loader", "test_loader"), value))
        parts["val_loader"] = None
    else:
        raise TaskError(f"task {name} returned {_describe(value)}; {_EXPECTED}")
    model, loss_fn = parts["model"], parts["loss_fn"]
    if not isinstance(model, nn.Module):
        raise TaskError(
            f"task {name} returned {_describe(model)} as the model; expected a torch.nn.Module"
        )
    if not callable(loss_fn):
        raise TaskError(
            f"task {name} returned {_describe(loss_fn)} as the loss; expected a callable "
            "loss_fn(output, target) such as torch.nn.CrossEntropyLoss()"
        )
    from .masking import Mask

    if len(Mask.ones(model)) == 0:
        raise TaskError(
            f"task {name}: the model has no prunable weight (the weights of Linear, Conv, "
            "Embedding, recurrent and attention layers are prunable; biases and normalisation "
            "parameters are not)"
        )
    loaders = {
        k: _loader(name, k, parts[k]) if parts[k] is not None else None
        for k in ("train_loader", "val_loader", "test_loader")
    }
    _check_loss(name, model, loss_fn, next(iter(loaders["train_loader"])))
    return Task(model, loss_fn, name=name, **loaders)


def _check_loss(name: str, model: nn.Module, loss_fn: Any, batch: tuple[Tensor, Tensor]) -> None:
    """loss_fn(model(x), y) on the first training batch must be a finite scalar."""
    from .problem import eval_mode

    device = next(iter(model.parameters())).device
    x, y = batch[0].to(device), batch[1].to(device)
    try:
        with torch.no_grad(), eval_mode(model):
            loss = loss_fn(model(x), y)
    except Exception as exc:
        raise TaskError(
            f"task {name}: loss_fn(model(x), y) on the first training batch raised "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else _describe(loss)
        raise TaskError(
            f"task {name}: loss_fn(model(x), y) gave {shape}; expected a scalar tensor "
            "(reduction 'mean' or 'sum')"
        )
    if not math.isfinite(float(loss)):
        raise TaskError(f"task {name}: the loss on the first training batch is {float(loss)}")


def load_task(spec: str) -> Task:
    """Resolve ``spec`` (``module:function`` or ``path/to/file.py:function``), call the function
    and validate what it returned; :class:`TaskError` names whatever does not fit."""
    fn = resolve(spec)
    try:
        inspect.signature(fn).bind()
    except TypeError as exc:
        raise TaskError(
            f"task {spec!r} takes no arguments, but its signature says: {exc}"
        ) from None
    except ValueError:  # pragma: no cover - no signature (some builtins): just call it
        pass
    try:
        value = fn()
    except Exception as exc:
        raise TaskError(f"task {spec!r} raised {type(exc).__name__}: {exc}") from exc
    return as_task(value, spec)


# ------------------------------------------------------------------------------ pruning
@dataclass
class PruneResult:
    """What :func:`prune` did and wrote; ``str(result)`` is the round table."""

    history: Any  # optbrain.history.History
    run_dir: Path | None
    report: Path | None
    model_path: Path | None
    seconds: float
    table: str = field(default="", repr=False)
    model: nn.Module | None = field(default=None, repr=False)
    #: the curvature engine the method's estimator took and why ("" for methods without one)
    engine: str = ""
    #: with ``select``: the round the rule chose (:meth:`History.select`) and a copy of the model
    #: restored to that round (``model`` is the last round's); None without ``select`` (the model:
    #: also None on the ranks other than 0 under ``torchrun``)
    selected: Any = None
    selected_model: nn.Module | None = field(default=None, repr=False)

    def __str__(self) -> str:
        return self.table


def _pruner(method: str, seed: int, task: Task | None = None, weight_decay: float = 0.0):
    """The method's pruner; ``weight_decay`` goes to factories that take one (OBD, OBS, γOBD,
    γOBS), so that their saliencies assume the decay the retraining applies."""
    from .pruners import make

    options: dict[str, Any] = {}
    factory = _METHOD_TABLE[method].factory
    if weight_decay and "weight_decay" in inspect.signature(factory).parameters:
        options["weight_decay"] = weight_decay
    elif weight_decay:
        log.info("method %s has no weight-decay saliency: λ is used in retraining and FPE", method)
    if not _METHOD_TABLE[method].needs_validation:
        return make(method, seed, task=True, **options)
    if task is None or task.val_loader is None:
        raise TaskError(f"method {method!r} needs a validation loader: return 'val_loader' too")
    return make(method, seed, task=True, validation=task.val_loader, **options)


def resolve_method(method: str | None, retrain_epochs: int) -> str:
    """The method a run uses: ``"auto"``/None → :func:`optbrain.pruners.recommended`; a method
    that needs retraining (:attr:`optbrain.pruners.Method.needs_retraining`) is refused with a
    retraining budget of 0."""
    from .pruners import recommended

    if method is None or method == "auto":
        return recommended(retrain_epochs)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from auto, {', '.join(METHODS)}")
    if retrain_epochs == 0 and _METHOD_TABLE[method].needs_retraining:
        raise ValueError(
            f"method {method!r} needs retraining after pruning (it ranks weights for a network "
            f"that is trained afterwards) but retrain_epochs=0; give retrain_epochs >= 1, or "
            f"method='auto' ({recommended(0)!r}, measured best without retraining)"
        )
    return method


def make_schedule(name: str, sparsity: float, rounds: int):
    """The schedule ``name`` reaching ``sparsity`` at round ``rounds``."""
    from . import schedule as S

    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise ValueError(f"sparsity must be a fraction in (0, 1), not {sparsity!r}")
    if not 0.0 < sparsity < 1.0:
        hint = f" (did you mean {sparsity / 100:g}?)" if 1.0 < sparsity < 100.0 else ""
        raise ValueError(f"sparsity must be a fraction in (0, 1), not {sparsity!r}{hint}")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be a positive int, not {rounds!r}")
    if name == "geometric":
        rate = 1.0 - (1.0 - sparsity) ** (1.0 / rounds)
        return S.geometric(rate, final=sparsity)
    if name == "one_shot":
        return S.one_shot(sparsity)
    if name in ("linear", "cubic"):
        return S.SCHEDULES[name](sparsity, rounds)
    raise ValueError(f"unknown schedule {name!r}; choose from {', '.join(S.SCHEDULES)}")


def prune(
    task: Task | str,
    method: str | None = "auto",
    sparsity: float = 0.9,
    rounds: int = 5,
    retrain_epochs: int = 1,
    out_dir: str | Path = DEFAULT_OUT,
    *,
    schedule: str = "geometric",
    lr: float = 1e-3,
    optimizer: str = "adam",
    seed: int = 0,
    resume: bool = False,
    force: bool = False,
    progress: bool = False,
    shards: str = "split",
    weight_decay: float = 0.0,
    fpe: str | None = None,
    select: str | None = None,
    stop_saliency: float | None = None,
) -> PruneResult:
    """Prune a task's model to ``sparsity`` in ``rounds`` rounds with retraining; write a run dir.

    ``task`` is a :class:`Task` or a spec for :func:`load_task`. Each round deletes the weights of
    lowest saliency (``method``: ``obd`` with the exact Gauss–Newton diagonal of the training
    loss, ``magnitude``, ``random``, ``snip``; ``obs`` deletes one weight at a time and moves the
    others to compensate (a dense inverse curvature: small nets); ``layerwise_obs`` solves each
    layer's reconstruction; ``ocd`` removes whole input variables instead, and ``sparsity`` is
    then the fraction of the inputs; ``"auto"`` or None, the default, is the method measured best
    (:func:`optbrain.pruners.recommended`, docs/benchmarks.md): ``layerwise_obs`` without
    retraining (``retrain_epochs=0``), ``obd`` with it; ``snip`` and ``random`` need retraining
    and are refused with ``retrain_epochs=0``) up to the
    ``schedule``'s total for that round (``geometric``: the same fraction of the remaining
    weights each round; ``linear``, ``cubic``, ``one_shot``), then retrains ``retrain_epochs``
    epochs on the training loader (``optimizer`` ``"adam"`` or ``"sgd"``, ``lr``; deleted weights
    stay zero). The model is pruned in place.

    Every batch of every split is checked for NaN and infinity before any work, and again as it is
    read (:class:`~optbrain.errors.NonFiniteDataError` names the split and the batch; a run that
    meets one leaves no checkpoint of its own behind).

    Writes under ``out_dir``: ``<method>/history.json``, ``<method>/checkpoint.pt`` (a run
    interrupted and started again with ``resume=True`` and the same settings continues after the
    last finished round, with the training loader's random state restored, so its history equals
    an uninterrupted run's; a folder that already holds a run is refused with
    :class:`RunExistsError` unless ``resume`` or ``force``, which replaces it),
    ``<method>/model.pt`` (load with ``optbrain.masking.load_pruned(model, path)`` into a fresh
    model of the same architecture), ``report.md``, its PNGs and ``run.json``. Under ``torchrun``
    the saliencies are data-parallel (``shards="split"``: each rank takes its part of every
    training batch; ``"given"``: the loader yields this rank's shard); rank 0 alone writes.

    Generalisation (PAPERS.md §5, §14.4; :mod:`optbrain.generalization`): ``weight_decay`` λ ≥ 0
    is the L2 decay of the retraining optimizer (PyTorch's ``weight_decay``: the model is taken
    to be trained on E + ½λ‖w‖²) and goes to the saliencies that have a weight-decay form
    (``obd``, ``obs``, ``gamma_obd``, ``gamma_obs``) and to FPE. ``fpe`` (``"diagonal"`` or
    ``"full"``) records NNSYSID's FPE and N_eff of every round on the training data.
    ``select`` (``"fpe"`` — which turns ``fpe="diagonal"`` on if unset — or ``"validation"``:
    the smallest validation loss; never the test set) keeps every round's model in
    ``<method>/rounds/`` and saves the chosen one as ``<method>/model_selected.pt``
    (:attr:`PruneResult.selected`, :attr:`PruneResult.selected_model`). ``stop_saliency`` stops
    before a round whose smallest kept saliency exceeds it: ``0`` is γOBD's rule (stop once
    every deletion would raise the estimated test error).
    """
    split = _split_shards(shards)
    t_start = time.perf_counter()
    method = resolve_method(method, retrain_epochs)
    run = _Settings(method, sparsity, rounds, retrain_epochs, schedule, lr, optimizer, seed)
    run.weight_decay, run.fpe = weight_decay, fpe
    run.select, run.stop_saliency = select, stop_saliency
    sched = run.check()
    task = load_task(task) if isinstance(task, str) else as_task(task)
    if run.select == "validation" and task.val_loader is None:
        raise TaskError("select='validation' needs a validation loader: return 'val_loader' too")
    pruner = _pruner(method, seed, task, run.weight_decay)
    run_dir = Path(out_dir)
    checked = _checked_loaders(task)  # before anything is written or removed
    distributed.on_rank0(lambda: _claim(run_dir / method, resume, force), "claiming --out")
    engine = _engine(task, checked, pruner)
    history = _rounds(task, checked, pruner, sched, run_dir / method, run, progress, split)
    return _finish(task, history, pruner, sched, run_dir, run, t_start, engine)


def _split_shards(shards: str) -> bool:
    """Whether every rank splits the training batches (``"split"``) or gets its shard
    (``"given"``)."""
    if shards not in ("split", "given"):
        raise ValueError(f"shards must be 'split' or 'given', not {shards!r}")
    return shards == "split"


def _engine(task: Task, checked: dict, pruner) -> str:
    """Which curvature engine the pruner's estimator takes on the task's model, and why (logged;
    a fall-back to the slow generic engine is a warning)."""
    from .curvature.paths import engine_of
    from .problem import Problem

    path = engine_of(pruner, Problem(task.model, task.loss_fn, checked["train"]))
    if path is None:
        return ""
    (log.info if path.engine in ("chain", "graph") else log.warning)("curvature engine %s", path)
    return str(path)


@dataclass
class _Settings:
    """The settings of one :func:`prune` run."""

    method: str
    sparsity: float
    rounds: int
    retrain_epochs: int
    schedule: str
    lr: float
    optimizer: str
    seed: int
    weight_decay: float = 0.0
    fpe: str | None = None
    select: str | None = None
    stop_saliency: float | None = None

    def check(self):
        """Validate; returns the schedule."""
        from .generalization import FORMS, check_decay

        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose from {', '.join(METHODS)}")
        e = self.retrain_epochs
        if isinstance(e, bool) or not isinstance(e, int) or e < 0:
            raise ValueError(f"retrain_epochs must be an int >= 0, not {e!r}")
        self.weight_decay = check_decay(self.weight_decay)
        if isinstance(self.weight_decay, Mapping):
            raise TypeError("weight_decay of a whole-task run is one number (PyTorch's)")
        if self.fpe is not None and self.fpe not in FORMS:
            raise ValueError(f"fpe must be None or one of {FORMS}, not {self.fpe!r}")
        if self.select not in (None, "fpe", "validation"):
            raise ValueError(f"select must be None, 'fpe' or 'validation', not {self.select!r}")
        if self.select == "fpe" and self.fpe is None:
            self.fpe = "diagonal"
        stop = self.stop_saliency
        if stop is not None and (
            isinstance(stop, bool) or not isinstance(stop, (int, float)) or not math.isfinite(stop)
        ):
            raise ValueError(f"stop_saliency must be None or a finite number, not {stop!r}")
        return make_schedule(self.schedule, self.sparsity, self.rounds)

    def generalization(self) -> dict[str, Any]:
        """The generalisation settings that differ from the defaults (in the config only then,
        so that runs without them resume as before)."""
        out = {
            "weight_decay": self.weight_decay or None,
            "fpe": self.fpe,
            "select": self.select,
            "stop_saliency": self.stop_saliency,
        }
        return {k: v for k, v in out.items() if v is not None}

    def config(self, task: Task, pruner, sched) -> dict[str, Any]:
        """What a checkpoint must match to be resumed."""
        return {
            "task": task.name,
            "method": self.method,
            "predicts_objective": _METHOD_TABLE[self.method].predicts_objective,
            "pruner": repr(pruner),
            "schedule": repr(sched),
            "sparsity": self.sparsity,
            "rounds": self.rounds,
            "retrain_epochs": self.retrain_epochs,
            "optimizer": self.optimizer,
            "lr": self.lr,
            "seed": self.seed,
            **self.generalization(),
        }

    def epochs_text(self) -> str:
        return f"{self.retrain_epochs} epoch{'' if self.retrain_epochs == 1 else 's'}"


def _rounds(
    task: Task, checked: dict, pruner, sched, folder: Path, run: _Settings, progress, split: bool
):
    """The prune–retrain rounds of :func:`prune` (progress bars, checkpoints in ``folder``)."""
    from .loop import CHECKPOINT, HISTORY, iterative_prune
    from .problem import Problem
    from .report.progress import Bars
    from .report.tables import label
    from .train import evaluate, train

    bars = Bars(progress)
    loss_fn, train_loader = task.loss_fn, checked["train"]
    splits = {k: v for k, v in checked.items() if k != "train"} or {"train": train_loader}

    def metrics(m: nn.Module) -> dict[str, float]:
        return {
            f"{split}_{k}": v
            for split, loader in splits.items()
            for k, v in evaluate(m, loader, loss_fn).items()
        }

    with bars.stage(f"pruning {label(run.method)}", total=run.rounds, leave=True) as stage:

        def make_problem(m: nn.Module) -> Problem:
            if stage is not None:
                stage.note("saliencies")
            return Problem(m, loss_fn, train_loader, split=split)

        def retrain(m: nn.Module, r: int) -> None:
            if stage is not None:
                stage.note("retraining")
            with bars.stage(f"retraining round {r}", total=run.retrain_epochs) as cb:
                kw = dict(lr=run.lr, optimizer=run.optimizer, seed=run.seed + 1000 * r)
                kw["weight_decay"] = run.weight_decay
                train(m, train_loader, loss_fn, epochs=run.retrain_epochs, progress=cb, **kw)

        fresh = not distributed.from_rank0((folder / CHECKPOINT).exists)
        try:
            return iterative_prune(
                task.model,
                pruner,
                sched,
                rounds=run.rounds,
                make_problem=make_problem,
                retrain=retrain if run.retrain_epochs > 0 else None,
                evaluate=metrics,
                checkpoint_dir=folder,
                config=run.config(task, pruner, sched),
                progress=stage,
                loaders=[task.train_loader, task.val_loader, task.test_loader],
                stop_saliency=run.stop_saliency,
                estimate_fpe=(
                    {"weight_decay": run.weight_decay, "form": run.fpe} if run.fpe else False
                ),
                keep_rounds=run.select is not None,
            )
        except NonFiniteDataError:
            if fresh and distributed.is_rank0():  # no checkpoint of a run with broken data
                for name in (CHECKPOINT, HISTORY):
                    (folder / name).unlink(missing_ok=True)
            raise


def _finish(task: Task, history, pruner, sched, run_dir: Path, run: _Settings, t_start, engine):
    """Save the pruned model, write the report, build the round table."""
    from .masking import save_pruned
    from .report import default_columns, write_report
    from .report.tables import history_table, label, selection_lines

    model_path = run_dir / run.method / "model.pt"
    distributed.on_rank0(lambda: save_pruned(task.model, model_path), "saving the model")
    selected, selected_model, chosen = _select_on_rank0(task, history, run, run_dir)
    histories = {run.method: history}
    columns = default_columns(histories)
    seconds = time.perf_counter() - t_start
    notes = [
        f"`optbrain prune --task {task.name} --method {run.method}`: {run.rounds} rounds of the "
        f"{run.schedule} schedule `{sched!r}` up to {100 * run.sparsity:g}% of the prunable "
        f"weights (pruner `{pruner!r}`), each followed by {run.epochs_text()} of retraining "
        f"({run.optimizer}, lr {run.lr:g}).",
        f"Load the pruned model with `optbrain.masking.load_pruned(model, "
        f"{model_path.relative_to(run_dir).as_posix()!r})` where `model` is a fresh model of the "
        "same architecture.",
    ]
    if engine:
        notes.append(f"Curvature engine: {engine}.")
    notes += _generalization_notes(run, chosen)
    report = distributed.on_rank0(
        lambda: write_report(
            run_dir, histories, title=f"optbrain prune: {task.name}", notes=notes, columns=columns
        ),
        "writing the report",
    )
    table = "\n".join(
        [
            f"optbrain prune: {task.name}, method {label(run.method)}, {run.schedule} schedule to "
            f"{100 * run.sparsity:g}% in {run.rounds} rounds, {run.epochs_text()} of retraining "
            "per round",
            history_table(histories, columns),
            *selection_lines(histories),
            *([chosen] if chosen else []),
            *([f"curvature engine: {engine}"] if engine else []),
            f"total time {seconds:.1f} s",
        ]
    )
    return PruneResult(
        history,
        run_dir,
        report,
        model_path,
        seconds,
        table,
        task.model,
        engine,
        selected,
        selected_model,
    )


_CRITERIA = {"fpe": "FPE", "validation": "validation loss"}


def _select_on_rank0(task: Task, history, run: _Settings, run_dir: Path):
    """:func:`_select` on rank 0 (which wrote the rounds); every rank gets the chosen record and
    line, the restored model stays on rank 0 (None elsewhere: a parametrised module cannot be
    sent between processes)."""
    got: list = []

    def pick():
        got.extend(_select(task, history, run, run_dir))
        return got[0], got[2]

    rec, line = distributed.from_rank0(pick, "selecting a round")
    return rec, (got[1] if got else None), line


def _select(task: Task, history, run: _Settings, run_dir: Path):
    """With ``run.select``: (the chosen round, a copy of the model restored to it, a line
    saying so), the copy saved as ``<method>/model_selected.pt``; (None, None, "") otherwise or
    when no round has a finite value of the criterion (logged)."""
    import copy

    from .loop import load_round
    from .masking import save_pruned

    if run.select is None:
        return None, None, ""
    try:
        rec = history.select(run.select)
    except ValueError as exc:
        log.warning("no round selected: %s", exc)
        return None, None, f"no round selected by {_CRITERIA[run.select]}: {exc}"
    chosen = copy.deepcopy(task.model)
    load_round(chosen, run_dir / run.method, rec.round)
    save_pruned(chosen, run_dir / run.method / "model_selected.pt")
    line = (
        f"{_CRITERIA[run.select]} selects round {rec.round} ({rec.remaining_params:,} params, "
        f"{100 * rec.sparsity:.1f}% pruned): {run.method}/model_selected.pt"
    )
    return rec, chosen, line


def _generalization_notes(run: _Settings, chosen: str) -> list[str]:
    """The report's notes on weight decay, FPE and the selected round."""
    notes = []
    if run.weight_decay:
        notes.append(
            f"Weight decay λ = {run.weight_decay:g} in retraining, in the saliency where the "
            "method has a weight-decay form, and in FPE."
        )
    if run.fpe:
        notes.append(f"FPE ({run.fpe} form) of every round on the training data (PAPERS.md §5).")
    if run.stop_saliency is not None:
        notes.append(
            f"Stopping rule: stop once the smallest saliency exceeds {run.stop_saliency:g}."
        )
    if chosen:
        notes.append(f"Model selection: {chosen}.")
    return notes


def _claim(folder: Path, resume: bool, force: bool) -> None:
    """Refuse to overwrite a run in ``folder`` unless asked: ``resume`` continues an interrupted
    one, ``force`` replaces it."""
    from .history import History
    from .loop import CHECKPOINT, HISTORY

    if resume and force:
        raise ValueError("give resume (continue the run) or force (replace it), not both")
    present = [n for n in (CHECKPOINT, HISTORY, "model.pt") if (folder / n).exists()]
    if not present or resume:
        return
    if not force:
        try:
            rounds = f"{History.load(folder / HISTORY).last.round} rounds"
        except (OSError, ValueError, AttributeError):
            rounds = "rounds unknown"
        state = "a finished run" if (folder / "model.pt").exists() else "an interrupted run"
        raise RunExistsError(
            f"{folder} holds {state} ({', '.join(present)}; {rounds}); pass --resume to "
            "continue it or --force to replace it (or choose another --out)"
        )
    for name in present:
        (folder / name).unlink()


def _checked_loaders(task: Task) -> dict[str, Any]:
    """Every split scanned for NaN/inf before any work, then wrapped to check each batch read."""
    from .datacheck import Checked, scan

    loaders = {"train": task.train_loader, **task.loaders()}
    for split, loader in loaders.items():
        scan(split, loader)
    return {split: Checked(split, loader) for split, loader in loaders.items()}


def prune_model(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    train_data: Any,
    *,
    val_data: Any = None,
    test_data: Any = None,
    method: str | None = "auto",
    sparsity: float = 0.9,
    rounds: int = 5,
    retrain_epochs: int = 1,
    out_dir: str | Path | None = None,
    **options: Any,
) -> PruneResult:
    """The Python form of ``optbrain prune``: prune ``model`` in place to ``sparsity`` in ``rounds``
    rounds of ``method`` (a name of :data:`optbrain.pruners.METHODS`, or ``"auto"``: the method
    measured best, see :func:`prune`), retraining
    ``retrain_epochs`` epochs after each, and return the :class:`PruneResult` (``.history``,
    ``.model``, the round table as ``str(result)``).

    Data are ``DataLoader``-like sources of ``(x, y)`` batches or one ``(X, Y)`` tuple of tensors;
    validation and test data are evaluated every round. With ``out_dir`` the run directory of
    :func:`prune` is written there (report, history, checkpoints, ``model.pt``); without it nothing
    is written and the paths in the result are None. ``options`` go to :func:`prune`
    (``schedule``, ``lr``, ``optimizer``, ``seed``, ``resume``, ``progress``, and the
    generalisation options ``weight_decay``, ``fpe``, ``select``, ``stop_saliency``).
    """
    import tempfile

    task = as_task(
        {
            "model": model,
            "loss_fn": loss_fn,
            "train_loader": train_data,
            "val_loader": val_data,
            "test_loader": test_data,
        },
        name=type(model).__name__,
    )
    args = dict(
        method=method, sparsity=sparsity, rounds=rounds, retrain_epochs=retrain_epochs, **options
    )
    if out_dir is not None:
        return prune(task, out_dir=out_dir, **args)
    with tempfile.TemporaryDirectory(prefix="optbrain-prune-") as tmp:
        result = prune(task, out_dir=tmp, **args)
    result.run_dir = result.report = result.model_path = None
    return result
