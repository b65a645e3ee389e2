"""An offline translation task: English number words to German number words (``num2words``).

The extreme-sparsity study (PAPERS.md §14.2) prunes an LSTM translation model; IWSLT cannot be
downloaded here, so the sentences are generated: the integers 1 … ``n_max`` written out by the
`num2words <https://pypi.org/project/num2words/>`_ package in English (source) and German
(target). German puts the units before the tens ("vierundzwanzig", *four-and-twenty*), so the
model must reorder, not copy word by word::

    324  three hundred and twenty four  →  drei hundert vier und zwanzig

Tokens: English is split at spaces and hyphens (commas dropped). German writes a number below a
million as one compound word; it is split into number morphemes by greedy longest match over
:data:`GERMAN_MORPHEMES` (``"dreihundertvierundzwanzig"`` → ``drei hundert vier und zwanzig``),
and joining the morphemes gives num2words' word back (checked for every number generated).

A :class:`NumberTranslation` holds a fixed train / valid / test split of the numbers (a seeded
permutation, independent of any model seed), the two vocabularies and padded index tensors:
``PAD`` = 0, ``BOS`` = 1, ``EOS`` = 2 in both vocabularies. Targets have one fixed length (the
longest sentence plus ``EOS``), padded with ``PAD`` — a real class the model predicts after
``EOS``, so no ``ignore_index`` is needed and optbrain's closed-form cross-entropy curvature
applies. Sources have one fixed length too (right-padded with ``PAD``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

__all__ = [
    "BOS",
    "EOS",
    "GERMAN_MORPHEMES",
    "PAD",
    "NumberTranslation",
    "Vocab",
    "english_tokens",
    "german_tokens",
    "load_number_translation",
    "segment",
]

PAD, BOS, EOS = 0, 1, 2
SPECIALS = ("<pad>", "<s>", "</s>")

#: German number morphemes below a million; longest match first (``sechzehn`` before ``sechs``).
GERMAN_MORPHEMES = (
    "ein eins zwei drei vier fünf sechs sieben acht neun zehn elf zwölf dreizehn vierzehn "
    "fünfzehn sechzehn siebzehn achtzehn neunzehn zwanzig dreißig vierzig fünfzig sechzig "
    "siebzig achtzig neunzig hundert tausend und"
).split()


def _num2words():
    try:
        from num2words import num2words
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the number-translation data need num2words; install it with "
            "`pip install -c constraints.txt 'optbrain[nmt]'`"
        ) from exc
    return num2words


def segment(word: str, morphemes: Sequence[str] = GERMAN_MORPHEMES) -> list[str]:
    """``word`` split into ``morphemes`` by greedy longest match; ``ValueError`` if a rest of
    the word matches none."""
    by_length = sorted(morphemes, key=len, reverse=True)
    out, i = [], 0
    while i < len(word):
        for m in by_length:
            if word.startswith(m, i):
                out.append(m)
                i += len(m)
                break
        else:
            raise ValueError(f"cannot split {word!r} at {word[i:]!r} into number morphemes")
    return out


def _check_number(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n < 1_000_000:
        raise ValueError(f"numbers must be ints in [1, 999999], not {n!r}")


@lru_cache(maxsize=1 << 16)
def english_tokens(n: int) -> tuple[str, ...]:
    """num2words(n) in English, split at spaces and hyphens, commas dropped."""
    _check_number(n)
    text = _num2words()(n, lang="en").replace(",", " ").replace("-", " ")
    return tuple(text.split())


@lru_cache(maxsize=1 << 16)
def german_tokens(n: int) -> tuple[str, ...]:
    """num2words(n) in German, each word split into number morphemes (:func:`segment`)."""
    _check_number(n)
    out: list[str] = []
    for word in _num2words()(n, lang="de").split():
        parts = segment(word.lower())
        if "".join(parts) != word.lower():  # pragma: no cover - segment guarantees it
            raise AssertionError(f"segmenting {word!r} lost letters")
        out += parts
    return tuple(out)


@dataclass(frozen=True)
class Vocab:
    """Tokens ↔ indices: the specials ``<pad>``, ``<s>``, ``</s>`` (0, 1, 2), then the words
    in sorted order."""

    tokens: tuple[str, ...]

    @classmethod
    def build(cls, sentences: Sequence[Sequence[str]]) -> Vocab:
        words = sorted({w for s in sentences for w in s} - set(SPECIALS))
        return cls((*SPECIALS, *words))

    def __len__(self) -> int:
        return len(self.tokens)

    def index(self, word: str) -> int:
        try:
            return self._lookup()[word]
        except KeyError:
            raise KeyError(f"{word!r} is not in the vocabulary") from None

    def _lookup(self) -> dict[str, int]:
        return {w: i for i, w in enumerate(self.tokens)}

    def encode(self, sentence: Sequence[str]) -> list[int]:
        table = self._lookup()
        missing = [w for w in sentence if w not in table]
        if missing:
            raise KeyError(f"words {missing} are not in the vocabulary")
        return [table[w] for w in sentence]

    def decode(self, ids: Sequence[int]) -> list[str]:
        """Tokens up to the first ``EOS`` (``PAD`` and ``BOS`` skipped)."""
        out = []
        for i in ids:
            i = int(i)
            if i == EOS:
                break
            if i not in (PAD, BOS):
                out.append(self.tokens[i])
        return out


@dataclass
class NumberTranslation:
    """The split and its tensors.

    ``numbers[split]``: the integers of ``"train"``, ``"valid"``, ``"test"``; ``src[split]``
    (N, S) source indices right-padded with ``PAD``; ``tgt_in[split]`` (N, T) = ``BOS`` +
    target + ``PAD``…; ``tgt_out[split]`` (N, T) = target + ``EOS`` + ``PAD``… (teacher forcing:
    position t of ``tgt_in`` predicts position t of ``tgt_out``).
    """

    numbers: dict[str, list[int]]
    src_vocab: Vocab
    tgt_vocab: Vocab
    src: dict[str, Tensor]
    tgt_in: dict[str, Tensor]
    tgt_out: dict[str, Tensor]

    @property
    def src_len(self) -> int:
        return int(next(iter(self.src.values())).shape[1])

    @property
    def tgt_len(self) -> int:
        return int(next(iter(self.tgt_out.values())).shape[1])

    def inputs(self, split: str) -> Tensor:
        """(N, S + T): the source and the teacher-forced target input side by side, the one
        tensor :class:`~optbrain.models.Seq2SeqAttention` reads."""
        return torch.cat([self.src[split], self.tgt_in[split]], 1)

    def references(self, split: str) -> list[str]:
        """The target sentences of ``split`` as space-joined tokens (BLEU references)."""
        return [" ".join(german_tokens(n)) for n in self.numbers[split]]


def _pad(rows: list[list[int]], length: int) -> Tensor:
    out = torch.full((len(rows), length), PAD, dtype=torch.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.int64)
    return out


def load_number_translation(
    n_max: int = 9999,
    sizes: tuple[int, int, int] = (4000, 500, 1000),
    seed: int = 0,
) -> NumberTranslation:
    """The numbers 1 … ``n_max``, a seeded permutation cut into ``sizes`` = (train, valid, test)
    numbers (disjoint; the rest unused), vocabularies and lengths over the sentences of all three
    splits (so valid and test have no unknown words) and the padded tensors. Deterministic for a
    given ``(n_max, sizes, seed)``; the global RNG is untouched."""
    if isinstance(n_max, bool) or not isinstance(n_max, int) or not 1 <= n_max < 1_000_000:
        raise ValueError(f"n_max must be an int in [1, 999999], not {n_max!r}")
    if len(sizes) != 3 or any(int(s) < 1 for s in sizes):
        raise ValueError(f"sizes must be three positive counts (train, valid, test), not {sizes}")
    if sum(sizes) > n_max:
        raise ValueError(f"sizes {tuple(sizes)} need {sum(sizes)} numbers; 1 … {n_max} has {n_max}")
    order = torch.randperm(n_max, generator=torch.Generator().manual_seed(seed)) + 1
    cuts = [0, sizes[0], sizes[0] + sizes[1], sum(sizes)]
    used = [int(v) for v in order[: cuts[-1]]]
    src_vocab = Vocab.build([english_tokens(n) for n in used])
    tgt_vocab = Vocab.build([german_tokens(n) for n in used])
    s_len = max(len(english_tokens(n)) for n in used)
    t_len = max(len(german_tokens(n)) for n in used) + 1
    numbers, src, tgt_in, tgt_out = {}, {}, {}, {}
    for i, split in enumerate(("train", "valid", "test")):
        nums = [int(v) for v in order[cuts[i] : cuts[i + 1]]]
        numbers[split] = nums
        tgt = [tgt_vocab.encode(german_tokens(n)) for n in nums]
        src[split] = _pad([src_vocab.encode(english_tokens(n)) for n in nums], s_len)
        tgt_in[split] = _pad([[BOS, *t] for t in tgt], t_len)
        tgt_out[split] = _pad([[*t, EOS] for t in tgt], t_len)
    return NumberTranslation(numbers, src_vocab, tgt_vocab, src, tgt_in, tgt_out)
