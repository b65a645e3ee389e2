"""One conformance suite for every named method (``optbrain.pruners.METHODS``) on every model kind
(``conformance_models.KINDS``): a single step, ``iterative_prune`` with checkpoint and resume, and
the command line. A method that cannot run on a kind must raise the named error the kind lists,
never be skipped."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

import optbrain as ob
from conformance_models import BY_NAME, KINDS
from optbrain import cli, masking
from optbrain.errors import UnsupportedArgumentError
from optbrain.history import History
from optbrain.loop import iterative_prune
from optbrain.masking import Mask
from optbrain.pruners import METHODS, CellPruneInfo, PruneInfo, PrunerProtocol, make
from optbrain.train import evaluate, train

MODELS = Path(__file__).with_name("conformance_models.py")
CASES = [(m, k.name) for k in KINDS for m in METHODS]
TARGET = 0.5


def _setup(kind_name: str, seed: int = 0):
    kind = BY_NAME[kind_name]
    model = kind.model(seed)
    x, y = kind.data()
    return kind, model, ob.Problem(model, nn.CrossEntropyLoss(), (x, y))


def _pruner(method: str, kind_name: str, **options):
    """``make(method)``, with held-out data for the methods that need a validation set."""
    if METHODS[method].needs_validation:
        options["validation"] = BY_NAME[kind_name].data(seed=2, n=24)
    return make(method, **options)


def _expected_error(method: str, kind_name: str):
    return BY_NAME[kind_name].cannot.get(method)


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------ one step
@pytest.mark.parametrize("method, kind", CASES)
def test_a_single_step_honours_the_contract(method, kind):
    _, model, problem = _setup(kind)
    pruner = _pruner(method, kind)
    assert isinstance(pruner, PrunerProtocol)
    assert pruner.counts == METHODS[method].counts
    error = _expected_error(method, kind)
    if error is not None:
        with pytest.raises(error):
            pruner(problem, sparsity=TARGET)
        return
    start = pruner.default_mask(model)
    new, info = pruner(problem, sparsity=TARGET)
    assert isinstance(new, Mask) and isinstance(info, PruneInfo)
    assert new.names == start.names and new.is_subset_of(start)
    assert info.pruned == new.pruned() and info.total == new.total()
    assert info.newly_pruned == new.pruned() - start.pruned() > 0
    if pruner.counts == "cells":
        assert isinstance(info, CellPruneInfo)
        assert info.cells_removed == round(TARGET * info.cells_total)
    elif (
        pruner.removes_cells
    ):  # whole cells by a weight target: stops at the first step reaching it
        assert new.pruned() >= round(TARGET * new.total())
    else:
        assert new.pruned() == round(TARGET * new.total())
    params = dict(model.named_parameters())
    for name in new.names:  # the deleted entries are zero in the stored weights
        assert (params[name].detach()[~new[name]] == 0).all(), name
    assert not masking.current_mask(model)  # returned, not attached


@pytest.mark.parametrize("method, kind", CASES)
def test_mask_default_scores_and_units_are_one_contract(method, kind):
    if _expected_error(method, kind) is not None:
        return  # the single-step test checks the named error
    # the default mask is the one used when none is given
    _, model_a, problem_a = _setup(kind)
    _, model_b, problem_b = _setup(kind)
    a, _ = _pruner(method, kind)(problem_a, sparsity=TARGET)
    pruner = _pruner(method, kind)
    b, _ = pruner(problem_b, pruner.default_mask(model_b), TARGET)
    assert a == b
    assert all(torch.equal(v, _weights(model_b)[k]) for k, v in _weights(model_a).items())
    # precomputed scores: used (same result) or refused by name, never ignored
    _, model_c, problem_c = _setup(kind)
    pruner = _pruner(method, kind)
    mask = pruner.default_mask(model_c)
    scores = pruner.scores(problem_c, mask)
    assert set(scores) == set(mask.names)
    if pruner.accepts_scores:
        c, _ = pruner(problem_c, mask, TARGET, scores=scores)
        assert c == a
    else:
        with pytest.raises(UnsupportedArgumentError, match="cannot use precomputed scores"):
            pruner(problem_c, mask, TARGET, scores=scores)
    # units: a total of removed cells for the pruners that remove cells, refused by the others
    _, model_d, problem_d = _setup(kind)
    pruner = _pruner(method, kind)
    if pruner.removes_cells:
        new, info = pruner(problem_d, units=1)
        assert isinstance(info, CellPruneInfo) and info.cells_removed == 1
        assert len(info.removed) == 1
    else:
        with pytest.raises(UnsupportedArgumentError, match="units="):
            pruner(problem_d, units=1)
    pruner.load_state_dict(pruner.state_dict())


# ------------------------------------------------------------------------------ the loop
def _loop(method, kind_name, ckdir=None, crash_at=None):
    kind = BY_NAME[kind_name]
    model = kind.model()
    loader = kind.loader()
    x, y = kind.data(seed=1, n=24)
    loss = nn.CrossEntropyLoss()

    def retrain(m, r):
        if crash_at == r:
            raise KeyboardInterrupt("simulated crash")
        train(m, loader, loss, epochs=1, lr=1e-2, seed=r)

    history = iterative_prune(
        model,
        _pruner(method, kind_name, seed=0),
        ob.schedule.linear(0.6, 2),
        rounds=2,
        make_problem=lambda m: ob.Problem(m, loss, loader),  # reads the shuffling loader
        retrain=retrain,
        evaluate=lambda m: evaluate(m, [(x, y)], loss),
        checkpoint_dir=ckdir,
        config={"method": method, "kind": kind_name},
        loaders=[loader],
    )
    return history, model


def _records(history: History) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in history.to_dict()["records"]]


@pytest.mark.parametrize("method, kind", CASES)
def test_iterative_prune_resumes_to_the_uninterrupted_history(method, kind, tmp_path):
    error = _expected_error(method, kind)
    if error is not None:
        with pytest.raises(error):
            _loop(method, kind)
        return
    full, full_model = _loop(method, kind)
    assert [r.round for r in full.records] == [0, 1, 2]
    with pytest.raises(KeyboardInterrupt):
        _loop(method, kind, tmp_path, crash_at=2)
    assert History.load(tmp_path / "history.json").last.round == 1
    resumed, model = _loop(method, kind, tmp_path)
    assert _records(resumed) == _records(full)
    assert masking.current_mask(model) == masking.current_mask(full_model)


# ------------------------------------------------------------------------------ the CLI
@pytest.mark.parametrize("method, kind", CASES)
def test_the_cli_prunes_every_kind_with_every_method(method, kind, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["prune", "--task", f"{MODELS}:{kind}", "--method", method, "--rounds", "1"]
    code = cli.main([*argv, "--sparsity", "0.5", "--out", str(out), "--no-progress"])
    captured = capsys.readouterr()
    error = _expected_error(method, kind)
    if error is not None:
        assert code == 2 and captured.err.startswith("optbrain prune: error:")
        return
    assert code == 0, captured.err
    history = History.load(out / method / "history.json")
    assert [r.round for r in history.records] == [0, 1]
    fresh = BY_NAME[kind].model(seed=7)
    mask = masking.load_pruned(fresh, out / method / "model.pt")
    assert mask.pruned() > 0
    copy.deepcopy(fresh)  # a pruned model stays an ordinary module
