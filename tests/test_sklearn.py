"""OCDSelector: scikit-learn's estimator checks, planted irrelevant features (classification and
regression), the RFE-shaped ranking, validation-based stopping, Pipeline and GridSearchCV, bad
input, determinism without touching torch's global random state."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import Pipeline
from sklearn.utils.estimator_checks import parametrize_with_checks

from optbrain.sklearn import OCDSelector

INFORMATIVE, NOISE = 3, 3


@parametrize_with_checks([OCDSelector(epochs=10)])
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


def planted(n: int = 240, task: str = "classification", seed: int = 0):
    """Six standard normal features: the target depends on columns 1, 3 and 4 only (INFO_COLS),
    columns 0, 2 and 5 are independent noise."""
    rng = np.random.RandomState(seed)
    x = rng.normal(size=(n, INFORMATIVE + NOISE))
    signal = x[:, :INFORMATIVE]
    if task == "classification":
        y = (signal @ np.array([1.5, -2.0, 1.0]) + 0.5 * signal[:, 0] * signal[:, 1] > 0).astype(
            int
        )
    else:
        y = np.sin(signal[:, 0]) + signal[:, 1] ** 2 - signal[:, 2] + 0.05 * rng.normal(size=n)
    return x[:, [4, 0, 3, 1, 2, 5]], y  # signal columns 0, 1, 2 move to 1, 3, 4


INFO_COLS = [1, 3, 4]


@pytest.mark.parametrize(
    "task, method", [("classification", "gate"), ("classification", "sum"), ("regression", "gate")]
)
def test_planted_noise_features_are_removed_first(task, method):
    x, y = planted(task=task)
    sel = OCDSelector(n_features_to_select=3, random_state=0, method=method).fit(x, y)
    assert sel.task_ == task
    assert np.flatnonzero(sel.support_).tolist() == INFO_COLS
    assert sel.ranking_[INFO_COLS].tolist() == [1, 1, 1]
    assert sorted(sel.ranking_[[0, 2, 5]].tolist()) == [2, 3, 4]  # one per step, RFE-style
    assert [h["n_features"] for h in sel.history_] == [6, 5, 4, 3]
    removed = [i for h in sel.history_ for i in h["removed"]]
    assert sorted(removed) == [0, 2, 5]
    assert sel.ranking_[removed].tolist() == [4, 3, 2]  # removed earlier -> larger rank
    assert sel.saliencies_.shape == (6,) and np.all(sel.saliencies_[[0, 2, 5]] == 0)
    assert np.all(sel.saliencies_[INFO_COLS] > 0)
    np.testing.assert_array_equal(sel.transform(x), x[:, INFO_COLS])
    first = sel.history_[0]["saliencies"]
    assert first[[0, 2, 5]].max() < first[INFO_COLS].min()


def test_validation_stopping_keeps_the_informative_subset():
    x, y = planted(n=400, task="regression", seed=1)
    sel = OCDSelector(random_state=0, tol=0.02).fit(x, y)
    assert np.flatnonzero(sel.support_).tolist() == INFO_COLS
    best = max(h["val_score"] for h in sel.history_)
    chosen = next(h for h in sel.history_ if h["n_features"] == 3)
    assert chosen["val_score"] >= best - 0.02 and best > 0.9
    # after the informative subset, removing more loses a lot: the search stops
    assert sel.history_[-1]["val_score"] < best - 0.02


def test_step_removes_several_and_they_share_a_rank():
    x, y = planted(task="classification")
    sel = OCDSelector(n_features_to_select=2, step=2, random_state=0, method="sum").fit(x, y)
    assert [h["n_features"] for h in sel.history_] == [6, 4, 2]
    r = sel.ranking_
    first, second = sel.history_[1]["removed"], sel.history_[2]["removed"]
    assert len(first) == len(second) == 2
    assert r[first].tolist() == [3, 3] and r[second].tolist() == [2, 2]
    assert set(first) <= {0, 2, 5}  # the first two removed are noise


def test_deterministic_and_global_rng_untouched():
    x, y = planted(n=120)
    state = torch.random.get_rng_state()
    a = OCDSelector(n_features_to_select=3, random_state=7, epochs=20).fit(x, y)
    b = OCDSelector(n_features_to_select=3, random_state=7, epochs=20).fit(x, y)
    assert torch.equal(state, torch.random.get_rng_state())
    assert [h["val_loss"] for h in a.history_] == [h["val_loss"] for h in b.history_]
    np.testing.assert_array_equal(a.saliencies_, b.saliencies_)


def test_pipeline_and_grid_search():
    x, y = planted(n=160)
    pipe = Pipeline(
        [("select", OCDSelector(epochs=20, random_state=0)), ("clf", LogisticRegression())]
    )
    grid = GridSearchCV(pipe, {"select__n_features_to_select": [1, 3]}, cv=2).fit(x, y)
    assert grid.best_params_ == {"select__n_features_to_select": 3}
    assert grid.predict(x).shape == (160,)
    assert grid.best_estimator_.named_steps["select"].transform(x).shape == (160, 3)


def test_feature_names_and_bad_input():
    pd = pytest.importorskip("pandas")
    x, y = planted(n=60)
    frame = pd.DataFrame(x, columns=[f"f{i}" for i in range(6)])
    sel = OCDSelector(n_features_to_select=0.5, epochs=10, random_state=0).fit(frame, y)
    assert list(sel.feature_names_in_) == list(frame.columns) and sel.n_features_ == 3
    assert len(sel.get_feature_names_out()) == 3
    bad = x.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        OCDSelector().fit(bad, y)
    for kwargs, match in [
        ({"n_features_to_select": 0}, "n_features_to_select"),
        ({"n_features_to_select": 7}, "n_features_to_select"),
        ({"step": 0}, "step"),
        ({"task": "ranking"}, "task"),
        ({"validation_fraction": 1.0}, "validation_fraction"),
        ({"hidden": (4, 0)}, "hidden"),
        ({"method": "joint"}, "method"),
        ({"curvature": "fisher"}, "curvature"),
        ({"lr": 0.0}, "lr"),
    ]:
        with pytest.raises(ValueError, match=match):
            OCDSelector(**kwargs).fit(x, y)
    with pytest.raises(ValueError, match="task"):
        OCDSelector().fit(x, np.array(["a", "b"] * 30, dtype=object).reshape(-1, 1).repeat(2, 1))
