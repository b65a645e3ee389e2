"""The small framework every reproduction in :mod:`optbrain.experiments` is written in.

An experiment module defines

* ``NAME`` (str) and ``SUMMARY`` (one line for ``optbrain list``);
* ``Config``: a dataclass derived from :class:`Config`, whose defaults are the full setting and
  whose :meth:`Config.quick` classmethod gives the CI-sized one;
* ``run(config, out_dir, progress=None) -> Result``, which writes **only** under ``out_dir``:
  ``result.json`` (:meth:`Result.to_dict`), ``report.md`` (:meth:`Result.to_markdown`), PNG figures
  and JSON histories.

``progress(done, total, stage)`` (:data:`Progress`) is called after each unit of work with a short
description of the stage just finished; experiments never print (they log through :mod:`logging`).
A :class:`Session` does that bookkeeping for ``run``: it validates the config, makes ``out_dir``,
counts and logs the units of work, lists the files written and finally saves the result.

Settings from the command line (``--set key=value``) go through :func:`apply_overrides`, which
parses each string into the type of the dataclass field (``int``, ``float``, ``bool``, ``str``,
``Literal[...]``, ``X | None``, ``tuple[X, ...]`` written ``1,2,3``) and rejects unknown keys and
bad values with a :class:`ValueError` that names the key and the valid keys (or the expected type).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from ..jsonio import from_jsonable, to_jsonable, write_json, write_text

__all__ = [
    "Claim",
    "Config",
    "Progress",
    "Result",
    "Session",
    "apply_overrides",
    "markdown_table",
    "parse_set_args",
    "write_json",
    "write_text",
]

Progress = Callable[[int, int, str], None]
"""``progress(done, total, stage)``: ``done`` of ``total`` units of work finished, ``stage`` says
which (e.g. ``"cnn seed 0: retrain round 3/14"``)."""

RESULT_JSON = "result.json"
REPORT_MD = "report.md"

C = TypeVar("C", bound="Config")


# --------------------------------------------------------------------------- configuration
@dataclass
class Config:
    """Base of every experiment's configuration (a dataclass; defaults = the full setting).

    Subclasses add fields, override :meth:`quick` and, where values need more than a type check,
    :meth:`validate` (raise ``ValueError`` naming the field).
    """

    @classmethod
    def quick(cls: type[C]) -> C:
        """The CI-sized setting (a fraction of a minute on two CPU cores)."""
        return cls()

    def validate(self) -> None:
        """Raise ``ValueError`` (naming the field) for values the types allow but the experiment
        does not. Called by :func:`apply_overrides` and by ``run``."""

    def need(self, ok: bool, key: str, what: str) -> None:
        """For :meth:`validate`: raise ``ValueError`` naming setting ``key``, its value and
        ``what`` is wrong with it, unless ``ok``."""
        if not ok:
            raise ValueError(f"setting {key!r} = {getattr(self, key)!r}: {what}")

    def need_seeds(self, key: str = "seeds") -> None:
        """For :meth:`validate`: at least one seed in ``key``, all distinct."""
        seeds = getattr(self, key)
        self.need(len(seeds) > 0, key, "give at least one seed")
        self.need(len(set(seeds)) == len(seeds), key, "seeds must be distinct")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of the fields (tuples become lists)."""
        return to_jsonable(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls: type[C], d: Mapping[str, Any]) -> C:
        """Inverse of :meth:`to_dict` (values are checked like overrides)."""
        return apply_overrides(cls(), dict(d))

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]


def parse_set_args(items: Iterable[str]) -> dict[str, str]:
    """``["a=1", "b=x,y"] -> {"a": "1", "b": "x,y"}`` (the value may contain ``=``)."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"a setting must look like key=value, not {item!r}")
        out[key] = value.strip()
    return out


def apply_overrides(config: C, overrides: Mapping[str, Any] | Iterable[str]) -> C:
    """A copy of ``config`` with ``overrides`` applied and validated.

    ``overrides`` maps field names to values, or is an iterable of ``"key=value"`` strings. String
    values are parsed into the field's type; other values are type-checked (lists become tuples).
    Unknown keys and unparsable or invalid values raise ``ValueError`` naming the key.
    """
    if not isinstance(overrides, Mapping):
        overrides = parse_set_args(overrides)
    cls = type(config)
    hints = get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    changes: dict[str, Any] = {}
    for key, value in overrides.items():
        if key not in valid:
            raise ValueError(
                f"unknown setting {key!r} for {cls.__module__}.{cls.__qualname__}; "
                f"valid keys: {', '.join(valid)}"
            )
        tp = hints[key]
        try:
            changes[key] = _coerce(value, tp)
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"bad value {value!r} for setting {key!r} (expected {_describe(tp)}): {exc}"
            ) from None
    new = dataclasses.replace(config, **changes)
    new.validate()
    return new


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _coerce(value: Any, tp: Any) -> Any:
    """``value`` (a string from ``--set``, or a Python value) as the annotated type ``tp``."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        return _coerce_union(value, get_args(tp))
    if origin is Literal:
        return _coerce_literal(value, get_args(tp))
    if origin in (tuple, list, Sequence, typing.Sequence):
        return _coerce_sequence(value, origin, get_args(tp))
    if tp in _SCALARS:
        return _SCALARS[tp](value)
    raise TypeError(f"settings of type {_describe(tp)} cannot be set")


