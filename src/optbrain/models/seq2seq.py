"""An LSTM encoder–decoder with Luong's global attention (Luong, Pham & Manning 2015), written so
that optbrain's graph engine traces it (PAPERS.md §14.2: the model of the extreme-sparsity study).

One forward pass scores a whole teacher-forced target (no loop in ``forward``)::

    s̄ = LSTM_enc(E_src[src])                          encoder states, N × S × H
    h  = LSTM_dec(E_tgt[tgt_in], (h_S, c_S))           decoder states, N × T × H
    a  = softmax(h · score(s̄)ᵀ)  over source positions N × T × S   (score: s̄ for "dot",
    c  = a · s̄                                                       W_a s̄ for "general")
    h̃  = tanh(W_c [c; h])                              the attentional hidden state
    logits = W_s h̃ + b_s,  returned as N × V × T      (``nn.CrossEntropyLoss`` layout)

This is Luong's global attention *without input feeding* (h̃ of step t is not fed to step
t + 1), so the decoder LSTM runs over the whole target at once and attention is computed from its
outputs afterwards. The input is one integer tensor, the source (N × S, S = ``src_len``) and the
target input (N × T) side by side (:meth:`NumberTranslation.inputs
<optbrain.data.number_words.NumberTranslation.inputs>`). Source padding is not masked out of the
attention (the model learns to ignore ``PAD`` positions): a data-dependent mask would be a
function of the input the curvature sweep does not need.

:meth:`Seq2SeqAttention.greedy` decodes step by step with the same layers; :func:`weight_classes`
names See, Luong & Manning's (2016) weight classes.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._seeding import seeded

__all__ = ["CLASSES", "Seq2SeqAttention", "weight_classes"]

#: See, Luong & Manning's weight classes for a one-layer model, in the order they are reported
CLASSES = ("source embedding", "target embedding", "encoder", "decoder", "attention", "softmax")

_CLASS_OF_MODULE = {
    "src_emb": "source embedding",
    "tgt_emb": "target embedding",
    "encoder": "encoder",
    "decoder": "decoder",
    "score": "attention",
    "combine": "attention",
    "out": "softmax",
}


class Seq2SeqAttention(nn.Module):
    """LSTM encoder–decoder with global (``score="dot"`` or ``"general"``) attention.

    ``src_vocab``, ``tgt_vocab``: vocabulary sizes; ``emb``, ``hidden``: embedding and LSTM
    sizes; ``src_len``: the fixed source length S (the first S columns of the input);
    ``init``: weights drawn uniformly from ±init (Luong et al.'s 0.1); ``seed`` makes the
    initialisation reproducible without touching the global RNG.
    """

    def __init__(
        self,
        src_vocab: int,
        tgt_vocab: int,
        src_len: int,
        *,
        emb: int = 256,
        hidden: int = 256,
        score: str = "general",
        init: float = 0.1,
        seed: int | None = None,
    ):
        super().__init__()
        if score not in ("dot", "general"):
            raise ValueError(f"score must be 'dot' or 'general', not {score!r}")
        for name, v in (("src_vocab", src_vocab), ("tgt_vocab", tgt_vocab), ("src_len", src_len)):
            if int(v) < 1:
                raise ValueError(f"{name} must be >= 1, got {v!r}")
        self.src_len, self.score_kind = int(src_len), score
        with seeded(seed):
            self.src_emb = nn.Embedding(src_vocab, emb)
            self.tgt_emb = nn.Embedding(tgt_vocab, emb)
            self.encoder = nn.LSTM(emb, hidden, batch_first=True)
            self.decoder = nn.LSTM(emb, hidden, batch_first=True)
            self.score = nn.Linear(hidden, hidden, bias=False) if score == "general" else None
            self.combine = nn.Linear(2 * hidden, hidden)
            self.out = nn.Linear(hidden, tgt_vocab)
            if init > 0:
                for p in self.parameters():
                    nn.init.uniform_(p, -init, init)

    def _encode(self, src: Tensor) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor]]:
        # unpacked and packed again: the graph engine drops the curvature that reaches the
        # LSTM's (h, c) output when that tuple is handed on as a whole (reported with issue #12)
        states, (h, c) = self.encoder(self.src_emb(src))
        keys = self.score(states) if self.score is not None else states
        return states, keys, (h, c)

    def _attend(self, dec: Tensor, states: Tensor, keys: Tensor) -> Tensor:
        """Logits N × T × V of decoder outputs ``dec`` (N × T × H) attending over the source."""
        weights = torch.softmax(dec @ keys.transpose(1, 2), dim=-1)  # N × T × S
        context = weights @ states  # N × T × H
        return self.out(torch.tanh(self.combine(torch.cat([context, dec], -1))))

    def forward(self, x: Tensor) -> Tensor:
        """``x``: N × (S + T) indices (source, then teacher-forced target input); returns the
        N × V × T logits of the next target tokens."""
        src, tgt = x[:, : self.src_len], x[:, self.src_len :]
        states, keys, final = self._encode(src)
        dec, _ = self.decoder(self.tgt_emb(tgt), final)
        return self._attend(dec, states, keys).transpose(1, 2)

    @torch.no_grad()
    def greedy(self, src: Tensor, max_len: int, bos: int = 1, eos: int = 2) -> Tensor:
        """Greedy decoding of a batch of sources (N × S): N × ``max_len`` token indices, each
        row ending at its first ``eos`` (positions after it are ``eos``). Runs in eval mode and
        restores the mode."""
        was = self.training
        self.eval()
        try:
            states, keys, state = self._encode(src)
            token = torch.full((src.shape[0], 1), bos, dtype=torch.int64, device=src.device)
            done = torch.zeros(src.shape[0], dtype=torch.bool, device=src.device)
            out = []
            for _ in range(max_len):
                dec, state = self.decoder(self.tgt_emb(token), state)
                token = self._attend(dec, states, keys).argmax(-1)  # N × 1
                token = torch.where(done[:, None], torch.full_like(token, eos), token)
                done |= token[:, 0] == eos
                out.append(token)
                if bool(done.all()):
                    break
            res = torch.cat(out, 1)
            if res.shape[1] < max_len:
                pad = res.new_full((res.shape[0], max_len - res.shape[1]), eos)
                res = torch.cat([res, pad], 1)
            return res
        finally:
            self.train(was)


def weight_classes(model: Seq2SeqAttention) -> dict[str, str]:
    """Clean parameter name → See, Luong & Manning's class (:data:`CLASSES`): the two
    embeddings, the encoder and decoder LSTMs, attention (W_a of the general score and the
    attentional layer W_c) and the softmax layer. Biases are listed too (the default mask leaves
    them out)."""
    from ..paramdict import named_parameters

    out = {}
    for name in named_parameters(model, trainable_only=False):
        module = name.split(".")[0]
        out[name] = _CLASS_OF_MODULE[module]
    return out
