"""Command line interface: ``optbrain demo | curvature | list | reproduce | prune | report |
quantize``.

Thin by design: parse arguments, set up logging and torch threads, call the library, print what it
returns. Errors in what the user gave (a bad task, experiment name or setting, a run directory
without history) are reported in one line on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

__all__ = ["build_parser", "main"]

log = logging.getLogger("optbrain.cli")

QUICK_BANNER = (
    "  (--quick: a CI-sized run; the claims are sized for the full run, so NOT HELD here says "
    "little — run without --quick to test them)"
)


def _version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("optbrain")
    except PackageNotFoundError:  # pragma: no cover - only when run from an uninstalled tree
        return "unknown"


# ------------------------------------------------------------------------------ argument types
def _int(text: str, minimum: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected a {what} integer, got {value}")
    return value


def _positive_int(text: str) -> int:
    return _int(text, 1, "positive")


def _non_negative_int(text: str) -> int:
    return _int(text, 0, "non-negative")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def _number(text: str, ok, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not (math.isfinite(value) and ok(value)):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    return _number(text, lambda v: v >= 0, "a number >= 0")


def _finite_float(text: str) -> float:
    return _number(text, lambda v: True, "a finite number")


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1), got {text!r}") from None
    if not 0.0 < value < 1.0:
        hint = f" (did you mean {value / 100:g}?)" if 1.0 < value < 100.0 else ""
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1), got {text}{hint}")
    return value


# ------------------------------------------------------------------------------ the parser
def build_parser() -> argparse.ArgumentParser:
    """The ``optbrain`` argument parser: one sub-parser per command."""
    parser = argparse.ArgumentParser(
        prog="optbrain",
        description="Second-order (Optimal Brain Damage / Surgeon) pruning for PyTorch.",
        epilog="`optbrain COMMAND --help` describes a command.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (
        _add_demo,
        _add_curvature,
        _add_list,
        _add_reproduce,
        _add_prune,
        _add_quantize,
        _add_report,
    ):
        add(sub)
    return parser


def _common(p: argparse.ArgumentParser, threads: bool = True, progress: bool = True) -> None:
    """The options every command shares: -v, --no-progress, --threads (default 1 everywhere)."""
    p.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=argparse.SUPPRESS,
        help="more log output (-vv for debug)",
    )
    if progress:
        p.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    if threads:
        p.add_argument(
            "--threads",
            type=_non_negative_int,
            default=1,
            metavar="N",
            help="torch CPU threads (default 1: small nets gain nothing from more, and threads "
            "thrash on a busy machine; 0 keeps torch's default)",
        )


def _add_demo(sub) -> None:
    demo = sub.add_parser(
        "demo",
        help="prune a digits MLP with OBD and with magnitude pruning, side by side",
        description="Train the 64-300-100-10 tanh MLP on the scikit-learn digits, prune it with "
        "Optimal Brain Damage and with magnitude pruning under the same schedule and retraining "
        "budget, print a round-by-round table and write a report directory (report.md, PNG "
        "plots, histories, the pruned models). About 15 s on one CPU core.",
    )
    demo.add_argument(
        "--out",
        metavar="DIR",
        default=str(Path("optbrain-runs") / "demo"),
        help="output directory (default optbrain-runs/demo, under the current directory)",
    )
    demo.add_argument(
        "--epochs", type=_non_negative_int, default=40, help="training epochs of the net (40)"
    )
    demo.add_argument("--rounds", type=_positive_int, default=8, help="pruning rounds (8)")
    demo.add_argument(
        "--rate",
        type=_fraction,
        default=0.35,
        help="fraction of the remaining weights deleted per round (0.35: 8 rounds reach 96.8%%)",
    )
    demo.add_argument(
        "--retrain-epochs",
        type=_non_negative_int,
        default=3,
        metavar="E",
        help="retraining epochs after each round (3)",
    )
    demo.add_argument("--seed", type=int, default=0, help="seed of split, init, training (0)")
    _common(demo)


def _add_curvature(sub) -> None:
    curv = sub.add_parser(
        "curvature",
        help="train a digits MLP and compare the curvature estimators on it",
        description="Train the 64-300-100-10 digits MLP, then time every diagonal curvature "
        "estimator against one gradient pass and compare their OBD saliencies and rankings.",
    )
    curv.add_argument(
        "--epochs", type=_non_negative_int, default=40, help="training epochs (default 40)"
    )
    curv.add_argument("--seed", type=int, default=0, help="seed of split, init, training (0)")
    curv.add_argument(
        "--hutchinson-samples",
        type=_positive_int,
        default=500,
        metavar="N",
        help="probe vectors of the Hutchinson estimator (default 500)",
    )
    curv.add_argument(
        "--out", metavar="DIR", help="also write curvature.txt and curvature.json into DIR"
    )
    _common(curv)


def _add_list(sub) -> None:
    lst = sub.add_parser(
        "list",
        help="list the paper reproductions",
        description="List the experiments `optbrain reproduce` can run.",
    )
    _common(lst, threads=False, progress=False)


def _add_reproduce(sub) -> None:
    rep = sub.add_parser(
        "reproduce",
        help="run a paper reproduction",
        description="Run the experiment NAME (see `optbrain list`) and write result.json, "
        "report.md and figures into the output directory.",
    )
    rep.add_argument("name", metavar="NAME", help="experiment name (see `optbrain list`)")
    rep.add_argument(
        "--quick", action="store_true", help="the small CI setting instead of the full one"
    )
    rep.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change a setting of the experiment's config (repeatable; sequences as 1,2,3)",
    )
    rep.add_argument("--out", metavar="DIR", help="output directory (default optbrain-runs/NAME)")
    rep.add_argument(
        "--seed",
        type=int,
        metavar="S",
        help="set the config's seed (or seeds S, S+1, ... keeping their number)",
    )
    rep.add_argument(
        "--check", action="store_true", help="exit with status 1 unless every claim held"
    )
    _common(rep)


def _add_prune(sub) -> None:
    from .tasks import METHODS

    prn = sub.add_parser(
        "prune",
        help="prune your own model (--task module:function)",
        description="Prune your own trained model with retraining. The task is a function "
        "without arguments, named module:function (imported with the current directory on "
        "sys.path) or path/to/file.py:function, that returns (model, loss_fn, train_loader, "
        "test_loader) or a dict with keys model, loss_fn, train_loader and optionally "
        "val_loader, test_loader. Writes METHOD/history.json, METHOD/model.pt (load it with "
        "optbrain.masking.load_pruned(model, path)), report.md and plots into --out.",
    )
    prn.add_argument(
        "--task", required=True, metavar="MODULE:FUNCTION", help="the function giving the task"
    )
    prn.add_argument(
        "--method",
        choices=("auto", *METHODS),
        default="auto",
        help="pruning method (auto: the one measured best, layerwise_obs with --retrain-epochs 0, "
        "obd with retraining; see docs/benchmarks.md)",
    )
    prn.add_argument(
        "--sparsity",
        type=_fraction,
        default=0.9,
        help="fraction of the prunable weights to delete in the end (0.9)",
    )
    prn.add_argument("--rounds", type=_positive_int, default=5, metavar="N", help="rounds (5)")
    prn.add_argument(
        "--retrain-epochs",
        type=_non_negative_int,
        default=1,
        metavar="E",
        help="retraining epochs after each round (1; 0: none)",
    )
    prn.add_argument(
        "--schedule",
        choices=("geometric", "linear", "cubic", "one_shot"),
        default="geometric",
        help="how the sparsity grows over the rounds (geometric: the same fraction of the "
        "remaining weights each round)",
    )
    prn.add_argument(
        "--lr", type=_positive_float, default=1e-3, help="retraining learning rate (1e-3)"
    )
    prn.add_argument(
        "--optimizer", choices=("adam", "sgd"), default="adam", help="retraining optimizer"
    )
    prn.add_argument("--seed", type=int, default=0, help="seed of retraining and random (0)")
    prn.add_argument(
        "--out",
        metavar="DIR",
        default=str(Path("optbrain-runs") / "prune"),
        help="output directory (default optbrain-runs/prune)",
    )
    _add_generalization(prn)
    prn.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run with the same settings from its checkpoint",
    )
    prn.add_argument(
        "--force",
        action="store_true",
        help="replace a run already in --out (refused without it)",
    )
    prn.add_argument(
        "--shards",
        choices=("split", "given"),
        default="split",
        help="under torchrun: split every training batch over the ranks (split, the default: "
        "every rank loads the whole data), or the task's loader yields this rank's shard (given)",
    )
    _common(prn)


def _add_generalization(prn: argparse.ArgumentParser) -> None:
    """Weight decay, FPE, round selection and the saliency stop of ``optbrain prune``."""
    prn.add_argument(
        "--weight-decay",
        type=_non_negative_float,
        default=0.0,
        metavar="LAMBDA",
        help="L2 weight decay of the retraining (PyTorch's weight_decay), also used by the "
        "saliencies that have a weight-decay form (obd, obs, gamma_obd, gamma_obs) and by FPE (0)",
    )
    prn.add_argument(
        "--fpe",
        nargs="?",
        const="diagonal",
        choices=("diagonal", "full"),
        default=None,
        help="record NNSYSID's FPE and N_eff of every round on the training data (diagonal "
        "form if no FORM is given; full: dense Gauss-Newton matrix, small nets)",
    )
    prn.add_argument(
        "--select",
        choices=("fpe", "validation"),
        default=None,
        help="choose a round (fpe: smallest FPE, turns --fpe on; validation: smallest validation "
        "loss; never the test set), keep every round's model and save the chosen one as "
        "METHOD/model_selected.pt",
    )
    prn.add_argument(
        "--stop-saliency",
        type=_finite_float,
        default=None,
        metavar="S",
        help="stop before a round whose smallest kept saliency exceeds S (0 with gamma_obd or "
        "gamma_obs: Pedersen et al.'s rule, stop when every deletion would raise the estimated "
        "test error)",
    )


def _add_report(sub) -> None:
    rpt = sub.add_parser(
        "report",
        help="rebuild report.md and plots of a run directory",
        description="Regenerate report.md and its PNG plots from the history JSON(s) in "
        "RUN_DIR (a directory written by `optbrain demo` or `optbrain prune`).",
    )
    rpt.add_argument("run_dir", metavar="RUN_DIR")
    _common(rpt, threads=False, progress=False)


# ------------------------------------------------------------------------------ commands
def _setup_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity == 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(
        level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


def _threads(n: int) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


def _fail(args: argparse.Namespace, exc: BaseException | str, code: int = 2) -> int:
    if isinstance(exc, BaseException) and args.verbose:
        log.error("details", exc_info=exc)
    text = exc if isinstance(exc, str) else (exc.args[0] if exc.args else str(exc))
    print(f"optbrain {args.command}: error: {text}", file=sys.stderr)
    return code


def _cmd_demo(args: argparse.Namespace) -> int:
    from . import demo

    _threads(args.threads)
    result = demo.run(
        args.out,
        epochs=args.epochs,
        rounds=args.rounds,
        rate=args.rate,
        retrain_epochs=args.retrain_epochs,
        seed=args.seed,
        progress=not args.no_progress,
    )
    print(result.table)
    print(f"\nreport: {result.report}  (plots, histories and pruned models in {result.run_dir})")
    model = result.run_dir / "obd" / "model.pt"
    print(
        "load a pruned model: optbrain.masking.load_pruned("
        f"optbrain.models.digits.digits_mlp(), {str(model)!r})"
    )
    return 0


def _cmd_curvature(args: argparse.Namespace) -> int:
    from . import curvature_report

    _threads(args.threads)
    result = curvature_report.run(
        epochs=args.epochs,
        seed=args.seed,
        progress=not args.no_progress,
        hutchinson_samples=args.hutchinson_samples,
        out=args.out,
    )
    print(result.table)
    if args.out:
        print(f"\nwrote {args.out}/curvature.txt and {args.out}/curvature.json")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from . import experiments

    names = experiments.names()
    width = max((len(n) for n in names), default=0)
    for name in names:
        print(f"{name:<{width}}  {experiments.REGISTRY[name].summary}")
    return 0


def _seed_settings(config, seed: int) -> dict[str, object]:
    """``--seed S`` as a setting: ``seed=S``, or ``seeds=S,S+1,...`` keeping their number."""
    keys = type(config).keys()
    if "seed" in keys:
        return {"seed": seed}
    if "seeds" in keys:
        n = max(1, len(config.seeds))
        return {"seeds": tuple(range(seed, seed + n))}
    raise ValueError(f"this experiment has no seed setting; its settings: {', '.join(keys)}")


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from . import experiments
    from .report.progress import Bars

    names = experiments.names()
    if args.name not in names:
        return _fail(args, f"unknown experiment {args.name!r}; choose from {', '.join(names)}")
    try:
        settings = experiments.parse_set_args(args.settings)
        config = experiments.make_config(args.name, args.quick, settings)
        if args.seed is not None:
            if {"seed", "seeds"} & set(settings):
                raise ValueError("give the seed with --seed or with --set, not both")
            config = experiments.apply_overrides(config, _seed_settings(config, args.seed))
    except (KeyError, ValueError) as exc:
        return _fail(args, exc)
    _threads(args.threads)
    out = Path(args.out) if args.out else Path("optbrain-runs") / args.name
    with Bars(not args.no_progress).stage(args.name, leave=True) as stage, _parallel(out) as dest:
        result = experiments.get(args.name).run(config, dest, progress=stage)
    print(f"{result.title or result.experiment}  ({result.seconds:.1f} s)")
    if args.quick:
        print(QUICK_BANNER)
    for claim in result.claims:
        print(f"  [{'held' if claim.held else 'NOT HELD'}] {claim.name}: {claim.detail}")
    held = sum(c.held for c in result.claims)
    print(f"{held} of {len(result.claims)} claims held; report: {out / 'report.md'}")
    return 1 if args.check and not result.held else 0


@contextlib.contextmanager
def _parallel(out: Path):
    """Under torchrun: every problem splits its batches over the ranks, and the ranks other
    than 0 write into a temporary folder, removed afterwards (rank 0 writes ``out``)."""
    from . import distributed

    if not distributed.world().active:
        yield out
        return
    with distributed.split_batches():
        if distributed.is_rank0():
            yield out
        else:
            with tempfile.TemporaryDirectory(prefix="optbrain-rank-") as tmp:
                yield Path(tmp)


def _cmd_prune(args: argparse.Namespace) -> int:
    from .errors import (
        NonFiniteDataError,
        OptbrainError,
        UnsafeFileError,
        UnsupportedModuleError,
    )
    from .loop import CheckpointError
    from .tasks import RunExistsError, TaskError, load_task, prune

    _threads(args.threads)
    try:
        task = load_task(args.task)
        result = prune(
            task,
            method=args.method,
            sparsity=args.sparsity,
            rounds=args.rounds,
            retrain_epochs=args.retrain_epochs,
            out_dir=args.out,
            schedule=args.schedule,
            lr=args.lr,
            optimizer=args.optimizer,
            seed=args.seed,
            resume=args.resume,
            force=args.force,
            progress=not args.no_progress,
            shards=args.shards,
            weight_decay=args.weight_decay,
            fpe=args.fpe,
            select=args.select,
            stop_saliency=args.stop_saliency,
        )
    except (
        TaskError,
        CheckpointError,
        RunExistsError,
        NonFiniteDataError,
        UnsafeFileError,
        UnsupportedModuleError,
    ) as exc:  # what the user gave or pointed at (a model the method cannot read)
        return _fail(args, exc)
    except OptbrainError as exc:
        return _fail(args, exc, code=1)
    except ValueError as exc:  # e.g. a method that needs retraining with --retrain-epochs 0
        return _fail(args, exc)
    print(result.table)
    print(f"\nreport: {result.report}")
    print(
        "load the pruned model: optbrain.masking.load_pruned(<a fresh model of the same "
        f"architecture>, {str(result.model_path)!r})"
    )
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from . import report

    try:
        path = report.regenerate(args.run_dir)
    except (report.NoHistoryError, ValueError) as exc:
        return _fail(args, exc)
    print(f"wrote {path}")
    for png in sorted(path.parent.glob("*.png")):
        print(f"wrote {png}")
    return 0


# ------------------------------------------------------------------------------ quantize
# One self-contained block: the parser, the command; the logic is optbrain.quantize.task.
def _add_quantize(sub) -> None:
    from .quantize.task import METHODS as QMETHODS

    q = sub.add_parser(
        "quantize",
        help="quantise your own model (--task module:function) with RTN, GPTQ or OBQ",
        description="Post-training quantisation of your own trained model (the task function of "
        "`optbrain prune`: it returns model, loss_fn, train_loader, test_loader or a dict). "
        "The training loader's inputs calibrate the layer-wise Hessians; every Linear/Conv "
        "layer is quantised block by block. Writes quantized.pt (packed integer weights, "
        "scales, zero points; load it with optbrain.quantize.load_quantized(model, path)), "
        "report.json and report.md into --out, and prints the per-layer report.",
    )
    q.add_argument(
        "--task", required=True, metavar="MODULE:FUNCTION", help="the function giving the task"
    )
    q.add_argument("--method", choices=QMETHODS, default="gptq", help="quantiser (gptq)")
    q.add_argument(
        "--bits", type=int, choices=range(2, 9), default=4, metavar="B", help="bits 2-8 (4)"
    )
    q.add_argument(
        "--group-size",
        type=_positive_int,
        default=None,
        metavar="G",
        help="a grid every G columns of a row (default: one grid per output row); when G does "
        "not divide the columns the last group is smaller",
    )
    q.add_argument(
        "--act-order",
        action="store_true",
        help="GPTQ: columns by decreasing Hessian diagonal (refused with rtn and obq)",
    )
    q.add_argument("--static-groups", action="store_true", help="fit group grids up front")
    q.add_argument("--sym", action="store_true", help="symmetric grids (default asymmetric)")
    q.add_argument("--damping", type=float, default=0.01, help="λ = damping·mean(diag H) (0.01)")
    q.add_argument(
        "--sparsity",
        type=_fraction,
        default=None,
        help="joint compression: prune this fraction of every layer with layer-wise OBS first, "
        "then quantise the survivors (gptq or obq)",
    )
    q.add_argument(
        "--sequential",
        choices=("block", "layer", "none"),
        default="block",
        help="calibrate block by block on the quantised earlier blocks (block)",
    )
    q.add_argument(
        "--calibration-batches",
        type=_positive_int,
        default=None,
        metavar="N",
        help="calibrate on the first N training batches (default all)",
    )
    q.add_argument(
        "--out",
        metavar="DIR",
        default=str(Path("optbrain-runs") / "quantize"),
        help="output directory (default optbrain-runs/quantize)",
    )
    q.add_argument(
        "--force",
        "--overwrite",
        dest="overwrite",
        action="store_true",
        help="replace the files of an earlier run in DIR (as optbrain prune --force)",
    )
    _common(q, progress=False)


def _cmd_quantize(args: argparse.Namespace) -> int:
    from .errors import OptbrainError
    from .quantize.task import quantize_task
    from .tasks import TaskError

    _threads(args.threads)
    try:
        result = quantize_task(
            args.task,
            method=args.method,
            bits=args.bits,
            out_dir=args.out,
            calibration_batches=args.calibration_batches,
            sparsity=args.sparsity,
            overwrite=args.overwrite,
            group_size=args.group_size,
            act_order=args.act_order,
            static_groups=args.static_groups,
            sym=args.sym,
            damping=args.damping,
            sequential=args.sequential,
        )
    except (TaskError, FileExistsError, ValueError, TypeError) as exc:
        return _fail(args, exc)
    except OptbrainError as exc:
        return _fail(args, exc, code=1)
    print(result.table)
    print(f"\nreport: {result.out_dir / 'report.md'}")
    return 0


_COMMANDS = {
    "demo": _cmd_demo,
    "curvature": _cmd_curvature,
    "list": _cmd_list,
    "reproduce": _cmd_reproduce,
    "prune": _cmd_prune,
    "report": _cmd_report,
    "quantize": _cmd_quantize,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``optbrain`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if args.command in _PARALLEL and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return _distributed(args)
    return _COMMANDS[args.command](args)


_PARALLEL = ("prune", "reproduce")
"""The commands that run data-parallel under torchrun."""


def _distributed(args: argparse.Namespace) -> int:
    """Run a command as one rank of torchrun's process group (gloo on CPU, NCCL with CUDA, or
    ``OPTBRAIN_DIST_BACKEND``); only rank 0 prints. The group is closed afterwards."""
    import torch.distributed as dist

    from . import distributed

    started = not dist.is_initialized()
    world = distributed.init_from_env(os.environ.get("OPTBRAIN_DIST_BACKEND") or None)
    with contextlib.ExitStack() as stack:
        if world.rank != 0:
            sink = stack.enter_context(open(os.devnull, "w"))
            stack.enter_context(contextlib.redirect_stdout(sink))
        try:
            return _COMMANDS[args.command](args)
        finally:
            if started and dist.is_initialized():
                dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
