"""Measured pruning steps and the adaptive sub-step rule (issue #12).

The rule is checked on a scripted objective (a stepper whose measured increase is a known
function of the sub-step's size), the bookkeeping on real pruners, and the OBD identity that
sub-steps equal one step where the diagonal quadratic model is exact.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import cases
from optbrain import masking
from optbrain.errors import TooFewSamplesError
from optbrain.loop import iterative_prune
from optbrain.masking import Mask
from optbrain.problem import Problem
from optbrain.pruners import AdaptiveSteps, PruneInfo, magnitude, obd, obs, ocd, snip
from optbrain.pruners import adaptive as A
from optbrain.schedule import linear
from optbrain.selection import TargetExceededError
from test_pruner import diagonal_quadratic

F64 = torch.float64


# --------------------------------------------------------------------------- a scripted objective
class Scripted(nn.Module):
    """E = the parameter ``e`` (the loss is the output's mean); ``w`` holds n deletable entries."""

    def __init__(self, n: int):
        super().__init__()
        self.e = nn.Parameter(torch.zeros((), dtype=F64))
        self.w = nn.Parameter(torch.ones(n, dtype=F64))

    def forward(self, x):
        return self.e.expand(x.shape[0], 1) + 0 * x


class ScriptedStepper:
    """Deleting k entries predicts ``k·unit`` and raises E by ``cost(k)``; counts estimates."""

    noun = "pruned entries"

    def __init__(self, model: Scripted, cost, unit: float = 1.0):
        self.model, self.cost, self.unit = model, cost, unit
        self.estimates = 0

    def estimate(self, problem, mask):
        self.estimates += 1
        return object()

    def step(self, problem, mask, total, state):
        k = total - mask.pruned()
        kept = mask["w"].clone()
        kept[torch.nonzero(kept).reshape(-1)[:k]] = False
        with torch.no_grad():
            self.model.e += self.cost(k)
            self.model.w.mul_(kept)
        return A.StepResult(Mask({"w": kept}), k * self.unit, self.unit)

    @staticmethod
    def done(mask):
        return mask.pruned()


def scripted(n: int = 1000, samples: int = 16):
    model = Scripted(n)
    x = torch.zeros(samples, 1, dtype=F64)
    problem = Problem(model, lambda out, y: out.mean(), (x, x))
    return model, problem, Mask({"w": torch.ones(n, dtype=torch.bool)})


def test_a_prediction_that_holds_is_one_step():
    model, problem, mask = scripted()
    stepper = ScriptedStepper(model, cost=lambda k: 1.0 * k)
    out = A.run(AdaptiveSteps(), stepper, problem, mask, 400, 1000)
    assert (out.re_estimates, out.rejected, len(out.sub_steps)) == (0, 0, 1)
    assert out.mask.pruned() == 400 and stepper.estimates == 1
    assert out.sub_steps[0].within and out.after - out.before == pytest.approx(400)


def test_a_failing_prediction_is_split_where_it_fails_and_the_trial_undone():
    """Sub-steps of more than 40 entries cost 10× their prediction: every accepted sub-step within
    the tolerance has at most 40; rejected trials leave no trace in E; the target is reached."""
    model, problem, mask = scripted()
    stepper = ScriptedStepper(model, cost=lambda k: k if k <= 40 else 10.0 * k)
    out = A.run(AdaptiveSteps(max_re_estimates=64), stepper, problem, mask, 600, 1000)
    assert out.mask.pruned() == 600
    assert out.rejected > 0 and out.re_estimates + 1 == len(out.sub_steps) == stepper.estimates
    for s in out.sub_steps:
        assert s.within == (s.count <= 40)
    assert sum(s.count for s in out.sub_steps) == 600
    measured = sum(s.measured for s in out.sub_steps)
    assert (
        measured == pytest.approx(out.after - out.before) == pytest.approx(float(model.e.detach()))
    )
    assert out.predicted == pytest.approx(600)
    within = [s for s in out.sub_steps if s.within]
    assert sum(s.count for s in within) == pytest.approx(measured, abs=1e-9 + 9 * 600)
    # first trial: half of the alive entries (max_fraction), then halves to 37 or 38 entries
    assert out.sub_steps[0].count <= 40


def test_the_cap_is_never_exceeded_and_ends_as_an_even_geometric_split():
    """A prediction that always fails: exactly ``max_re_estimates`` sub-steps whose sizes shrink
    the alive entries by a constant factor (k_min), all flagged outside the tolerance."""
    model, problem, mask = scripted()
    stepper = ScriptedStepper(model, cost=lambda k: 100.0 * k)
    out = A.run(AdaptiveSteps(max_re_estimates=5), stepper, problem, mask, 968, 1000)
    assert len(out.sub_steps) == stepper.estimates == 5 and out.re_estimates == 4
    assert out.mask.pruned() == 968 and not any(s.within for s in out.sub_steps)
    alive = [1000]
    for s in out.sub_steps:
        alive.append(alive[-1] - s.count)
    assert alive[-1] == 32
    ratios = [b / a for a, b in zip(alive, alive[1:])]  # (32/1000)^(1/5) = 0.5012 each
    assert ratios == pytest.approx([(32 / 1000) ** 0.2] * 5, abs=0.01)


class EntryStepper(ScriptedStepper):
    """Each entry has its own measured cost (predicted 1 each); vetoes skip entries."""

    def __init__(self, model: Scripted, costs: list[float]):
        super().__init__(model, cost=None)
        self.costs = costs

    def estimate(self, problem, mask):
        self.estimates += 1
        return frozenset()

    def step(self, problem, mask, total, vetoed):
        k = total - mask.pruned()
        kept = mask["w"].clone()
        free = [i for i in torch.nonzero(kept).reshape(-1).tolist() if i not in vetoed][:k]
        kept[free] = False
        with torch.no_grad():
            self.model.e += sum(self.costs[i] for i in free)
            self.model.w.mul_(kept)
        return A.StepResult(Mask({"w": kept}), float(len(free)), 1.0)

    @staticmethod
    def veto(vetoed, mask, trial):
        return vetoed | set(torch.nonzero(mask["w"] & ~trial["w"]).reshape(-1).tolist())


def test_a_single_deletion_far_off_its_prediction_is_vetoed():
    """Entries 0 and 1 are cliffs (predicted 1, measured 50 and 40): deleting one entry skips
    them for entry 2; when every candidate fails, the least bad tried one is taken."""
    model, problem, mask = scripted(n=6)
    stepper = EntryStepper(model, [50.0, 40.0, 1.0, 1.0, 1.0, 1.0])
    out = A.run(AdaptiveSteps(), stepper, problem, mask, 1, 6)
    assert out.mask["w"].tolist() == [True, True, False, True, True, True]
    assert out.rejected == 2 and out.sub_steps[0].within
    model, problem, mask = scripted(n=6)
    stepper = EntryStepper(model, [50.0, 40.0, 60.0, 45.0, 70.0, 80.0])
    out = A.run(AdaptiveSteps(max_vetoes=3), stepper, problem, mask, 1, 6)
    assert out.mask["w"].tolist() == [True, False, True, True, True, True]  # 40: the least
    assert not out.sub_steps[0].within and out.after - out.before == pytest.approx(40.0)
    model, problem, mask = scripted(n=6)
    stepper = EntryStepper(model, [50.0, 40.0, 1.0, 1.0, 1.0, 1.0])
    out = A.run(AdaptiveSteps(max_vetoes=0), stepper, problem, mask, 1, 6)
    assert out.mask["w"].tolist() == [False, True, True, True, True, True]  # no veto: taken


def test_fixed_steps_split_evenly_without_testing():
    model, problem, mask = scripted()
    stepper = ScriptedStepper(model, cost=lambda k: 1.0 * k)
    out = A.run(AdaptiveSteps.fixed(4), stepper, problem, mask, 937, 1000)
    assert [s.count for s in out.sub_steps] == [499, 250, 125, 63]
    assert out.rejected == 0 and out.re_estimates == 3
    assert A.as_steps(1) is None and A.as_steps(None) is None
    assert A.as_steps(3) == AdaptiveSteps.fixed(3)


def test_rounding_of_the_forward_pass_is_not_a_failed_prediction():
    """A measured increase above the prediction by less than 64·eps·|E| counts as within."""
    model, problem, mask = scripted()
    with torch.no_grad():
        model.e.fill_(1e6)
    stepper = ScriptedStepper(model, cost=lambda k: 1e-9 * k, unit=0.0)
    out = A.run(AdaptiveSteps(rtol=0.0), stepper, problem, mask, 10, 1000)
    assert len(out.sub_steps) == 1 and out.sub_steps[0].within


def test_too_few_samples_is_a_clear_error_unless_one_step():
    model, problem, mask = scripted(samples=4)
    stepper = ScriptedStepper(model, cost=lambda k: 1.0 * k)
    with pytest.raises(TooFewSamplesError, match=r"4 sample.*min_samples=8.*steps=None"):
        A.run(AdaptiveSteps(), stepper, problem, mask, 10, 1000)
    assert float(model.e.detach()) == 0.0  # nothing deleted
    out = A.run(AdaptiveSteps(), stepper, problem, mask, 1, 1000)  # a single entry: no split
    assert out.mask.pruned() == 1
    out = A.run(AdaptiveSteps(min_samples=4), stepper, problem, out.mask, 10, 1000)
    assert out.mask.pruned() == 10
    out = A.run(AdaptiveSteps.fixed(2), stepper, problem, out.mask, 20, 1000)  # not steered
    assert out.mask.pruned() == 20


def test_a_target_below_what_is_deleted_raises():
    model, problem, mask = scripted()
    stepper = ScriptedStepper(model, cost=lambda k: 1.0 * k)
    mask = mask.with_pruned({"w": list(range(10))})
    with pytest.raises(TargetExceededError, match="target of 5 pruned entries.*10 already"):
        A.run(AdaptiveSteps(), stepper, problem, mask, 5, 1000)


@pytest.mark.parametrize(
    "bad",
    [
        {"rtol": -1.0},
        {"atol": float("nan")},
        {"max_re_estimates": 0},
        {"min_samples": 0},
        {"max_fraction": 0.0},
        {"max_fraction": 1.5},
        {"max_re_estimates": True},
        {"max_vetoes": -1},
    ],
)
def test_bad_rules_raise(bad):
    with pytest.raises(ValueError):
        AdaptiveSteps(**bad)


# --------------------------------------------------------------------------- measured bookkeeping
def objective_of(model, loss, batches) -> float:
    """E by hand: the per-sample mean of the loss over every batch (an independent measurement)."""
    total, n = 0.0, 0
    with torch.no_grad():
        for x, y in batches:
            total += float(loss(model(x), y)) * x.shape[0]
            n += x.shape[0]
    return total / n


PRESETS = {
    "obd": lambda: obd(),
    "obd_one_step": lambda: obd(steps=None),
    "magnitude": lambda: magnitude(),
    "snip": lambda: snip(batches=None),
    "obs": lambda: obs(),
    "ocd_units": lambda: ocd(kinds=("unit",)),
}


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_pruner_measures_the_objective_it_changed(name):
    s = cases.setup("mlp_tanh", "mse_mean")
    problem = Problem(s.model, s.loss_fn, s.batches)
    e0 = objective_of(s.model, s.loss_fn, s.batches)
    sparsity = 0.5 if name != "ocd_units" else 2
    mask, info = PRESETS[name]()(problem, sparsity=sparsity)
    masking.attach(s.model, mask)
    e1 = objective_of(s.model, s.loss_fn, s.batches)
    assert info.objective_before == pytest.approx(e0, rel=1e-12)
    assert info.objective_after == pytest.approx(e1, rel=1e-12)
    assert info.measured_increase == pytest.approx(e1 - e0, rel=1e-9, abs=1e-15)
    steps = info.sub_steps
    assert len(steps) == info.re_estimates + 1
    assert sum(d["measured"] for d in steps) == pytest.approx(info.measured_increase, abs=1e-12)
    assert sum(d["predicted"] for d in steps) == pytest.approx(info.predicted_increase, abs=1e-12)
    counted = info.newly_pruned if name != "ocd_units" else 2
    assert sum(d["count"] for d in steps) == counted


def test_measure_false_records_nothing_and_costs_no_forward_pass(monkeypatch):
    s = cases.setup("mlp_tanh", "mse_mean")
    problem = Problem(s.model, s.loss_fn, s.batches)
    calls = []
    monkeypatch.setattr(Problem, "objective", lambda self: calls.append(1) or 0.0)
    pruner = magnitude()
    pruner.measure = False
    _, info = pruner(problem, sparsity=0.5)
    assert (info.objective_before, info.objective_after, info.measured_increase) == (None,) * 3
    assert info.sub_steps == [] and calls == []


def test_the_loop_records_the_pruners_measurement_once(monkeypatch):
    """History.actual_increase is PruneInfo.measured_increase: the loop measures nothing itself
    when the pruner does (two forward passes per round, not four)."""
    s = cases.setup("mlp_tanh", "ce_mean")
    infos: list[PruneInfo] = []
    pruner = obd(steps=None)
    original = pruner.__call__

    class Recording(type(pruner)):
        def __call__(self, *a, **k):
            out = original(*a, **k)
            infos.append(out[1])
            return out

    pruner.__class__ = Recording
    calls = []
    real = Problem.objective
    monkeypatch.setattr(Problem, "objective", lambda self: calls.append(1) or real(self))
    history = iterative_prune(
        s.model,
        pruner,
        linear(0.6, 2),
        rounds=2,
        make_problem=lambda m: Problem(m, s.loss_fn, s.batches),
    )
    assert len(calls) == 2 * 2
    for rec, info in zip(history.records[1:], infos):
        assert rec.actual_increase == info.measured_increase
        assert rec.objective_before == info.objective_before
        assert rec.objective_pruned == info.objective_after


def test_a_pruner_that_does_not_measure_is_measured_by_the_loop():
    s = cases.setup("mlp_tanh", "ce_mean")
    pruner = magnitude()
    pruner.measure = False
    history = iterative_prune(
        s.model,
        pruner,
        linear(0.6, 1),
        rounds=1,
        make_problem=lambda m: Problem(m, s.loss_fn, s.batches),
    )
    rec = history.records[1]
    assert rec.actual_increase == pytest.approx(rec.objective_pruned - rec.objective_before)
    assert math.isfinite(rec.actual_increase) and rec.actual_increase != 0


# --------------------------------------------------------------------------- OBD on a quadratic
def test_sub_steps_equal_one_step_where_the_diagonal_model_is_exact():
    """Linear least squares with orthogonal, centred inputs: E is quadratic with a diagonal
    Hessian, so OBD's prediction is exact, the rule takes one step, and a forced split into
    sub-steps (re-estimating at each) deletes the same entries to the same objective."""
    results = {}
    for name, steps in {"one": None, "auto": AdaptiveSteps(rtol=0.0), "fixed": 5}.items():
        model, loss, batches = diagonal_quadratic()
        problem = Problem(model, loss, batches)
        mask, info = obd(steps=steps)(problem, Mask.ones(model, ["weight"]), sparsity=6)
        results[name] = (mask, model.weight.detach().clone(), info)
    one, auto, fixed = results["one"], results["auto"], results["fixed"]
    assert one[2].measured_increase == pytest.approx(one[2].predicted_increase, rel=1e-9)
    assert auto[2].re_estimates == 0 and auto[2].rejected == 0
    assert fixed[2].re_estimates == 4 and len(fixed[2].sub_steps) == 5
    for other in (auto, fixed):
        assert other[0] == one[0]
        torch.testing.assert_close(other[1], one[1], rtol=0, atol=1e-14)  # lstsq rounding
        assert other[2].measured_increase == pytest.approx(one[2].measured_increase, rel=1e-9)
        assert other[2].predicted_increase == pytest.approx(one[2].predicted_increase, rel=1e-9)


def test_on_a_correlated_quadratic_the_rule_splits_and_never_does_worse_here():
    """With a non-diagonal Hessian OBD's prediction misses the cross terms; the rule notices
    (rejections, re-estimates) and its result is no worse than the single step's."""
    model, loss, batches = diagonal_quadratic(correlated=True)
    problem = Problem(model, loss, batches)
    _, one = obd(steps=None)(problem, Mask.ones(model, ["weight"]), sparsity=8)
    model, loss, batches = diagonal_quadratic(correlated=True)
    problem = Problem(model, loss, batches)
    _, auto = obd(steps=AdaptiveSteps(rtol=0.1))(problem, Mask.ones(model, ["weight"]), sparsity=8)
    assert abs(one.measured_increase - one.predicted_increase) > 0.1 * one.predicted_increase
    assert auto.rejected + auto.re_estimates > 0
    assert auto.measured_increase <= one.measured_increase * (1 + 1e-9)
