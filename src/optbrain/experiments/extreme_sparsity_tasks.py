"""The two tasks of the extreme-sparsity study: number-word translation with an LSTM
encoder–decoder (BLEU), and the digits MLP (test accuracy), the CI-sized form of the same sweep.

A :class:`Task` is everything the sweep needs and nothing it must know about the model: a seeded
builder, the training loader and loss, the data the pruners' objective is measured on, See, Luong
& Manning's weight classes and an evaluation returning ``{"score": …, "exact": …}`` (BLEU on a
0–1 scale and the fraction of test sentences translated exactly; test accuracy twice for digits).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["Task", "digits_task", "nmt_task"]


@dataclass
class Task:
    """What the sweep runs on (module doc). ``metric`` names ``evaluate``'s ``"score"``."""

    name: str
    metric: str
    build: Callable[[int], nn.Module]
    loader: DataLoader
    loss_fn: nn.Module
    prune_data: list[tuple[Tensor, Tensor]]
    classes: Callable[[nn.Module], dict[str, str]]
    class_order: tuple[str, ...]
    evaluate: Callable[[nn.Module], dict[str, float]]
    info: dict[str, Any]


def _batches(x: Tensor, y: Tensor, size: int) -> list[tuple[Tensor, Tensor]]:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, x.shape[0], size)]


def _loader(x: Tensor, y: Tensor, batch: int) -> DataLoader:
    """Shuffled training batches, the loader's own generator (``train(seed=)`` seeds it)."""
    gen = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=True, generator=gen)


def bleu(hypotheses: list[str], references: list[str]) -> float:
    """Corpus BLEU (sacrebleu, one reference each, ``tokenize="none"``: the sentences are
    already space-separated tokens) on a 0–1 scale."""
    try:
        import sacrebleu
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "BLEU needs sacrebleu; install it with `pip install -c constraints.txt 'optbrain[nmt]'`"
        ) from exc
    return float(sacrebleu.corpus_bleu(hypotheses, [references], tokenize="none").score) / 100.0


def nmt_task(cfg) -> Task:
    """English → German number words (:mod:`optbrain.data.number_words`), a
    :class:`~optbrain.models.seq2seq.Seq2SeqAttention` of ``cfg.nmt_emb``/``cfg.nmt_hidden``,
    cross-entropy over every target position (``PAD`` a real class: no ``ignore_index``), greedy
    decoding, BLEU on the test numbers. The pruners measure E on the first ``cfg.prune_samples``
    training sentences."""
    from ..data.number_words import load_number_translation
    from ..models.seq2seq import CLASSES, Seq2SeqAttention, weight_classes

    data = load_number_translation(cfg.nmt_max_number, cfg.nmt_sizes)
    x, y = data.inputs("train"), data.tgt_out["train"]
    refs = data.references("test")

    def build(seed: int) -> nn.Module:
        return Seq2SeqAttention(
            len(data.src_vocab),
            len(data.tgt_vocab),
            data.src_len,
            emb=cfg.nmt_emb,
            hidden=cfg.nmt_hidden,
            score=cfg.nmt_score,
            seed=seed,
        )

    def evaluate(model: nn.Module) -> dict[str, float]:
        out = model.greedy(data.src["test"], data.tgt_len)
        hyps = [" ".join(data.tgt_vocab.decode(row)) for row in out]
        exact = sum(h == r for h, r in zip(hyps, refs)) / len(refs)
        return {"score": bleu(hyps, refs), "exact": exact}

    n = min(cfg.prune_samples, x.shape[0])
    return Task(
        name="nmt",
        metric="BLEU",
        build=build,
        loader=_loader(x, y, cfg.batch_size),
        loss_fn=nn.CrossEntropyLoss(),
        prune_data=_batches(x[:n], y[:n], 256),
        classes=weight_classes,
        class_order=CLASSES,
        evaluate=evaluate,
        info={
            "src_vocab": len(data.src_vocab),
            "tgt_vocab": len(data.tgt_vocab),
            "src_len": data.src_len,
            "tgt_len": data.tgt_len,
            "sizes": [len(data.numbers[s]) for s in ("train", "valid", "test")],
            "example": {
                "number": data.numbers["test"][0],
                "source": " ".join(data.src_vocab.decode(data.src["test"][0])),
                "target": refs[0],
            },
        },
    )


def _digit_order(n_linear: int) -> tuple[str, ...]:
    return (*(f"layer {i + 1}" for i in range(n_linear - 1)), "output")


def _digit_classes(model: nn.Module) -> dict[str, str]:
    """One class per Linear (See et al.'s one class per weight matrix): "layer 1", …, "output"."""
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    names = _digit_order(len(linears))
    return {f"{lin}.{p}": cls for lin, cls in zip(linears, names) for p in ("weight", "bias")}


def digits_task(cfg) -> Task:
    """The 8×8 digits (fixed stratified split) and a tanh MLP ``64-cfg.digits_hidden-10``
    trained by cross-entropy; score = test accuracy (0–1). The pruners measure E on the whole
    training set."""
    from ..data.digits import load_digits_split
    from ..models.digits import digits_mlp
    from ..train import evaluate as eval_loss

    data = load_digits_split()
    test = [(data.x_test, data.y_test)]

    def build(seed: int) -> nn.Module:
        return digits_mlp(cfg.digits_hidden, "tanh", seed)

    def evaluate(model: nn.Module) -> dict[str, float]:
        acc = eval_loss(model, test, nn.CrossEntropyLoss())["accuracy"]
        return {"score": acc, "exact": acc}

    return Task(
        name="digits",
        metric="test accuracy",
        build=build,
        loader=_loader(data.x_train, data.y_train, cfg.batch_size),
        loss_fn=nn.CrossEntropyLoss(),
        prune_data=_batches(data.x_train, data.y_train, 512),
        classes=_digit_classes,
        class_order=_digit_order(len(cfg.digits_hidden) + 1),
        evaluate=evaluate,
        info={"train": int(data.x_train.shape[0]), "test": int(data.x_test.shape[0])},
    )
