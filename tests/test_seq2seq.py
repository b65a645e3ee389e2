"""The Luong-attention LSTM encoder–decoder: shapes, greedy decoding = the teacher-forced
forward fed its own predictions, See et al.'s weight classes, and the graph engine on it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from optbrain.curvature import GGNDiagonal, explain
from optbrain.models.seq2seq import CLASSES, Seq2SeqAttention, weight_classes
from optbrain.problem import Problem

S, T, VS, VT = 5, 4, 9, 7


def batch(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(3, VS, (n, S), generator=g)
    tgt_in = torch.cat([torch.ones(n, 1, dtype=torch.int64),
                        torch.randint(3, VT, (n, T - 1), generator=g)], 1)  # fmt: skip
    tgt_out = torch.randint(0, VT, (n, T), generator=g)
    return torch.cat([src, tgt_in], 1), tgt_out


@pytest.mark.parametrize("score", ["dot", "general"])
def test_forward_gives_class_by_position_logits(score):
    model = Seq2SeqAttention(VS, VT, S, emb=6, hidden=8, score=score, seed=0)
    x, _ = batch()
    assert model(x).shape == (6, VT, T)
    assert (model.score is None) == (score == "dot")
    again = Seq2SeqAttention(VS, VT, S, emb=6, hidden=8, score=score, seed=0)
    assert torch.equal(model(x), again(x))  # seeded initialisation
    assert max(p.abs().max() for p in model.parameters()) <= 0.1


@pytest.mark.parametrize("seed", range(3))
def test_greedy_equals_the_teacher_forced_forward_fed_its_own_output(seed):
    model = Seq2SeqAttention(VS, VT, S, emb=6, hidden=8, init=2.0, seed=seed)
    x, _ = batch(n=16)
    out = model.greedy(x[:, :S], max_len=T, eos=-1)  # never stops early
    assert len(out.unique()) > 1  # a model that says one word would prove nothing
    tgt_in = torch.cat([torch.ones(16, 1, dtype=torch.int64), out[:, :-1]], 1)
    forced = model(torch.cat([x[:, :S], tgt_in], 1)).argmax(1)
    assert torch.equal(out, forced)


def test_greedy_stops_at_eos_and_pads_with_it():
    model = Seq2SeqAttention(VS, VT, S, emb=6, hidden=8, init=0.6, seed=1)
    x, _ = batch(n=8)
    eos = int(model.greedy(x[:, :S], max_len=T, eos=-1)[0, 1])  # what row 0 emits second
    out = model.greedy(x[:, :S], max_len=T, eos=eos)
    for row in out:
        hits = (row == eos).nonzero()
        if len(hits):
            assert (row[int(hits[0]) :] == eos).all()
    assert out.shape == (8, T)
    assert model.training  # mode restored


def test_weight_classes_are_see_et_al_classes():
    model = Seq2SeqAttention(VS, VT, S, emb=6, hidden=8, seed=0)
    classes = weight_classes(model)
    assert set(classes) == {n for n, _ in model.named_parameters()}
    assert set(classes.values()) == set(CLASSES)
    assert classes["encoder.weight_hh_l0"] == "encoder"
    assert classes["score.weight"] == classes["combine.weight"] == "attention"
    assert classes["out.weight"] == "softmax"


def test_the_graph_engine_reads_the_model_and_matches_torch_func():
    model = Seq2SeqAttention(VS, VT, S, emb=4, hidden=5, init=0.5, seed=0).double()
    x, y = batch(n=4)
    problem = Problem(model, nn.CrossEntropyLoss(), [(x, y)])
    paths = explain(problem)
    for key in ("lecun", "ggn", "mc_fisher", "empirical_fisher"):
        assert paths[key].engine == "graph", (key, str(paths[key]))
    graph = GGNDiagonal(method="auto").diagonal(problem)
    oracle = GGNDiagonal(method="func").diagonal(problem)
    for k in oracle:
        torch.testing.assert_close(graph[k], oracle[k], rtol=1e-8, atol=1e-12)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="score"):
        Seq2SeqAttention(VS, VT, S, score="concat")
    with pytest.raises(ValueError, match="src_len"):
        Seq2SeqAttention(VS, VT, 0)
