"""Command line interface: ``optbrain demo``, ``optbrain --version``.

Thin by design: parse arguments, set up logging, call the library, print what it returns.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

__all__ = ["build_parser", "main"]


def _version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("optbrain")
    except PackageNotFoundError:  # pragma: no cover - only when run from an uninstalled tree
        return "unknown"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="optbrain",
        description="Second-order (Optimal Brain Damage / Surgeon) pruning for PyTorch.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="train a digits MLP and compare the curvature estimators on it",
        description="Train the 64-300-100-10 digits MLP, then time every diagonal curvature "
        "estimator against one gradient pass and compare their OBD saliencies and rankings.",
    )
    demo.add_argument(
        "--epochs", type=_non_negative_int, default=40, help="training epochs (default 40)"
    )
    demo.add_argument("--seed", type=int, default=0, help="seed of split, init, training (0)")
    demo.add_argument(
        "--hutchinson-samples",
        type=_positive_int,
        default=500,
        metavar="N",
        help="probe vectors of the Hutchinson estimator (default 500)",
    )
    demo.add_argument(
        "--threads",
        type=_non_negative_int,
        default=1,
        metavar="N",
        help="torch CPU threads (default 1: the demo's nets are too small to gain from more, and "
        "threads thrash on a busy machine; 0 keeps torch's default)",
    )
    demo.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=argparse.SUPPRESS,
        help="more log output (-vv for debug)",
    )
    demo.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    demo.add_argument("--out", metavar="DIR", help="also write demo.txt and demo.json into DIR")
    return parser


def _setup_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity == 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(
        level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``optbrain`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if args.command == "demo":
        import torch

        from . import demo

        if args.threads:
            torch.set_num_threads(args.threads)

        result = demo.run(
            epochs=args.epochs,
            seed=args.seed,
            progress=not args.no_progress,
            hutchinson_samples=args.hutchinson_samples,
            out=args.out,
        )
        print(result.table)
        if args.out:
            print(f"\nwrote {args.out}/demo.txt and {args.out}/demo.json")
        return 0
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover - argparse catches it
    return 2  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
