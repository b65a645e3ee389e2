"""Reference architectures used by the experiments and the demo."""

from .activations import LeCunTanh
from .digits import digits_cnn, digits_mlp
from .rnn_sysid import RecurrentSequenceModel, gru_model, lstm_model
from .sequences import frame, sequence_problem, simulation_error
from .sysid import NARX, OutputError
from .transformer import CharTransformer, SequenceCrossEntropy, TransformerConfig

__all__ = [
    "CharTransformer",
    "LeCunTanh",
    "NARX",
    "OutputError",
    "RecurrentSequenceModel",
    "SequenceCrossEntropy",
    "TransformerConfig",
    "digits_cnn",
    "digits_mlp",
    "frame",
    "gru_model",
    "lstm_model",
    "sequence_problem",
    "simulation_error",
]
