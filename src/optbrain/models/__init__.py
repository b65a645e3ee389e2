"""Reference architectures used by the experiments and the demo."""

from .activations import LeCunTanh
from .digits import digits_cnn, digits_mlp

__all__ = ["LeCunTanh", "digits_cnn", "digits_mlp"]
