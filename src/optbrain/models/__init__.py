"""Reference architectures used by the experiments and the demo."""

from .activations import LeCunTanh
from .digits import digits_cnn, digits_mlp
from .transformer import CharTransformer, SequenceCrossEntropy, TransformerConfig

__all__ = [
    "CharTransformer",
    "LeCunTanh",
    "SequenceCrossEntropy",
    "TransformerConfig",
    "digits_cnn",
    "digits_mlp",
]
