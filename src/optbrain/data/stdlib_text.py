"""An offline character-level text corpus: the source of Python's standard library.

Every machine that runs optbrain has it. The files are the ``*.py`` files under
``sysconfig.get_paths()["stdlib"]``, without test suites (``test``/``tests``/``idle_test``
folders, which some distributions leave out) and without ``site-packages``. The split is by
file and fixed: a file's split depends only on its path relative to the library root
(``crc32(path) mod 100``: < 90 train, < 95 validation, else test), so it is the same on every
machine with the same Python version (the library's text differs between Python versions:
:attr:`StdlibText.digest` identifies it). Within a split, files are concatenated in the order of
``crc32(path)`` (then path), each followed by a blank line; ``max_chars`` keeps the first files
of that order whose text fits.

Characters are encoded over a fixed vocabulary: the 95 printable ASCII characters, newline and
tab (ids 0–96) and one id (97) for every other character. Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import sysconfig
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "UNK",
    "StdlibText",
    "VOCAB",
    "VOCAB_SIZE",
    "decode",
    "encode",
    "load_stdlib_text",
    "random_windows",
    "split_of",
    "stdlib_files",
    "windows",
]

VOCAB = "\n\t" + "".join(chr(c) for c in range(32, 127))
UNK = len(VOCAB)  # every other character
VOCAB_SIZE = len(VOCAB) + 1
_INDEX = {c: i for i, c in enumerate(VOCAB)}
_TABLE = torch.full((256,), UNK, dtype=torch.uint8)
for _c, _i in _INDEX.items():
    _TABLE[ord(_c)] = _i
SPLITS = ("train", "val", "test")
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def encode(text: str) -> Tensor:
    """Character ids (uint8) of ``text`` over :data:`VOCAB` (other characters → :data:`UNK`)."""
    if not text:
        return torch.zeros(0, dtype=torch.uint8)
    codes = torch.from_numpy(
        np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
    )
    return torch.where(codes < 256, _TABLE[codes.clamp_max(255)], UNK).to(torch.uint8)


def decode(ids: Tensor) -> str:
    """Inverse of :func:`encode` (unknown characters as U+FFFD)."""
    return "".join(VOCAB[i] if i < UNK else "\ufffd" for i in ids.tolist())


def split_of(relpath: str) -> str:
    """The fixed split of a file, from its path relative to the library root (``/`` separated)."""
    bucket = zlib.crc32(relpath.encode()) % 100
    return "train" if bucket < 90 else "val" if bucket < 95 else "test"


def _order(relpath: str) -> tuple[int, str]:
    return zlib.crc32(b"order:" + relpath.encode()), relpath


def stdlib_files(root: str | Path | None = None) -> list[str]:
    """Relative paths of the corpus files under ``root`` (default: this Python's stdlib), sorted."""
    base = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    if not base.is_dir():
        raise FileNotFoundError(f"no standard-library folder at {base}")
    out = []
    for p in base.rglob("*.py"):
        rel = p.relative_to(base)
        if _SKIP_DIRS.isdisjoint(rel.parts[:-1]):
            out.append(rel.as_posix())
    return sorted(out)


@dataclass
class StdlibText:
    """The encoded splits (uint8 ids), the files in each, and where the text came from."""

    train: Tensor
    val: Tensor
    test: Tensor
    files: dict[str, list[str]] = field(default_factory=dict)
    root: str = ""
    digest: str = ""

    def split(self, name: str) -> Tensor:
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, not {name!r}")
        return getattr(self, name)

    def summary(self) -> dict:
        return {
            "root": self.root,
            "digest": self.digest,
            **{f"{s}_chars": int(self.split(s).numel()) for s in SPLITS},
            **{f"{s}_files": len(self.files.get(s, [])) for s in SPLITS},
            "unknown_fraction": float(
                sum(int((self.split(s) == UNK).sum()) for s in SPLITS)
                / max(1, sum(self.split(s).numel() for s in SPLITS))
            ),
        }


def load_stdlib_text(
    max_chars: dict[str, int | None] | None = None, root: str | Path | None = None
) -> StdlibText:
    """The corpus (see the module docstring); ``max_chars`` caps each split (``{"train": 10**6}``;
    missing or None: no cap)."""
    caps = dict(max_chars or {})
    unknown = set(caps) - set(SPLITS)
    if unknown:
        raise ValueError(f"max_chars has unknown splits {sorted(unknown)}; splits: {SPLITS}")
    base = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    files = stdlib_files(base)
    by_split: dict[str, list[str]] = {s: [] for s in SPLITS}
    for rel in sorted(files, key=_order):
        by_split[split_of(rel)].append(rel)
    texts, used, digest = {}, {}, hashlib.sha256()
    for s in SPLITS:
        cap = caps.get(s)
        parts, n = [], 0
        used[s] = []
        for rel in by_split[s]:
            text = (base / rel).read_text(encoding="utf-8", errors="replace") + "\n\n"
            if cap is not None and n + len(text) > cap:
                if n == 0:  # at least part of one file
                    parts.append(text[:cap])
                    used[s].append(rel)
                break
            parts.append(text)
            used[s].append(rel)
            n += len(text)
        joined = "".join(parts)
        if not joined:
            raise ValueError(f"the {s} split of {base} is empty")
        digest.update(joined.encode("utf-8", errors="replace"))
        texts[s] = encode(joined)
    return StdlibText(**texts, files=used, root=str(base), digest=digest.hexdigest()[:16])


def random_windows(
    ids: Tensor, count: int, length: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """``count`` random windows of ``length`` ids (inputs) and the same shifted by one (targets),
    both ``count × length`` long tensors."""
    if ids.numel() < length + 1:
        raise ValueError(f"text of {ids.numel()} characters is shorter than a window of {length}")
    start = torch.randint(0, ids.numel() - length, (count,), generator=generator)
    idx = start[:, None] + torch.arange(length + 1)
    w = ids.long()[idx]
    return w[:, :-1], w[:, 1:]


def windows(ids: Tensor, length: int, limit: int | None = None) -> tuple[Tensor, Tensor]:
    """Non-overlapping windows of ``length`` ids covering the text from its start (at most
    ``limit``), with their next-character targets: the perplexity protocol of GPTQ."""
    n = (ids.numel() - 1) // length
    if limit is not None:
        n = min(n, limit)
    if n < 1:
        raise ValueError(f"text of {ids.numel()} characters is shorter than a window of {length}")
    w = ids.long()[: n * length + 1]
    return w[:-1].reshape(n, length), w[1:].reshape(n, length)
