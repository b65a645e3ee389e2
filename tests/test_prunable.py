"""What is prunable by default is decided by layer kind, and what is left out is reported."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import optbrain as ob
from optbrain.prunable import partition, prunable_names


class _Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return x * self.weight


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.attn = nn.MultiheadAttention(6, 2, batch_first=True)
        self.norm = nn.LayerNorm(6)
        self.bn = nn.BatchNorm1d(6)
        self.lstm = nn.LSTM(6, 4, num_layers=2)
        self.gru_cell = nn.GRUCell(4, 4)
        self.conv = nn.Conv1d(4, 3, 2)
        self.head = nn.Linear(3, 3)
        self.custom = _Custom()


def test_default_prunable_weights_by_layer_kind():
    names = prunable_names(_Model())
    assert names == [
        "emb.weight",
        "attn.in_proj_weight",
        "attn.out_proj.weight",
        "lstm.weight_ih_l0",
        "lstm.weight_hh_l0",
        "lstm.weight_ih_l1",
        "lstm.weight_hh_l1",
        "gru_cell.weight_ih",
        "gru_cell.weight_hh",
        "conv.weight",
        "head.weight",
    ]


def test_excluded_parameters_say_why():
    why = partition(_Model()).excluded
    assert why["attn.in_proj_bias"] == "bias"
    assert why["lstm.bias_hh_l1"] == "bias"
    assert "LayerNorm" in why["norm.weight"] and "BatchNorm1d" in why["bn.weight"]
    assert "_Custom" in why["custom.weight"] and "not in optbrain.prunable" in why["custom.weight"]
    assert set(why) | set(partition(_Model()).prunable) == {
        n for n, _ in _Model().named_parameters()
    }


def test_masked_model_keeps_its_names():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    ob.attach(model, ob.Mask.ones(model).with_pruned({"0.weight": [0]}))
    assert prunable_names(model) == ["0.weight", "2.weight"]


def test_prune_info_lists_what_was_left_out():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    x, y = torch.randn(16, 3), torch.randn(16, 2)
    problem = ob.Problem(model, nn.MSELoss(), (x, y))
    mask, info = ob.magnitude()(problem, sparsity=0.5)
    assert mask.names == ("0.weight", "3.weight")
    assert set(info.excluded) == {"0.bias", "1.weight", "1.bias", "3.bias"}
    assert "BatchNorm1d" in info.excluded["1.weight"]


@pytest.mark.parametrize("method", sorted(ob.METHODS))
def test_every_pruner_and_the_loop_start_from_the_same_default_mask(method):
    """The loop asks the pruner for its default mask: the step and the loop agree (a BatchNorm
    between the layers once made LayerwiseOBS fail inside the loop only)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    model.eval()
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    extra = {"validation": (x, y)} if ob.METHODS[method].needs_validation else {}
    pruner = ob.pruners.make(method, **extra)
    direct = pruner.default_mask(model)
    history = ob.iterative_prune(
        model,
        pruner,
        ob.schedule.one_shot(0.25 if ob.METHODS[method].counts == "cells" else 0.5),
        rounds=1,
        make_problem=lambda m: ob.Problem(m, nn.CrossEntropyLoss(), (x, y)),
    )
    assert history.records[-1].sparsity > 0
    assert set(ob.masking.current_mask(model).names) == set(direct.names)


def test_loop_uses_the_pruners_own_default_mask():
    """LayerwiseOBS prunes Linear/Conv weights only; the generic default would include the
    embedding, which the loop once passed to it."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Embedding(8, 4), nn.Flatten(), nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 3)
    )
    x, y = torch.randint(0, 8, (40, 3)), torch.randint(0, 3, (40,))
    pruner = ob.layerwise_obs()
    assert "0.weight" not in pruner.default_mask(model).names
    ob.iterative_prune(
        model,
        pruner,
        ob.schedule.one_shot(0.5),
        rounds=1,
        make_problem=lambda m: ob.Problem(m, nn.CrossEntropyLoss(), (x, y)),
    )
    assert set(ob.masking.current_mask(model).names) == {"2.weight", "4.weight"}