def _coerce_union(value: Any, args: tuple) -> Any:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null")):
        if type(None) in args:
            return None
    errors = []
    for a in args:
        if a is type(None):
            continue
        try:
            return _coerce(value, a)
        except (TypeError, ValueError) as exc:
            errors.append(str(exc))
    raise ValueError("; ".join(errors) or "no type fits")


def _coerce_literal(value: Any, args: tuple) -> Any:
    for choice in args:
        try:
            v = _coerce(value, type(choice))
        except (TypeError, ValueError):
            continue
        if v == choice:
            return choice
    raise ValueError(f"choose one of {', '.join(repr(a) for a in args)}")


def _coerce_sequence(value: Any, origin: Any, args: tuple) -> Any:
    items = _split(value) if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise TypeError(f"expected a sequence, got {type(items).__name__}")
    if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
        if len(items) != len(args):
            raise ValueError(f"expected {len(args)} values, got {len(items)}")
        return tuple(_coerce(v, a) for v, a in zip(items, args))
    inner = args[0] if args else Any
    out = []
    for v in items:
        try:
            out.append(_coerce(v, inner))
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"item {v!r}: {exc}") from None
    return tuple(out) if origin is not list else out


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError("expected true or false")


def _to_int(value: Any) -> int:
    if isinstance(value, bool):
        raise TypeError("expected an integer, not a bool")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        return int(value.strip())
    raise TypeError(f"expected an integer, got {type(value).__name__}")


def _to_float(value: Any) -> float:
    if isinstance(value, bool):
        raise TypeError("expected a number, not a bool")
    if isinstance(value, (int, float)):
        out = float(value)
    elif isinstance(value, str):
        out = float(value.strip())
    else:
        raise TypeError(f"expected a number, got {type(value).__name__}")
    if math.isnan(out):
        raise ValueError("NaN is not allowed")
    return out


def _to_str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


_SCALARS = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str}


def _split(text: str) -> list[str]:
    text = text.strip()
    if len(text) >= 2 and text[0] + text[-1] in ("()", "[]"):
        text = text[1:-1]
    return [t.strip().strip("'\"") for t in text.split(",") if t.strip()]


def _describe(tp: Any) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join("None" if a is type(None) else _describe(a) for a in args)
    if origin in (tuple, list):
        inner = args[0] if args else Any
        return f"comma-separated values, each {_describe(inner)}"
    return getattr(tp, "__name__", str(tp))


# --------------------------------------------------------------------------- results
@dataclass
class Claim:
    """One claim of the paper and whether our run reproduces it.

    ``paper``: what the paper says (with its numbers); ``detail``: what we measured; ``held``:
    whether our numbers meet the criterion stated in ``detail``.
    """

    name: str
    held: bool
    detail: str
    paper: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Claim:
        return cls(str(d["name"]), bool(d["held"]), str(d["detail"]), str(d.get("paper", "")))


