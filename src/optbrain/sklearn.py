"""scikit-learn feature selection by Optimal Cell Damage: :class:`OCDSelector`.

Needs scikit-learn ≥ 1.6 (``pip install optbrain[sklearn]``).
"""

from __future__ import annotations

import logging
import math
import numbers

import numpy as np
import torch
from torch import Tensor, nn

try:
    from sklearn.base import BaseEstimator
    from sklearn.feature_selection import SelectorMixin
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import LabelEncoder
    from sklearn.utils import check_random_state
    from sklearn.utils.multiclass import type_of_target
    from sklearn.utils.validation import check_is_fitted, validate_data
except ImportError as exc:  # missing, or older than 1.6 (no validate_data)
    raise ImportError(
        "optbrain.sklearn needs scikit-learn >= 1.6: pip install 'optbrain[sklearn]'"
    ) from exc

from .elimination import Step, eliminate
from .masking import Mask, attach, detach
from .problem import Problem
from .pruners.cell_pruner import CellPruner, removed_cells
from .saliency.ocd import OCD

__all__ = ["OCDSelector"]

log = logging.getLogger(__name__)

_DTYPE = torch.float64


class OCDSelector(SelectorMixin, BaseEstimator):
    """Select input variables with Optimal Cell Damage while training a small MLP.

    ``fit(X, y)`` standardises X, trains a tanh MLP (``hidden`` units per layer; a classifier
    trained with cross-entropy, or a regressor trained with squared error on standardised y) with
    early stopping on a validation split, then repeatedly removes the ``step`` inputs of lowest OCD
    saliency (by default the joint gate saliency ½ sᵀGs of their fan-out weights s; with
    ``method="sum"`` the sum of their OBD saliencies; see :mod:`optbrain.saliency.ocd`) and
    retrains, as RFE does with
    coefficients. The validation score (accuracy, or R² for regression) is recorded at every size.

    Which subset is kept: with ``n_features_to_select`` (an int, or a float fraction of the
    features) the subset of that size; with ``None`` the smallest subset whose validation score is
    within ``tol`` of the best one seen, and elimination stops once the score has been below
    best − ``tol`` for ``patience`` consecutive steps.

    Parameters
    ----------
    hidden : tuple of int
        Hidden layer sizes (``()``: a linear model).
    n_features_to_select : int, float or None
    step : int or float
        Inputs removed per step (a float in (0, 1): that fraction of the features, at least 1).
    task : {"auto", "classification", "regression"}
        ``"auto"``: classification for binary/multiclass targets, regression for continuous ones.
    epochs : int
        Maximum training epochs of the first fit and of each retraining (Adam, mini-batches of
        ``batch_size``; the weights of the epoch with the lowest validation loss are kept, and
        training stops after ``max(10, epochs // 5)`` epochs without improvement).
    lr, weight_decay, batch_size : Adam's learning rate and weight decay; ``batch_size=None``
        means ``min(32, n_train)``.
    validation_fraction : float in [0, 1)
        Held-out share for early stopping and scoring (stratified for classification); 0 scores
        on the training data.
    tol, patience : see above.
    method : {"gate", "sum"}
        ``"gate"`` (default): ½ sᵀGs for each input's fan-out weights s, which sees that fan-out
        weights of a noise input can cancel each other; ``"sum"``: Cibas et al.'s sum of the OBD
        saliencies of the fan-out weights (its diagonal approximation). docs/guide-ocd.md
        compares them.
    curvature : {"ggn", "hessian"}
        Matrix of the saliencies (Gauss–Newton or exact Hessian).
    random_state : int, RandomState or None
        Seeds the split, the initial weights and the batch order (through a private
        ``torch.Generator``; torch's global random state is not touched).

    Attributes
    ----------
    support_ : bool array (n_features_in_,)
    ranking_ : int array; 1 for selected features, larger for features removed earlier (features
        removed in the same step share a rank).
    saliencies_ : float array; OCD input saliencies of the network at the selected subset
        (0 for removed inputs).
    history_ : list of dict, one per subset size: ``n_features``, ``features`` (kept indices),
        ``removed`` (indices removed to reach it), ``val_score``, ``val_loss``, ``saliencies``.
    model_ : the trained ``nn.Sequential`` (float64) at the selected subset, on standardised
        inputs; removed inputs have zero fan-out weights.
    classes_ : class labels (classification only).
    n_features_in_, feature_names_in_ : as in every scikit-learn estimator.
    """

    def __init__(
        self,
        hidden=(16,),
        n_features_to_select=None,
        step=1,
        task="auto",
        epochs=50,
        lr=0.01,
        weight_decay=1e-2,
        batch_size=None,
        validation_fraction=0.2,
        tol=0.02,
        patience=3,
        method="gate",
        curvature="ggn",
        random_state=None,
    ):
        self.hidden = hidden
        self.n_features_to_select = n_features_to_select
        self.step = step
        self.task = task
        self.epochs = epochs
        self.lr = lr
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.validation_fraction = validation_fraction
        self.tol = tol
        self.patience = patience
        self.method = method
        self.curvature = curvature
        self.random_state = random_state

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.required = True
        return tags

    # ------------------------------------------------------------------ fit
    def fit(self, X, y):
        """Train, eliminate inputs by OCD, and keep the selected subset. Returns ``self``."""
        X, y = validate_data(self, X, y, dtype=[np.float64, np.float32], multi_output=True)
        self._check_params()
        n, d = X.shape
        task, y_t, n_out = self._targets(y)
        keep = self._n_keep(d)
        step = self._step(d)
        rng = check_random_state(self.random_state)
        gen = torch.Generator().manual_seed(int(rng.randint(np.iinfo(np.int32).max)))

        self.mean_ = X.mean(0)
        scale = X.std(0)
        self.scale_ = np.where(scale > 0, scale, 1.0)
        xs = torch.tensor((X - self.mean_) / self.scale_, dtype=_DTYPE)
        train_idx, val_idx = self._split(n, y if task == "classification" else None, rng)
        data = _Data(xs, y_t, train_idx, val_idx, task)

        model = _mlp(d, tuple(self.hidden), n_out, gen)
        mask = attach(model, Mask.ones(model))
        pruner = CellPruner(OCD(self.curvature, ("input",), self.method))
        problem = Problem(model, data.loss_fn, (data.x_train, data.y_train))
        self._train(model, data, gen)
        loop = _Elimination(self, data, model, keep, step, d, pruner._cells(problem))
        eliminate(
            model,
            pruner,
            loop.target,
            make_problem=lambda m: problem,
            mask=mask,
            scores=lambda s: pruner.cell_scores(s.problem),
            before=loop.record,
            retrain=lambda m, r: self._train(m, data, gen),
            after=loop.removed,
        )
        history, states, removed_at = loop.history, loop.states, loop.removed_at
        chosen = self._choose(history, keep)
        model.load_state_dict(states[chosen])
        detach(model, bake=True)
        self.model_ = model.eval()
        self.history_ = history
        self.support_ = np.zeros(d, dtype=bool)
        self.support_[history[chosen]["features"]] = True
        self.saliencies_ = history[chosen]["saliencies"]
        self.ranking_ = np.ones(d, dtype=np.int64)
        for rank, idx in enumerate(reversed(removed_at[:chosen]), start=2):
            self.ranking_[idx] = rank
        self.n_features_ = int(self.support_.sum())
        self.task_ = task
        return self

    def _get_support_mask(self):
        check_is_fitted(self, "support_")
        return self.support_

    # ------------------------------------------------------------------ pieces
    def _check_params(self) -> None:
        if isinstance(self.hidden, (str, bytes)) or not hasattr(self.hidden, "__iter__"):
            raise ValueError(f"hidden must be a tuple of layer sizes, got {self.hidden!r}")
        for h in self.hidden:
            _positive_int("every hidden layer size", h)
        _positive_int("epochs", self.epochs)
        _positive_int("patience", self.patience)
        if self.batch_size is not None:
            _positive_int("batch_size", self.batch_size)
        for name in ("lr", "weight_decay", "tol"):
            v = getattr(self, name)
            if not isinstance(v, numbers.Real) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        vf = self.validation_fraction
        if not isinstance(vf, numbers.Real) or not 0.0 <= vf < 1.0:
            raise ValueError(f"validation_fraction must be in [0, 1), got {vf!r}")
        for name, choices in _CHOICES.items():
            if getattr(self, name) not in choices:
                allowed = ", ".join(repr(c) for c in choices)
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")

    def _targets(self, y: np.ndarray) -> tuple[str, Tensor, int]:
        kind = type_of_target(y, raise_unknown=True)
        task = self.task
        if task == "auto":
            if kind in ("binary", "multiclass"):
                task = "classification"
            elif kind in ("continuous", "continuous-multioutput"):
                task = "regression"
            else:
                raise ValueError(
                    f"cannot tell the task from a {kind!r} target; pass task='classification' "
                    "or task='regression'"
                )
        if task == "classification":
            if y.ndim == 2 and y.shape[1] != 1:
                raise ValueError(f"classification needs a 1d y, got shape {y.shape}")
            enc = LabelEncoder()
            codes = enc.fit_transform(y.reshape(-1))
            self.classes_ = enc.classes_
            return task, torch.tensor(codes, dtype=torch.long), len(enc.classes_)
        yy = np.asarray(y, dtype=np.float64)
        yy = yy.reshape(len(yy), -1)
        if not np.isfinite(yy).all():
            raise ValueError("y contains NaN or infinity")
        self.y_mean_, ys = yy.mean(0), yy.std(0)
        self.y_scale_ = np.where(ys > 0, ys, 1.0)
        yt = torch.tensor((yy - self.y_mean_) / self.y_scale_, dtype=_DTYPE)
        return task, yt, yt.shape[1]

    def _n_keep(self, d: int) -> int:
        k = self.n_features_to_select
        if k is None:
            return 1
        if isinstance(k, numbers.Integral) and not isinstance(k, bool):
            if not 1 <= k <= d:
                raise ValueError(f"n_features_to_select={k} must be in [1, {d}] (the features)")
            return int(k)
        if isinstance(k, numbers.Real) and 0.0 < k <= 1.0:
            return max(1, int(round(k * d)))
        raise ValueError(
            f"n_features_to_select must be None, an int in [1, {d}] or a float in (0, 1], got {k!r}"
        )

    def _step(self, d: int) -> int:
        s = self.step
        if isinstance(s, numbers.Integral) and not isinstance(s, bool) and s >= 1:
            return int(s)
        if isinstance(s, numbers.Real) and not isinstance(s, bool) and 0.0 < s < 1.0:
            return max(1, int(s * d))
        raise ValueError(f"step must be an int >= 1 or a float in (0, 1), got {s!r}")

    def _split(self, n: int, strata, rng) -> tuple[np.ndarray, np.ndarray]:
        idx = np.arange(n)
        n_val = int(round(self.validation_fraction * n))
        if n_val < 1 or n - n_val < 1:
            return idx, idx
        try:
            tr, va = train_test_split(idx, test_size=n_val, random_state=rng, stratify=strata)
        except ValueError:  # a class too small to stratify
            tr, va = train_test_split(idx, test_size=n_val, random_state=rng)
        return np.sort(tr), np.sort(va)

    def _train(self, model: nn.Module, data: _Data, gen: torch.Generator) -> None:
        """Adam with mini-batches; keep the weights of the lowest validation loss."""
        opt = torch.optim.Adam(model.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        n = data.x_train.shape[0]
        bs = self.batch_size or min(32, n)
        patience = max(10, self.epochs // 5)
        best_loss = data.score(model)[1]
        best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        since = 0
        for _ in range(self.epochs):
            model.train()
            order = torch.randperm(n, generator=gen)
            for i in range(0, n, bs):
                b = order[i : i + bs]
                opt.zero_grad()
                loss = data.loss_fn(model(data.x_train[b]), data.y_train[b])
                loss.backward()
                opt.step()
            vloss = data.score(model)[1]
            if vloss < best_loss:
                best_loss, since = vloss, 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                since += 1
                if since >= patience:
                    break
        model.load_state_dict(best_state)
        model.eval()

    def _choose(self, history: list[dict], keep: int) -> int:
        if self.n_features_to_select is not None:
            return len(history) - 1
        best = max(h["val_score"] for h in history)
        ok = [i for i, h in enumerate(history) if h["val_score"] >= best - self.tol]
        return max(ok, key=lambda i: (-history[i]["n_features"], history[i]["val_score"]))


_CHOICES = {
    "task": ("auto", "classification", "regression"),
    "method": ("sum", "gate"),
    "curvature": ("ggn", "hessian"),
}


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


class _Elimination:
    """The callbacks of :meth:`OCDSelector.fit` on :func:`optbrain.elimination.eliminate`: one
    history entry and weight snapshot per subset size, and the stopping rule."""

    def __init__(
        self, est: OCDSelector, data: _Data, model: nn.Module, keep: int, step: int, d, cells
    ):
        self.est, self.data, self.model, self.cells = est, data, model, list(cells)
        self.keep, self.step, self.d = keep, step, d
        self.history: list[dict] = []
        self.states: list[dict[str, Tensor]] = []
        self.removed_at: list[list[int]] = []
        self.best, self.below = -math.inf, 0

    def target(self, r: int, mask: Mask) -> int:
        """Total inputs removed after this round: ``step`` more (never below ``keep`` left)."""
        n_alive = int(self.alive(mask).sum())
        return self.d - n_alive + max(0, min(self.step, n_alive - self.keep))

    def record(self, s: Step) -> str | None:
        """Score the current subset, snapshot the weights, and say whether to stop."""
        score, vloss = self.data.score(self.model)
        alive = self.alive(s.mask)
        self.history.append(
            {
                "n_features": int(alive.sum()),
                "features": np.flatnonzero(alive).tolist(),
                "removed": self.removed_at[-1] if self.removed_at else [],
                "val_score": score,
                "val_loss": vloss,
                "saliencies": s.scores.values.numpy().copy(),
            }
        )
        self.states.append({k: v.detach().clone() for k, v in self.model.state_dict().items()})
        self.best = max(self.best, score)
        self.below = self.below + 1 if score < self.best - self.est.tol else 0  # consecutive
        if int(alive.sum()) <= self.keep:
            return "kept"
        if self.est.n_features_to_select is None and self.below >= self.est.patience:
            return "patience"
        return None

    def alive(self, mask: Mask) -> np.ndarray:
        """Which input cells still have an alive fan-out weight."""
        return ~np.array(removed_cells(self.cells, mask))

    def removed(self, s: Step) -> None:
        self.removed_at.append(sorted(i for _, _, i in s.info.removed))


class _Data:
    """Standardised tensors of the training and validation split, the loss and the score."""

    def __init__(self, x: Tensor, y: Tensor, train_idx, val_idx, task: str):
        t, v = torch.as_tensor(train_idx), torch.as_tensor(val_idx)
        self.x_train, self.y_train = x[t], y[t]
        self.x_val, self.y_val = x[v], y[v]
        self.task = task
        self.loss_fn = nn.CrossEntropyLoss() if task == "classification" else nn.MSELoss()

    def score(self, model: nn.Module) -> tuple[float, float]:
        """(accuracy or R², loss) on the validation split."""
        was = model.training
        model.eval()
        with torch.no_grad():
            out = model(self.x_val)
            loss = float(self.loss_fn(out, self.y_val))
            if self.task == "classification":
                score = float((out.argmax(1) == self.y_val).to(_DTYPE).mean())
            else:
                resid = ((out - self.y_val) ** 2).sum()
                total = ((self.y_val - self.y_val.mean(0)) ** 2).sum()
                score = float(1 - resid / total) if total > 0 else -float(resid)
        model.train(was)
        return score, loss


def _mlp(d: int, hidden: tuple[int, ...], n_out: int, gen: torch.Generator) -> nn.Sequential:
    """tanh MLP in float64, initialised from ``gen`` (PyTorch's default ranges: U(±1/√fan_in))."""
    sizes = (d, *hidden, n_out)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        lin = nn.utils.skip_init(nn.Linear, a, b, dtype=_DTYPE)  # no draw from the global RNG
        bound = 1.0 / math.sqrt(a)
        with torch.no_grad():
            lin.weight.uniform_(-bound, bound, generator=gen)
            lin.bias.uniform_(-bound, bound, generator=gen)
        layers.append(lin)
        if i < len(hidden):
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)
