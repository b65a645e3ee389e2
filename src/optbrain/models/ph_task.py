"""A ready-made sequence task for ``optbrain prune --task optbrain.models.ph_task:prune_task``.

An output-error model (n_A = n_B = 2, 6 tanh units) of the pH reactor
(:mod:`optbrain.data.ph_reactor`), trained in simulation mode by L-BFGS when the task is loaded
(a few seconds). The data follow :mod:`optbrain.models.sequences`: the training loader is the
training sequence cut into segments (one sample per segment: what the OBD curvature averages
over and what retraining fits), the validation and test loaders hold their whole sequence as a
single sample, so their losses are the mean squared simulation errors over the whole sequences.
Pruning by ``optbrain prune`` then takes the saliencies through the fed-back outputs (the generic
``torch.func`` engine) and retrains with the CLI's Adam epochs (each epoch is one full-batch step
here: give ``--retrain-epochs`` in the tens and ``--lr 1e-2``).
"""

from __future__ import annotations

from torch import nn

from ..data.ph_reactor import SequenceSpec, make_sequences
from ..lbfgs import train_lbfgs
from .sequences import frame
from .sysid import OutputError

__all__ = ["make_model", "prune_task"]

SPEC = SequenceSpec(n_train=800, n_val=400, n_test=400)
SEGMENT = 100


def make_model() -> OutputError:
    """The task's architecture, freshly initialised (load a pruned model into it)."""
    return OutputError(2, 2, 6, seed=0)


def prune_task(seed: int = 0) -> dict:
    """The task dict of :mod:`optbrain.tasks` (model trained, MSE loss, sequence loaders)."""
    data = make_sequences(SPEC, seed)
    model = make_model().fit_scaling(data.train.u, data.train.y)
    train = [frame(data.train.u, data.train.y, model.start, SEGMENT)]
    val = [frame(data.val.u, data.val.y, model.start)]
    test = [frame(data.test.u, data.test.y, model.start)]
    train_lbfgs(model, train, nn.MSELoss(), max_iter=300, val_data=val, patience=5)
    return {
        "model": model,
        "loss_fn": nn.MSELoss(),
        "train_loader": train,
        "val_loader": val,
        "test_loader": test,
    }