@dataclass
class Result:
    """What an experiment run produced.

    ``tables`` maps a table name to its rows (dicts with the same keys); ``figures`` and ``files``
    are paths relative to the run's output directory (``out_dir``); ``notes`` are markdown lines
    (setting, caveats) shown at the top of ``report.md``.
    """

    experiment: str
    config: dict[str, Any]
    claims: list[Claim] = field(default_factory=list)
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    figures: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    title: str = ""
    seconds: float = 0.0
    out_dir: str | None = None

    @property
    def held(self) -> bool:
        """True when every claim held."""
        return all(c.held for c in self.claims)

    def claim(self, name: str) -> Claim:
        for c in self.claims:
            if c.name == name:
                return c
        raise KeyError(f"no claim {name!r}; claims: {[c.name for c in self.claims]}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["claims"] = [c.to_dict() for c in self.claims]
        return to_jsonable(d)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Result:
        d = from_jsonable(dict(d))
        try:
            return cls(
                experiment=d["experiment"],
                config=dict(d.get("config", {})),
                claims=[Claim.from_dict(c) for c in d.get("claims", [])],
                tables={k: [dict(r) for r in v] for k, v in d.get("tables", {}).items()},
                figures=list(d.get("figures", [])),
                files=list(d.get("files", [])),
                notes=list(d.get("notes", [])),
                title=d.get("title", ""),
                seconds=float(d.get("seconds", 0.0)),
                out_dir=d.get("out_dir"),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not an experiment result: {exc}") from exc

    @classmethod
    def load(cls, path: str | Path) -> Result:
        """Read ``result.json`` (a file, or the directory holding it)."""
        path = Path(path)
        if path.is_dir():
            path = path / RESULT_JSON
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON: {exc}") from exc

    def save(self, out_dir: str | Path | None = None) -> Path:
        """Write ``result.json`` and ``report.md`` into ``out_dir`` (default: ``self.out_dir``)."""
        out = Path(out_dir if out_dir is not None else self.out_dir or ".")
        for name in (RESULT_JSON, REPORT_MD):
            if name not in self.files:
                self.files.append(name)
        write_text(out / REPORT_MD, self.to_markdown())
        write_json(out / RESULT_JSON, self.to_dict())
        return out / RESULT_JSON

    def claims_table(self) -> str:
        """The markdown table ``claim | paper | ours | held?``."""
        rows = [
            {
                "claim": c.name,
                "paper": c.paper,
                "ours": c.detail,
                "held?": "yes" if c.held else "**no**",
            }
            for c in self.claims
        ]
        return markdown_table(rows, ["claim", "paper", "ours", "held?"])

    def to_markdown(self, tables: Sequence[str] | None = None) -> str:
        """``report.md``: title, notes, claims table, the named tables (default all), figures."""
        lines = [f"# {self.title or self.experiment}", ""]
        if self.notes:
            lines += [*self.notes, ""]
        if self.claims:
            held = sum(c.held for c in self.claims)
            lines += [f"## Claims ({held} of {len(self.claims)} held)", "", self.claims_table(), ""]
        for name in tables if tables is not None else list(self.tables):
            rows = self.tables.get(name, [])
            if rows:
                lines += [f"## {name}", "", markdown_table(rows), ""]
        if self.figures:
            lines += ["## Figures", ""]
            lines += [f"![{Path(f).stem}]({f})" for f in self.figures]
            lines.append("")
        lines.append(f"Run time: {self.seconds:.1f} s.")
        return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- helpers
def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A pipe table; floats get 4 significant digits, ``|`` in cells is escaped."""
    if not rows:
        return ""
    cols = list(columns) if columns is not None else list(rows[0])

    def cell(v: Any) -> str:
        if isinstance(v, float):
            text = "nan" if math.isnan(v) else f"{v:.4g}"
        else:
            text = "" if v is None else str(v)
        return text.replace("|", "\\|").replace("\n", " ")

    out = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    out += ["| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(out)


# --------------------------------------------------------------------------- one run
class Session:
    """The bookkeeping of one ``run``: validates ``config``, makes ``out_dir``, starts the clock.

    :meth:`tick` counts one of ``total`` units of work done (logged on ``log``, passed to
    ``progress``); :meth:`write_json` and :meth:`path` list the files written; :meth:`finish`
    lists the figures, ticks the last unit (``"figures"``), times and saves the result.
    """

    def __init__(
        self,
        config: Config,
        out_dir: str | Path,
        total: int,
        progress: Progress | None = None,
        log: logging.Logger | None = None,
    ):
        config.validate()
        self.config = config
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.total = total
        self.done = 0
        self.progress = progress
        self.log = log if log is not None else logging.getLogger(__name__)
        self.files: list[str] = []
        self.start = time.perf_counter()

    def tick(self, stage: str) -> None:
        """One more unit of work done; ``stage`` says which."""
        self.done += 1
        elapsed = time.perf_counter() - self.start
        self.log.info("%s (%d/%d, %.0f s)", stage, self.done, self.total, elapsed)
        if self.progress is not None:
            self.progress(self.done, self.total, stage)

    def path(self, rel: str) -> Path:
        """``out_dir / rel`` with its folder made; ``rel`` is listed among the files written."""
        path = self.out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        self.files.append(rel)
        return path

    def write_json(self, rel: str, data: Any) -> None:
        """Write ``data`` as JSON to ``out_dir / rel`` and list it."""
        write_json(self.path(rel), data)

    def result(self, experiment: str, title: str) -> Result:
        """An empty :class:`Result` of this run, to be filled by the analysis."""
        return Result(
            experiment=experiment, config=self.config.to_dict(), title=title, out_dir=str(self.out)
        )

    def finish(self, result: Result, figures: Sequence[str]) -> Result:
        """Give ``result`` its files (those written, then ``figures``) and figures, tick
        ``"figures"``, set its run time, save ``result.json`` and ``report.md``; returns it."""
        result.figures = list(figures)
        result.files = [*self.files, *result.figures]
        self.tick("figures")
        result.seconds = time.perf_counter() - self.start
        result.save(self.out)
        return result
