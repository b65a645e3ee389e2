"""The trained networks the one-shot benchmarks prune (issue #12), built offline and cached.

* ``tabular(name, seed)``: a 1-hidden-layer tanh net (``hidden`` units) on a scikit-learn table
  (``wine``, ``breast_cancer``, ``iris``; inputs standardised, a fixed stratified 70/30 split)
  trained to saturation by full-batch L-BFGS on MSE with one-hot targets, in float64;
* ``digits_mlp(seed)``: the 64-256-128-10 tanh MLP on the digits, trained with cross-entropy by
  Adam to a near-zero training loss;
* ``digits_cnn(seed)``: :func:`optbrain.models.digits.digits_cnn` trained the same way.

Each returns a :class:`Net` (model, loss, train and test tensors, a classification flag). Trained
weights are cached under ``$OPTBRAIN_BENCH_CACHE`` (default ``~/.cache/optbrain-bench``) so that
several scripts and reruns share them; delete that folder to retrain.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

TABULAR = ("wine", "breast_cancer", "iris")


@dataclass
class Net:
    name: str
    model: nn.Module
    loss_fn: nn.Module
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    labels_train: Tensor
    labels_test: Tensor

    def fresh(self) -> Net:
        """A copy with its own model (the data are shared, never modified)."""
        out = copy.copy(self)
        out.model = copy.deepcopy(self.model)
        return out

    def accuracy(self, model: nn.Module | None = None, split: str = "test") -> float:
        model = model if model is not None else self.model
        x = self.x_test if split == "test" else self.x_train
        labels = self.labels_test if split == "test" else self.labels_train
        with torch.no_grad():
            return float((model(x).argmax(1) == labels).double().mean())


def _cache(key: str) -> Path:
    root = Path(os.environ.get("OPTBRAIN_BENCH_CACHE", Path.home() / ".cache" / "optbrain-bench"))
    root.mkdir(parents=True, exist_ok=True)
    return root / f"{key}.pt"


def _cached(key: str, model: nn.Module, fit) -> nn.Module:
    path = _cache(key)
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model
    fit(model)
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)
    return model


def _table(name: str, standardize: bool = True):
    from sklearn import datasets
    from sklearn.model_selection import train_test_split

    bunch = getattr(datasets, f"load_{name}")()
    x_tr, x_te, y_tr, y_te = train_test_split(
        bunch.data, bunch.target, test_size=0.3, random_state=0, stratify=bunch.target
    )
    if standardize:
        mean, sd = x_tr.mean(0), x_tr.std(0) + 1e-12
        x_tr, x_te = (x_tr - mean) / sd, (x_te - mean) / sd
    else:  # raw features scaled by their overall magnitude only (one common factor)
        scale = abs(x_tr).max()
        x_tr, x_te = x_tr / scale, x_te / scale
    as_t = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    return as_t(x_tr), as_t(x_te), torch.tensor(y_tr), torch.tensor(y_te)


def _lbfgs(model: nn.Module, x: Tensor, y: Tensor, loss_fn, iters: int = 3000) -> None:
    opt = torch.optim.LBFGS(
        model.parameters(),
        lr=1.0,
        max_iter=iters,
        max_eval=2 * iters,
        tolerance_grad=1e-12,
        tolerance_change=1e-16,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)


def tabular(name: str, seed: int, hidden: int = 16, standardize: bool = True) -> Net:
    """A tanh net ``d-hidden-C`` trained to saturation by L-BFGS (MSE on one-hot targets);
    ``standardize=False`` keeps the raw features (divided by one common factor)."""
    x_tr, x_te, l_tr, l_te = _table(name, standardize)
    classes = int(l_tr.max()) + 1
    onehot = lambda l: torch.eye(classes, dtype=torch.float64)[l]  # noqa: E731
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(x_tr.shape[1], hidden), nn.Tanh(), nn.Linear(hidden, classes))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (1.0 / p.shape[-1] ** 0.5))
    model = model.double()
    loss = nn.MSELoss()
    key = f"tabular-{name}-h{hidden}-s{seed}" + ("" if standardize else "-raw")
    _cached(key, model, lambda m: _lbfgs(m, x_tr, onehot(l_tr), loss))
    return Net(f"{name}", model, loss, x_tr, onehot(l_tr), x_te, onehot(l_te), l_tr, l_te)


def _adam(model: nn.Module, x: Tensor, y: Tensor, seed: int, epochs: int, lr: float) -> None:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(epochs):
        perm = torch.randperm(x.shape[0], generator=g)
        for i in range(0, x.shape[0], 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()


def _digits(flat: bool):
    from optbrain.data.digits import load_digits_split

    return load_digits_split(flat=flat)


def digits_mlp(seed: int, epochs: int = 150) -> Net:
    """The 64-256-128-10 tanh MLP, cross-entropy, Adam to a near-zero training loss."""
    from optbrain.models.digits import digits_mlp as make

    d = _digits(True)
    model = make((256, 128), "tanh", seed=seed)
    _cached(
        f"digits-mlp-256-128-s{seed}-e{epochs}",
        model,
        lambda m: _adam(m, d.x_train, d.y_train, seed, epochs, 1e-3),
    )
    return _ce_net("digits-mlp", model, d)


def digits_cnn(seed: int, epochs: int = 150) -> Net:
    """The small LeCun-style digits CNN, cross-entropy, Adam."""
    from optbrain.models.digits import digits_cnn as make

    d = _digits(False)
    model = make(seed=seed)
    _cached(
        f"digits-cnn-s{seed}-e{epochs}",
        model,
        lambda m: _adam(m, d.x_train, d.y_train, seed, epochs, 3e-3),
    )
    return _ce_net("digits-cnn", model, d)


def _ce_net(name: str, model: nn.Module, d) -> Net:
    loss = nn.CrossEntropyLoss()
    return Net(name, model, loss, d.x_train, d.y_train, d.x_test, d.y_test, d.y_train, d.y_test)


def build(kind: str, seed: int) -> Net:
    """``kind``: a tabular name, ``digits-mlp`` or ``digits-cnn``."""
    if kind in TABULAR:
        return tabular(kind, seed)
    if kind == "digits-mlp":
        return digits_mlp(seed)
    if kind == "digits-cnn":
        return digits_cnn(seed)
    raise ValueError(f"unknown net {kind!r}")


def environment() -> str:
    """CPU, threads and versions, for the record."""
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (
        f"{cpu}, nproc = {os.cpu_count()}, Python {platform.python_version()}, "
        f"torch {torch.__version__} with {torch.get_num_threads()} thread(s)"
    )


def retrain(net: Net, seed: int, steps: int = 100, lr: float = 1e-3, batch: int = 64) -> None:
    """A fixed retraining budget: ``steps`` Adam steps on batches of ``batch`` training samples
    (whole epochs, rounded up), the attached mask keeping deleted weights at 0."""
    from torch.utils.data import DataLoader, TensorDataset

    from optbrain.train import train

    g = torch.Generator().manual_seed(seed)
    data = TensorDataset(net.x_train, net.y_train)
    loader = DataLoader(data, batch_size=batch, shuffle=True, generator=g)
    epochs = -(-steps // len(loader))
    train(net.model, loader, net.loss_fn, epochs=epochs, lr=lr, seed=seed)
