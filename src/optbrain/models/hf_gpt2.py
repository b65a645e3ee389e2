"""A GPT-2-architecture character model built from a ``transformers`` config (no download).

``pip install 'optbrain[hf]'``. GPT-2's projections (``c_attn``, ``c_proj``, ``c_fc``) are
``transformers``' ``Conv1D`` modules, whose weight is stored in × out (transposed against
``nn.Linear``); layer-wise OBS and the quantisers handle them as Linear layers. Its ``lm_head``
shares the token embedding's weight, so the quantisers skip it (and say so).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["gpt2_char_model", "load_transformers"]


def load_transformers():
    """``(GPT2Config, GPT2LMHeadModel)``; ``ImportError`` naming the cause if unavailable."""
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except Exception as exc:  # noqa: BLE001 - any import failure means "not usable here"
        raise ImportError(
            "the GPT-2 path needs the `transformers` package (pip install 'optbrain[hf]'); "
            f"importing it failed: {type(exc).__name__}: {exc}"
        ) from exc
    return GPT2Config, GPT2LMHeadModel


def gpt2_char_model(
    vocab: int, context: int, width: int, layers: int, heads: int, seed: int
) -> nn.Module:
    """``GPT2LMHeadModel`` of the given sizes, dropout off, initialised under ``seed`` (the
    global RNG is restored afterwards)."""
    GPT2Config, GPT2LMHeadModel = load_transformers()
    cfg = GPT2Config(
        vocab_size=vocab,
        n_positions=context,
        n_embd=width,
        n_layer=layers,
        n_head=heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        use_cache=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(cfg)
    return model.eval()
