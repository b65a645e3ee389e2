"""The prune–retrain loop: schedule reached, nested masks, determinism, resume, stopping, errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import optbrain as ob
from optbrain import pruners as P
from optbrain import schedule as S
from optbrain.history import History, RoundRecord
from optbrain.loop import CHECKPOINT, CheckpointError, iterative_prune
from optbrain.masking import Mask, current_mask, load_pruned, save_pruned
from optbrain.train import train


def _data(seed=0, n=96):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, 0] + x[:, 1] * x[:, 2] > 0).long()
    return x, y


def _model(seed=0):
    g = torch.Generator().manual_seed(seed)
    m = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return m


def _run(model, ckdir=None, rounds=4, crash_at=None, config=None, **kw):
    x, y = _data()
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y),
        batch_size=32,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
    )
    loss = nn.CrossEntropyLoss()

    def retrain(m, r):
        if crash_at == r:
            raise KeyboardInterrupt("simulated crash")
        train(m, loader, loss, epochs=2, lr=1e-2, seed=10 + r)

    def evaluate(m):
        with torch.no_grad():
            out = m(x)
        return {"val_loss": float(loss(out, y)), "acc": float((out.argmax(1) == y).float().mean())}

    return iterative_prune(
        model,
        kw.pop("pruner", P.obd()),
        kw.pop("schedule", S.geometric(0.3)),
        rounds=rounds,
        make_problem=lambda m: ob.Problem(m, loss, (x, y)),
        retrain=retrain,
        evaluate=evaluate,
        checkpoint_dir=ckdir,
        config=config if config is not None else {"run": "test"},
        **kw,
    )


def test_reaches_the_schedule_with_nested_masks():
    model = _model()
    masks = []
    h = _run(model, progress=lambda r, n: masks.append(current_mask(model)))
    total = h.records[0].total
    assert [r.round for r in h.records] == [0, 1, 2, 3, 4]
    for r in h.records[1:]:
        assert r.remaining == total - round(S.geometric(0.3)(r.round) * total)
        assert r.remaining_params == sum(p.numel() for p in model.parameters()) - (
            total - r.remaining
        )
        assert math.isfinite(r.actual_increase) and r.predicted_increase >= 0
    for a, b in zip(masks[1:], masks):
        assert a.is_subset_of(b)
    # deleted weights are exactly zero in the effective model after retraining
    m = current_mask(model)
    assert bool((model[0].weight[~m["0.weight"]] == 0).all())


def test_deterministic_under_seed():
    a, b = _run(_model()), _run(_model())
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in a.to_dict()["records"]]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in b.to_dict()["records"]]
    assert a.column("metrics.val_loss") == b.column("metrics.val_loss")
    assert a.column("sparsity") == b.column("sparsity")


def test_resume_after_interruption_gives_the_same_history(tmp_path):
    full = _run(_model())
    with pytest.raises(KeyboardInterrupt):
        _run(_model(), tmp_path, crash_at=3)
    assert History.load(tmp_path / "history.json").last.round == 2
    resumed = _run(_model(), tmp_path)
    assert resumed.column("metrics.val_loss") == full.column("metrics.val_loss")
    assert resumed.column("actual_increase") == full.column("actual_increase")
    # a finished run returns its history without doing anything
    again = _run(_model(), tmp_path)
    assert again.to_dict() == resumed.to_dict()


def test_random_pruner_state_survives_resume(tmp_path):
    full = _run(_model(), pruner=P.random(seed=3))
    with pytest.raises(KeyboardInterrupt):
        _run(_model(), tmp_path, crash_at=2, pruner=P.random(seed=3))
    resumed = _run(_model(), tmp_path, pruner=P.random(seed=3))
    assert resumed.column("metrics.val_loss") == full.column("metrics.val_loss")


def test_other_configuration_or_corrupt_checkpoint_is_refused_untouched(tmp_path):
    _run(_model(), tmp_path, rounds=1)
    before = (tmp_path / CHECKPOINT).read_bytes()
    with pytest.raises(CheckpointError, match="another configuration"):
        _run(_model(), tmp_path, config={"run": "other"})
    assert (tmp_path / CHECKPOINT).read_bytes() == before
    (tmp_path / CHECKPOINT).write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt"):
        _run(_model(), tmp_path)
    assert (tmp_path / CHECKPOINT).read_bytes() == b"not a checkpoint"


def test_stop_on_validation_budget_and_on_saliency():
    h = _run(_model(), schedule=S.linear(0.9, 4), stop_val_loss=-1.0)
    assert len(h.records) == 2 and "val_loss" in h.stopped
    h = _run(_model(), stop_saliency=-1.0)
    assert len(h.records) == 1 and "saliency" in h.stopped


def test_bad_schedule_is_refused_before_any_work():
    model = _model()
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="outside"):
        _run(model, schedule=lambda r: 0.5 * r)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(ValueError):
        S.geometric(1.0)


def test_history_json_round_trip(tmp_path):
    h = History([RoundRecord(0, 0.0, 0.0, 10, 10, 12, metrics={"a": math.nan})], {"k": 1}, "done")
    h.save(tmp_path / "h.json")
    back = History.load(tmp_path / "h.json")
    assert back.config == {"k": 1} and back.stopped == "done"
    assert math.isnan(back.records[0].metrics["a"]) and math.isnan(back.records[0].objective_before)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="corrupt"):
        History.load(tmp_path / "bad.json")


def test_pruned_model_saves_and_loads_with_one_call(tmp_path):
    model = _model()
    _run(model, rounds=2)
    save_pruned(model, tmp_path / "model.pt")
    fresh = _model(seed=5)
    mask = load_pruned(fresh, tmp_path / "model.pt")
    x, _ = _data(1)
    assert torch.equal(fresh(x), model(x))
    assert mask == current_mask(model) and isinstance(mask, Mask)
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="cannot read"):
        load_pruned(_model(), tmp_path / "junk.pt")
